"""Map tiles cut from the scene's GeoTIFFs as the page asks for them (rio-tiler).

Tiles are in the image's own pixel grid (rio-tiler's `ImageReader`: zoom `maxzoom` is full
resolution, each zoom out halves it), so the page shows every pixel as it is in the file, with
no reprojection, and works the same for rasters without a CRS (the real sample patches). The
page's map (Leaflet, `CRS.Simple`) puts pixel (col, row) at (-row, col) / 2**maxzoom.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rio_tiler.colormap import cmap
from rio_tiler.errors import NoOverviewWarning, TileOutsideBounds
from rio_tiler.io import ImageReader

TILE = 256
IMAGERY = {"rgb": (1, 2, 3), "nir": (4, 1, 2)}  # false colour: vegetation red


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


def max_zoom(path: Path) -> int:
    """The zoom level at which one tile pixel is one image pixel (rio-tiler's local grid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOverviewWarning)
        with ImageReader(str(path)) as reader:
            return int(reader.maxzoom)


def _read(path: Path, x: int, y: int, z: int, indexes: tuple[int, ...]):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOverviewWarning)
        with ImageReader(str(path)) as reader:
            try:
                return reader.tile(x, y, z, tilesize=TILE, indexes=indexes)
            except TileOutsideBounds:
                return None


def imagery_tile(path: Path, kind: str, stretch: Stretch, x: int, y: int, z: int) -> bytes | None:
    """A PNG of the imagery in true colour (`rgb`) or NIR false colour (`nir`)."""
    indexes = IMAGERY[kind]
    data = _read(path, x, y, z, indexes)
    if data is None:
        return None
    ranges = [(stretch.low[i - 1], stretch.high[i - 1]) for i in indexes]
    return data.rescale(in_range=ranges).render(img_format="PNG")


def class_tile(
    path: Path, colours: dict[int, tuple[int, int, int, int]], x: int, y: int, z: int
) -> bytes | None:
    """A PNG of a class raster (codes) in the model's colours; no-data transparent."""
    data = _read(path, x, y, z, (1,))
    if data is None:
        return None
    return data.render(img_format="PNG", colormap=colours)


CONFIDENCE_COLOURS = cmap.get("magma")


def confidence_tile(path: Path, x: int, y: int, z: int) -> bytes | None:
    """A PNG of the confidence raster (probability x 255), dark where the model hesitates."""
    data = _read(path, x, y, z, (1,))
    if data is None:
        return None
    return data.render(img_format="PNG", colormap=CONFIDENCE_COLOURS)
