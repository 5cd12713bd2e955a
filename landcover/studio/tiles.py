"""Map tiles cut from the scene's GeoTIFFs as the page asks for them (rio-tiler).

Imagery is drawn from the scene's bands whatever their colour interpretation says: real NAIP
tags band 4 (near-infrared) as *alpha*, and rio-tiler, as any GDAL reader, would then make the
near-infrared the tiles' transparency (the page showed a dark grey ghost). So the imagery is read
through a VRT that sets every band's interpretation aside, and the bands for true and false
colour are chosen from the bands' names, their interpretation, or their count (`Display`).

Tiles are in the image's own pixel grid (rio-tiler's `ImageReader`: zoom `maxzoom` is full
resolution, each zoom out halves it), so the page shows every pixel as it is in the file, with
no reprojection, and works the same for rasters without a CRS (the real sample patches). The
page's map (Leaflet, `CRS.Simple`) puts pixel (col, row) at (-row, col) / 2**maxzoom.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rio_tiler.colormap import cmap
from rio_tiler.errors import NoOverviewWarning, TileOutsideBounds
from rio_tiler.io import ImageReader

from landcover.errors import LandcoverError

TILE = 256
IMAGERY = (
    "rgb",
    "nir",
)  # true colour; NIR false colour (near-infrared, red, green: vegetation red)
# band order by count where the file names none: NAIP (R, G, B, NIR); WorldView-2/3's 8 bands
# (coastal, blue, green, yellow, red, red edge, NIR1, NIR2)
BANDS_BY_COUNT = {3: ((1, 2, 3), None), 4: ((1, 2, 3), 4), 8: ((5, 3, 2), 7)}
NAMES = {
    "red": ("red", "r"),
    "green": ("green", "g"),
    "blue": ("blue", "b"),
    "nir": ("nir", "nir1", "near-infrared", "near infrared", "nearinfrared", "n"),
}


@dataclass(frozen=True)
class Stretch:
    """Per-band display range of the imagery (2nd to 98th percentile of a decimated read)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def of(cls, path: Path) -> Stretch:
        """The display range of every band of `path`."""
        with rasterio.open(path) as src:
            step = max(1, max(src.width, src.height) // 1024)
            sample = src.read(out_shape=(src.count, src.height // step, src.width // step))
        low = tuple(float(np.percentile(band, 2)) for band in sample)
        high = tuple(
            max(float(np.percentile(band, 98)), lo + 1)
            for band, lo in zip(sample, low, strict=True)
        )
        return cls(low, high)


def choose_bands(path: Path) -> tuple[tuple[int, int, int], int | None]:
    """(red, green, blue) and near-infrared band numbers of `path`: from the bands' names
    (descriptions), else their red/green/blue interpretation (near-infrared: a 4th band, even
    tagged alpha as NAIP tags it), else by count (`BANDS_BY_COUNT`); a scene of one or two bands
    is grey."""
    with rasterio.open(path) as src:
        count, names = src.count, [(d or "").strip().lower() for d in src.descriptions]
        interpretation = [c.name for c in src.colorinterp]
    found = {
        colour: next((i + 1 for i, n in enumerate(names) if n in aliases), None)
        for colour, aliases in NAMES.items()
    }
    if found["red"] and found["green"] and found["blue"]:
        return (found["red"], found["green"], found["blue"]), found["nir"]
    if all(c in interpretation for c in ("red", "green", "blue")):
        rgb = tuple(interpretation.index(c) + 1 for c in ("red", "green", "blue"))
        rest = [b for b in range(1, count + 1) if b not in rgb]
        return rgb, (found["nir"] or (rest[0] if rest else None))  # type: ignore[return-value]
    if count in BANDS_BY_COUNT:
        return BANDS_BY_COUNT[count]
    return ((1, 2, 3), None) if count >= 3 else ((1, 1, 1), None)


def band_source(path: Path) -> str:
    """A VRT (XML, opened by GDAL as it is) of every band of `path` with no colour
    interpretation and no mask taken from an alpha band: its pixels as they are."""
    from rasterio.dtypes import _gdal_typename

    with rasterio.open(path) as src:
        width, height, nodata = src.width, src.height, src.nodata
        types = [_gdal_typename(dtype) for dtype in src.dtypes]
    source = escape(str(Path(path).resolve()))
    fill = "" if nodata is None else f"<NoDataValue>{nodata!r}</NoDataValue>"
    bands = "".join(
        f'<VRTRasterBand dataType="{kind}" band="{b}">{fill}<ColorInterp>Undefined</ColorInterp>'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{source}</SourceFilename>'
        f"<SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
        for b, kind in enumerate(types, start=1)
    )
    return f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{bands}</VRTDataset>'


@dataclass(frozen=True)
class Display:
    """How the scene is drawn, the same in the page's tiles and the retrain's pictures: the
    bands of true and false colour, each band's stretch, and the source tiles are read from."""

    source: str
    rgb: tuple[int, int, int]
    nir: int | None
    stretch: Stretch

    @classmethod
    def of(
        cls, path: Path, rgb: tuple[int, int, int] | None = None, nir: int | None = None
    ) -> Display:
        """`rgb`/`nir`: the bands to use (1-based) where the file's own are not the right ones."""
        chosen_rgb, chosen_nir = choose_bands(path)
        with rasterio.open(path) as src:
            count = src.count
        rgb = rgb or chosen_rgb
        nir = nir or chosen_nir
        for band in (*rgb, *([nir] if nir else [])):
            if not 1 <= band <= count:
                raise LandcoverError(
                    f"{path}: band {band} does not exist (the scene has {count}): "
                    "see --rgb-bands and --nir-band"
                )
        return cls(band_source(path), rgb, nir, Stretch.of(path))

    def bands(self, kind: str) -> tuple[int, int, int] | None:
        """The bands drawn as red, green and blue for `kind` (None: the scene has no NIR)."""
        if kind == "rgb":
            return self.rgb
        return (self.nir, self.rgb[0], self.rgb[1]) if self.nir else None

    def stretched(self, pixels: np.ndarray, kind: str = "rgb") -> np.ndarray:
        """(3, rows, cols) of `kind`'s bands -> floats in [0, 1] with the tiles' stretch."""
        bands = self.bands(kind) or self.rgb
        low = np.array([self.stretch.low[b - 1] for b in bands], np.float32)[:, None, None]
        high = np.array([self.stretch.high[b - 1] for b in bands], np.float32)[:, None, None]
        return np.clip((pixels.astype(np.float32) - low) / (high - low), 0, 1)


def max_zoom(path: Path) -> int:
    """The zoom level at which one tile pixel is one image pixel (rio-tiler's local grid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOverviewWarning)
        with ImageReader(str(path)) as reader:
            return int(reader.maxzoom)


def _read(path: Path | str, x: int, y: int, z: int, indexes: tuple[int, ...]):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOverviewWarning)
        with ImageReader(str(path)) as reader:
            try:
                return reader.tile(x, y, z, tilesize=TILE, indexes=indexes)
            except TileOutsideBounds:
                return None


def imagery_tile(display: Display, kind: str, x: int, y: int, z: int) -> bytes | None:
    """A PNG of the imagery in true colour (`rgb`) or NIR false colour (`nir`); None where the
    tile is outside the scene or the scene has no near-infrared band."""
    indexes = display.bands(kind)
    if indexes is None:
        return None
    data = _read(display.source, x, y, z, indexes)
    if data is None:
        return None
    ranges = [(display.stretch.low[i - 1], display.stretch.high[i - 1]) for i in indexes]
    return data.rescale(in_range=ranges).render(img_format="PNG")


def class_tile(
    path: Path, colours: dict[int, tuple[int, int, int, int]], x: int, y: int, z: int
) -> bytes | None:
    """A PNG of a class raster (codes) in the model's colours; no-data transparent."""
    data = _read(path, x, y, z, (1,))
    if data is None:
        return None
    return data.render(img_format="PNG", colormap=colours)


def _table(colours: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """(256, 4) RGBA for every code, transparent where `colours` names none."""
    table = np.zeros((256, 4), np.uint8)
    for code, colour in colours.items():
        table[int(code)] = colour
    return table


def outlined_tile(
    path: Path, colours: dict[int, tuple[int, int, int, int]], x: int, y: int, z: int
) -> bytes | None:
    """A PNG of the corrections: each class's colour inside a white outline (and a dark one
    just outside it), so corrections read apart from the map below in the same colours."""
    from rio_tiler.utils import render

    data = _read(path, x, y, z, (1,))
    if data is None:
        return None
    codes = data.data[0].astype(np.uint8)
    rgba = _table(colours)[codes].copy()
    painted = rgba[..., 3] > 0
    padded = np.pad(painted, 1, mode="edge")
    inner_edge = painted & ~(
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    )
    outer_edge = ~painted & (
        padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    )
    rgba[inner_edge] = (255, 255, 255, 255)
    rgba[outer_edge] = (20, 20, 20, 230)
    if data.mask is not None:
        rgba[np.asarray(data.mask) == 0, 3] = 0  # outside the scene
    return render(rgba[..., :3].transpose(2, 0, 1), rgba[..., 3], img_format="PNG")


CONFIDENCE_COLOURS = cmap.get("magma")


def confidence_tile(path: Path, x: int, y: int, z: int) -> bytes | None:
    """A PNG of the confidence raster (probability x 255), dark where the model hesitates."""
    data = _read(path, x, y, z, (1,))
    if data is None:
        return None
    return data.render(img_format="PNG", colormap=CONFIDENCE_COLOURS)
