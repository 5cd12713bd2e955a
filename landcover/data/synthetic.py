"""Synthetic landscapes written as real georeferenced 4-band GeoTIFFs with Chesapeake codes.

The demo and the core tests need data that exists on a fresh machine with no downloads, yet
exercises everything real data does: a CRS and transform, tiled compressed GeoTIFFs, colour
maps, spatially coherent classes a network can learn (water dark in NIR, vegetation bright in
NIR, roads as long thin lines, buildings as small rectangles beside them). Deterministic from a
seed, so two machines generate byte-identical scenes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage

from landcover.atomic import atomic_target

# Chesapeake Conservancy codes, so the shipped 4-class and 5-label schemas apply unchanged.
WATER, TREES, LOW_VEGETATION, BARREN, IMPERVIOUS, ROAD = 1, 2, 3, 4, 5, 6

# Mean R, G, B, NIR digital numbers per code, close to NAIP summer imagery.
SPECTRA = {
    WATER: (45, 60, 70, 22),
    TREES: (62, 88, 64, 150),
    LOW_VEGETATION: (112, 130, 88, 178),
    BARREN: (160, 146, 124, 135),
    IMPERVIOUS: (170, 166, 160, 128),
    ROAD: (105, 106, 108, 92),
}
# Per-code texture strength (std of the multiplicative low-frequency field, and of pixel noise).
TEXTURE = {
    WATER: (0.05, 3),
    TREES: (0.22, 12),
    LOW_VEGETATION: (0.10, 7),
    BARREN: (0.12, 8),
    IMPERVIOUS: (0.06, 6),
    ROAD: (0.05, 5),
}

COLORMAP = {
    0: (0, 0, 0, 0),
    WATER: (0, 0, 255, 255),
    TREES: (0, 128, 0, 255),
    LOW_VEGETATION: (128, 255, 128, 255),
    BARREN: (128, 96, 96, 255),
    IMPERVIOUS: (192, 192, 192, 255),
    ROAD: (64, 64, 64, 255),
    15: (0, 0, 0, 0),
}

CRS = "EPSG:26918"  # UTM 18N, where the Chesapeake Bay lies

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; its JSON is stored beside the data so a changed spec regenerates."""

    scenes: dict[str, int]
    size: int = 512
    seed: int = 0
    compress: str = "deflate"
    blocksize: int = 256


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Spatially coherent noise in [0, 1] with features about `scale` pixels across.

    Generated coarse and upsampled: smoothing a full-resolution field with a wide Gaussian
    would cost minutes on a 16k scene.
    """
    factor = max(int(scale // 4), 1)
    coarse_shape = (shape[0] // factor + 3, shape[1] // factor + 3)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=2.0, mode="wrap")
    fine = ndimage.zoom(coarse, factor, order=1)[: shape[0], : shape[1]]
    lo, hi = np.percentile(fine[:: max(1, shape[0] // 256), :: max(1, shape[1] // 256)], [1, 99])
    return np.clip((fine - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def _draw_roads(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Meandering roads crossing the scene, as a boolean mask."""
    height, width = labels.shape
    mask = np.zeros_like(labels, dtype=bool)
    n_roads = max(1, int(round(rng.uniform(1.0, 2.5) * max(height, width) / 512)))
    for _ in range(n_roads):
        half_width = int(rng.integers(3, 6))
        horizontal = rng.random() < 0.5
        length = width if horizontal else height
        steps = np.arange(length)
        start = rng.uniform(0.1, 0.9) * (height if horizontal else width)
        drift = np.cumsum(rng.normal(0, 0.15, size=length))
        offset = (start + drift + 0.2 * steps * rng.uniform(-1, 1)).astype(int)
        for delta in range(-half_width, half_width + 1):
            across = offset + delta
            keep = (across >= 0) & (across < (height if horizontal else width))
            if horizontal:
                mask[across[keep], steps[keep]] = True
            else:
                mask[steps[keep], across[keep]] = True
    return mask


def _draw_buildings(road: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small rectangles set back a little from the roads."""
    height, width = road.shape
    near = ndimage.binary_dilation(road[::4, ::4], iterations=8)
    candidates = np.argwhere(near & ~ndimage.binary_dilation(road[::4, ::4], iterations=2)) * 4
    mask = np.zeros_like(road)
    if len(candidates) == 0:
        return mask
    count = int(len(candidates) * 0.01) + 1
    for r, c in candidates[rng.choice(len(candidates), size=count, replace=False)]:
        h, w = rng.integers(8, 24, size=2)
        mask[r : min(r + h, height), c : min(c + w, width)] = True
    return mask & ~road


def generate_labels(rng: np.random.Generator, size: int) -> np.ndarray:
    """A labelled landscape with the spatial structure of real land cover (patches, rivers, roads),
    so models learn something meaningful."""
    shape = (size, size)
    labels = np.full(shape, LOW_VEGETATION, dtype=np.uint8)
    labels[smooth_noise(rng, shape, 48) > 0.55] = TREES
    labels[smooth_noise(rng, shape, 64) > 0.8] = BARREN
    water = smooth_noise(rng, shape, 96) > 0.78
    road = _draw_roads(labels, rng) & ~water
    buildings = _draw_buildings(road, rng) & ~water
    labels[water] = WATER
    labels[road] = ROAD
    labels[buildings] = IMPERVIOUS
    return labels


def render_image(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NAIP-like (4, H, W) uint8 pixels for a label map: class spectra, texture, noise, haze."""
    shape = labels.shape
    image = np.zeros((4, *shape), dtype=np.float32)
    texture_fine = smooth_noise(rng, shape, 6) - 0.5
    texture_coarse = smooth_noise(rng, shape, 40) - 0.5
    illumination = 1.0 + 0.15 * (smooth_noise(rng, shape, 200) - 0.5)
    for code, spectrum in SPECTRA.items():
        where = labels == code
        if not where.any():
            continue
        strength, noise = TEXTURE[code]
        factor = 1.0 + strength * (2 * texture_fine[where] + texture_coarse[where])
        for band in range(4):
            image[band][where] = spectrum[band] * factor
        image[:, where] += rng.normal(0, noise, size=(4, int(where.sum())))
    image = ndimage.uniform_filter(image, size=(1, 3, 3)) * illumination
    image += rng.normal(0, 2.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _atomic_write(path: Path, array: np.ndarray, profile: dict, colormap: dict | None) -> None:
    """Write next to the target and rename, so an interrupted run leaves no half file."""
    with atomic_target(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        if colormap is not None:  # before the pixels: GDAL cannot change it afterwards
            dst.write_colormap(1, colormap)
        dst.write(array if array.ndim == 3 else array[None])


def write_scene(
    directory: Path,
    name: str,
    size: int,
    rng: np.random.Generator,
    *,
    origin: tuple[float, float],
    compress: str = "deflate",
    blocksize: int = 256,
) -> tuple[Path, Path]:
    """One image/label pair as georeferenced GeoTIFFs, like a NAIP tile and its label raster."""
    labels = generate_labels(rng, size)
    image = render_image(labels, rng)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "dtype": "uint8",
        "crs": CRS,
        "transform": from_origin(origin[0], origin[1], 1.0, 1.0),
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "compress": compress,
    }
    image_path = directory / f"{name}_naip.tif"
    label_path = directory / f"{name}_lc.tif"
    # RGB with an *unspecified* 4th band: left to GDAL's default, NIR would be labelled alpha
    _atomic_write(
        image_path,
        image,
        {
            **profile,
            "count": 4,
            "interleave": "pixel",
            "photometric": "RGB",
            "alpha": "UNSPECIFIED",
        },
        None,
    )
    _atomic_write(label_path, labels, {**profile, "count": 1, "photometric": "palette"}, COLORMAP)
    return image_path, label_path


def generate(root: str | Path, spec: SyntheticSpec) -> Path:
    """Generate the dataset under `root` unless an identical one is already there.

    Safe when several processes ask at once (sweep workers, DataLoader-less DDP ranks): they
    serialise on a lock file, and those that come second find the finished dataset.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "synthetic.json"
    wanted = json.dumps(asdict(spec), sort_keys=True)
    with open(root / ".generate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists() and marker.read_text() == wanted:
                return root
            marker.unlink(missing_ok=True)  # a half-regenerated dataset must not look finished
            log.info(
                "generating synthetic landscapes (%s scenes of %d px) in %s",
                ", ".join(f"{count} {split}" for split, count in sorted(spec.scenes.items())),
                spec.size,
                root,
            )
            for split_index, (split, count) in enumerate(sorted(spec.scenes.items())):
                directory = root / split
                directory.mkdir(parents=True, exist_ok=True)
                for stale in directory.glob("synth_*.tif"):
                    stale.unlink()
                for i in range(count):
                    rng = np.random.default_rng((spec.seed, split_index, i))
                    origin = (
                        400_000.0 + i * (spec.size + 1000),
                        4_300_000.0 - split_index * 100_000,
                    )
                    write_scene(
                        directory,
                        f"synth_{i:03d}",
                        spec.size,
                        rng,
                        origin=origin,
                        compress=spec.compress,
                        blocksize=spec.blocksize,
                    )
            marker.write_text(wanted)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def main(argv: list[str] | None = None) -> None:
    """`landcover-synth`: write a synthetic dataset without training."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output folder; splits go to ROOT/<split>/")
    parser.add_argument("--size", type=int, default=512, help="scene width and height in pixels")
    parser.add_argument("--train", type=int, default=4, help="number of training scenes")
    parser.add_argument("--val", type=int, default=2, help="number of validation scenes")
    parser.add_argument("--test", type=int, default=0, help="number of test scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scenes = {
        k: v for k, v in {"train": args.train, "val": args.val, "test": args.test}.items() if v
    }
    generate(args.root, SyntheticSpec(scenes=scenes, size=args.size, seed=args.seed))
    print(f"wrote {sum(scenes.values())} scenes of {args.size}x{args.size} under {args.root}")


if __name__ == "__main__":
    main()
