"""Scenes: an image GeoTIFF and a label GeoTIFF on the same pixel grid.

Everything wrong with a pair of files is caught here, once, before any training starts: a
mismatched grid, the wrong band count, label codes the schema does not know, a file that is
missing or unreadable. Each error names the file(s) and the values that disagree.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from landcover.data.schema import ClassSchema
from landcover.errors import SceneError


@dataclass(frozen=True)
class Scene:
    """One validated image/label pair and the grid facts every later stage needs."""

    image_path: str
    label_path: str
    width: int
    height: int
    crs: str | None
    transform: tuple[float, ...]
    labelled_pixels: int | None = None  # pixels of a scored class (None: labels not scanned)
    class_pixels: tuple[int, ...] | None = None  # pixels per class index (None: not scanned)

    @property
    def pixels(self) -> int:
        """Width times height: what scene-level throughput and cache decisions count."""
        return self.width * self.height


def quiet_georeferencing_warnings() -> None:
    """Rasters without a CRS are supported on purpose (the real sample patches have none, and
    their maps keep none); rasterio's NotGeoreferencedWarning on each open is noise here."""
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "/vsi")


def is_remote(path: str) -> bool:
    """An href GDAL reads through a virtual filesystem (range requests, no whole download)."""
    return str(path).startswith(REMOTE_PREFIXES)


def open_raster(path: str | Path) -> rasterio.io.DatasetReader:
    """Open a raster, turning rasterio's terse failures into errors that name the file.

    Rasters without a CRS (the real Chesapeake sample patches) are accepted silently.
    """
    path = str(path)
    if not is_remote(path) and not Path(path).exists():
        raise SceneError(f"{path}: file does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as err:
        raise SceneError(f"{path}: not a readable raster ({err})") from err


def _crs_text(src: rasterio.io.DatasetReader) -> str | None:
    return src.crs.to_string() if src.crs else None


def scan_label_codes(src: rasterio.io.DatasetReader, path: str) -> np.ndarray:
    """Count every label code, block by block, so huge label rasters never sit in memory.

    Reading every block also proves the file is not truncated or corrupt.
    """
    counts = np.zeros(256, dtype=np.int64)
    try:
        for _, window in src.block_windows(1):
            block = src.read(1, window=window)
            counts += np.bincount(block.ravel(), minlength=256)[:256]
    except RasterioIOError as err:
        raise SceneError(f"{path}: corrupt or truncated raster, reading failed ({err})") from err
    return counts


FULL_CHECK_PIXELS = 16_000_000  # images up to this size have every block decoded at validation


def _check_image(src: rasterio.io.DatasetReader, path: str) -> None:
    """Decode every block of an image up to FULL_CHECK_PIXELS (a corrupt block in the middle
    fails here, not mid-epoch), else its last block (a truncated file fails there); refuse an
    image that is nodata everywhere (nothing to learn from)."""
    nodata = src.nodata if src.nodata is not None else 0
    if src.width * src.height > FULL_CHECK_PIXELS:
        _check_readable(src, path)
        return
    empty = True
    try:
        for _, window in src.block_windows(1):
            block = src.read(window=window)
            empty = empty and not (block != nodata).any()
    except RasterioIOError as err:
        raise SceneError(f"{path}: corrupt or truncated raster, reading failed ({err})") from err
    if empty:
        raise SceneError(
            f"{path}: every pixel of every band is nodata ({nodata:g}): an empty image"
        )


def _check_readable(src: rasterio.io.DatasetReader, path: str) -> None:
    """Read the last block: a truncated file fails there even when its header is intact."""
    try:
        windows = list(src.block_windows(1))
        src.read(window=windows[-1][1])
    except RasterioIOError as err:
        raise SceneError(f"{path}: corrupt or truncated raster, reading failed ({err})") from err


def check_same_grid(
    image: rasterio.io.DatasetReader,
    image_path: str,
    other: rasterio.io.DatasetReader,
    other_path: str,
) -> None:
    """Size, CRS and transform of `other` (labels, a prior layer) must be the image's: a layer
    one pixel off would be read against the wrong pixels without any error. A file cut short
    often still opens, without its georeferencing: that is reported as what it is, not as a
    mismatch."""
    same_size = (image.width, image.height) == (other.width, other.height)
    if not same_size or _crs_text(image) != _crs_text(other):
        for dataset, path in ((other, other_path), (image, image_path)):
            reason = unreadable_reason(dataset)
            if reason is not None:
                raise SceneError(f"{path}: truncated or corrupt ({reason})")
    if not same_size:
        raise SceneError(
            f"grid mismatch: {image_path} is {image.width}x{image.height} but "
            f"{other_path} is {other.width}x{other.height}"
        )
    if _crs_text(image) != _crs_text(other):
        raise SceneError(
            f"CRS mismatch: {image_path} has {_crs_text(image)} but "
            f"{other_path} has {_crs_text(other)}"
        )
    if not image.transform.almost_equals(other.transform):
        raise SceneError(
            f"transform mismatch: {image_path} has {tuple(image.transform)[:6]} but "
            f"{other_path} has {tuple(other.transform)[:6]}"
        )


def unreadable_reason(dataset: rasterio.io.DatasetReader) -> str | None:
    """Why the last block of the first band cannot be read (a file cut short), or None."""
    try:
        windows = list(dataset.block_windows(1))
        dataset.read(1, window=windows[-1][1])
    except (rasterio.errors.RasterioError, IndexError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def validate_scene(
    image_path: str,
    label_path: str,
    *,
    bands: int,
    schema: ClassSchema,
    check_label_codes: bool = True,
) -> Scene:
    """Open both files, check they describe the same grid and fit the schema, return a Scene."""
    if not Path(label_path).exists():
        raise SceneError(f"{image_path}: its label file {label_path} does not exist")
    with open_raster(image_path) as image, open_raster(label_path) as label:
        if image.count != bands:
            raise SceneError(
                f"{image_path}: has {image.count} band(s), the data config expects {bands}"
            )
        if image.dtypes[0] != "uint8":
            raise SceneError(f"{image_path}: image dtype is {image.dtypes[0]}, expected uint8")
        if label.count != 1:
            raise SceneError(f"{label_path}: label raster has {label.count} bands, expected 1")
        if label.dtypes[0] != "uint8":
            raise SceneError(f"{label_path}: label dtype is {label.dtypes[0]}, expected uint8")
        check_same_grid(image, image_path, label, label_path)
        _check_image(image, image_path)
        labelled, class_pixels = None, None
        if check_label_codes:
            counts = scan_label_codes(label, label_path)
            lookup = schema.lookup_table()
            class_pixels = tuple(
                int(counts[lookup == index].sum()) for index in range(schema.num_classes)
            )
            labelled = sum(class_pixels)
            unknown = schema.unknown_codes(np.flatnonzero(counts))
            if unknown:
                raise SceneError(
                    f"{label_path}: label codes {unknown} are not in class schema "
                    f"{schema.name!r} (known codes: {sorted(schema.known_codes)})"
                )
        else:
            _check_readable(label, label_path)
        return Scene(
            image_path=image_path,
            label_path=label_path,
            width=image.width,
            height=image.height,
            crs=_crs_text(image),
            transform=tuple(image.transform)[:6],
            labelled_pixels=labelled,
            class_pixels=class_pixels,
        )


def label_path_for(image_path: str, image_suffix: str, label_suffix: str) -> str:
    """The label file next to an image, found by replacing the image's suffix."""
    if not image_path.endswith(image_suffix):
        raise SceneError(
            f"{image_path}: does not end with the configured image suffix {image_suffix!r}, "
            "so its label file cannot be derived"
        )
    return image_path[: -len(image_suffix)] + label_suffix


def find_pairs(
    *,
    pattern: str | None,
    manifest: str | None,
    image_suffix: str,
    label_suffix: str,
) -> list[tuple[str, str]]:
    """Image/label paths of one split, from a glob pattern or a CSV manifest (image,label)."""
    if manifest:
        path = Path(manifest)
        if not path.exists():
            raise SceneError(f"{manifest}: manifest file does not exist")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"image", "label"} <= set(rows[0]):
            raise SceneError(f"{manifest}: manifest needs a header with 'image' and 'label'")
        base = path.parent
        return [(str(base / row["image"]), str(base / row["label"])) for row in rows]
    if not pattern:
        return []
    images = sorted(p for p in glob.glob(pattern, recursive=True) if p.endswith(image_suffix))
    return [(p, label_path_for(p, image_suffix, label_suffix)) for p in images]


def load_scenes(
    pairs: Sequence[tuple[str, str]],
    *,
    bands: int,
    schema: ClassSchema,
    check_label_codes: bool = True,
) -> list[Scene]:
    """Image/label pairs matched by name, each checked (bands, grid, CRS) so a bad file fails before
    training, naming the file."""
    return [
        validate_scene(img, lbl, bands=bands, schema=schema, check_label_codes=check_label_codes)
        for img, lbl in pairs
    ]


FULL_HASH_BYTES = 64 * 2**20
SAMPLE_BYTES = 2**20


def _file_digest(path: Path) -> bytes:
    """Content hash of files up to 64 MiB; larger ones hash size, head and tail.

    Whole-file hashes of a multi-gigabyte dataset would cost minutes at every run start; a
    changed large file almost always changes its size, header or last blocks.
    """
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as handle:
        if path.stat().st_size <= FULL_HASH_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(-SAMPLE_BYTES, os.SEEK_END)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.digest()


def class_pixel_totals(scenes: Sequence[Scene]) -> list[int] | None:
    """Labelled pixels per class index over `scenes` (None where labels were not scanned):
    what automatic class weights and a dataset's profile are computed from."""
    counted = [scene.class_pixels for scene in scenes if scene.class_pixels is not None]
    return [sum(column) for column in zip(*counted, strict=True)] if counted else None


def dataset_fingerprint(scenes: Sequence[Scene]) -> str:
    """A short hash of the scenes (file names and contents) for tracking and promotion."""
    digest = hashlib.sha256()
    for scene in sorted(scenes, key=lambda s: s.image_path):
        for path in (Path(scene.image_path), Path(scene.label_path)):
            digest.update(path.name.encode())
            digest.update(_file_digest(path))
    return digest.hexdigest()[:16]
