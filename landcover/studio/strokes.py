"""The pixels a stroke covers, computed on the image's grid within bounded time and memory.

A brush line of n points buffered as a vector costs time that grows with the square of n when
the line crosses itself (2,000 points took 8 s and 1 GB; 10,000 never finished), and every
other request waited. Here the line is burnt into the raster of its own bounding box (clipped
to the image) and widened by a distance transform, tile by tile: the cost follows the pixels
the stroke spans, whatever its points, and one tile's arrays at most are held at once. A
polygon is burnt by GDAL's scanline fill as drawn (crossing edges need no repair). What is
kept in the log is the exact outline of the covered pixels, so replaying the log gives the
same pixels back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from affine import Affine
from rasterio.features import rasterize, shapes
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, shape

from landcover.errors import LandcoverError

MAX_BRUSH = 256  # pixels: a stroke wider than this is a mistake, not an edit
MAX_POINTS = 10_000
TILE = 1024  # pixels a side of one distance-transform tile (about 40 MB with its halo)


class EditError(LandcoverError):
    """An edit that cannot be applied (unknown class, empty or oversized geometry)."""


@dataclass(frozen=True)
class Area:
    """Pixels of the image a stroke covers: a window's mask and their exact outline."""

    row: int
    col: int
    mask: np.ndarray  # bool, the window's pixels
    outline: shapely.Geometry  # pixel coordinates (col, row), the covered pixels' boundary

    @property
    def pixels(self) -> int:
        """How many pixels the stroke covers."""
        return int(self.mask.sum())

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask on the whole image."""
        whole = np.zeros((height, width), bool)
        h, w = self.mask.shape
        whole[self.row : self.row + h, self.col : self.col + w] = self.mask
        return whole


def stroke_area(
    kind: str, points: Sequence[Sequence[float]], radius: float, width: int, height: int
) -> Area:
    """What a stroke drawn on the page covers on a `width` x `height` image: a brush line of
    `radius` pixels ("paint"), or a polygon ("polygon", and the region of "accept")."""
    if not 0 < len(points) <= MAX_POINTS:
        raise EditError(f"a stroke needs 1 to {MAX_POINTS} points, not {len(points)}")
    coords = np.asarray(points, dtype=np.float64).reshape(len(points), 2)
    if not np.isfinite(coords).all():
        raise EditError("a stroke's coordinates must be finite numbers")
    if kind == "paint":
        if not 0 < radius <= MAX_BRUSH:
            raise EditError(f"brush radius {radius} is outside (0, {MAX_BRUSH}] pixels")
        return _brush(coords, float(radius), width, height)
    if len(coords) < 3:
        raise EditError("a polygon needs at least 3 points")
    polygon = Polygon(coords)
    if polygon.is_valid:
        return area_of(polygon, width, height)
    return _enclosed(coords, width, height)


def area_of(geometry: shapely.Geometry, width: int, height: int) -> Area:
    """The pixels whose centres `geometry` (pixel coordinates) covers, within its bounds."""
    if geometry.is_empty:
        return _empty()
    window = _window(tuple(geometry.bounds), 0, width, height)
    if window is None:
        return _empty()
    row0, col0, row1, col1 = window
    return _with_outline(row0, col0, _burn(geometry, row0, col0, row1, col1))


def _brush(coords: np.ndarray, radius: float, width: int, height: int) -> Area:
    """A line of `radius`: its pixels burnt, then every pixel within `radius` of them."""
    reach = int(np.ceil(radius)) + 1
    window = _window(_bounds(coords), reach, width, height)
    if window is None:
        return _empty()
    row0, col0, row1, col1 = window
    # the line within reach of the window only: a far-off end must not be walked to
    line: Any = Point(coords[0]) if len(coords) == 1 else LineString(coords)
    line = shapely.clip_by_rect(line, col0 - reach, row0 - reach, col1 + reach, row1 + reach)
    if line.is_empty:
        return _empty()
    burnt = _burn(line, row0, col0, row1, col1, all_touched=True)
    if isinstance(line, Point):  # a dot: the pixel it falls in (rasterize may miss an edge)
        h, w = burnt.shape
        burnt[min(h - 1, int(line.y) - row0), min(w - 1, int(line.x) - col0)] = True
    return _with_outline(row0, col0, _widen(burnt, radius, reach))


def _enclosed(coords: np.ndarray, width: int, height: int) -> Area:
    """An outline that crosses itself: every pixel it encloses, its line included. (Repairing
    the polygon as a vector, GEOS's make_valid, took 150 s for 500 random corners.)"""
    from scipy.ndimage import binary_fill_holes

    window = _window(_bounds(coords), 1, width, height)
    if window is None:
        return _empty()
    row0, col0, row1, col1 = window
    ring = shapely.clip_by_rect(
        LineString([*coords, coords[0]]), col0 - 1, row0 - 1, col1 + 1, row1 + 1
    )
    if ring.is_empty:
        return _empty()
    # burnt into a frame one pixel wider on each side, so that an outline running along the
    # window's edge still encloses what is inside it
    line = _burn(ring, row0 - 1, col0 - 1, row1 + 1, col1 + 1, all_touched=True)
    return _with_outline(row0, col0, binary_fill_holes(line)[1:-1, 1:-1])


def _bounds(coords: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of points (pixel coordinates), as shapely's `bounds`."""
    (x0, y0), (x1, y1) = coords.min(axis=0), coords.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def _window(
    bounds: tuple[float, ...], pad: int, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1): the pixels of `bounds` (x0, y0, x1, y1, pixel coordinates)
    widened by `pad`, clipped to the image; None when nothing of it is on the image."""
    x0, y0, x1, y1 = bounds
    col0, row0 = max(0, int(np.floor(x0)) - pad), max(0, int(np.floor(y0)) - pad)
    col1 = min(width, int(np.ceil(x1)) + pad + 1)
    row1 = min(height, int(np.ceil(y1)) + pad + 1)
    return None if col1 <= col0 or row1 <= row0 else (row0, col0, row1, col1)


def _burn(
    geometry: shapely.Geometry,
    row0: int,
    col0: int,
    row1: int,
    col1: int,
    all_touched: bool = False,
) -> np.ndarray:
    """The pixels of rows row0..row1, cols col0..col1 that `geometry` covers (GDAL's burn)."""
    return rasterize(
        [(geometry, 1)],
        out_shape=(row1 - row0, col1 - col0),
        transform=Affine.translation(col0, row0),
        fill=0,
        all_touched=all_touched,
        dtype="uint8",
    ).astype(bool)


def _widen(burnt: np.ndarray, radius: float, reach: int) -> np.ndarray:
    """Pixels within `radius` of a burnt pixel (centre to centre), one tile at a time."""
    from scipy.ndimage import distance_transform_edt

    h, w = burnt.shape
    covered = np.zeros_like(burnt)
    for top in range(0, h, TILE):
        for left in range(0, w, TILE):
            r0, c0 = max(0, top - reach), max(0, left - reach)
            r1, c1 = min(h, top + TILE + reach), min(w, left + TILE + reach)
            near = burnt[r0:r1, c0:c1]
            if not near.any():
                continue
            distance = distance_transform_edt(~near)
            inner = distance[top - r0 : top - r0 + TILE, left - c0 : left - c0 + TILE]
            covered[top : top + inner.shape[0], left : left + inner.shape[1]] = inner <= radius
    return covered


def _with_outline(row: int, col: int, mask: np.ndarray) -> Area:
    if not mask.any():
        return _empty()
    parts = [
        shape(geometry)
        for geometry, _ in shapes(
            mask.astype(np.uint8), mask=mask, transform=Affine.translation(col, row)
        )
    ]
    outline = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    return Area(row, col, mask, outline)


def _empty() -> Area:
    return Area(0, 0, np.zeros((0, 0), bool), shapely.Polygon())
