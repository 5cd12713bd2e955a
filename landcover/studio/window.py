"""A window of a large scene, cut once into the session folder.

The studio keeps a scene's last feature map in memory, so a whole NAIP quarter-quad (about
6000 x 7500 px, 45 Mpx) is more than it takes. A person corrects one area at a time anyway:
`--window COL ROW WIDTH HEIGHT` (pixel offsets, as `gdal_translate -srcwin` takes them) cuts
that area of the image (and of `--labels`) into the session folder as a GeoTIFF on the same
grid (CRS kept, transform shifted to the window), so the corrections, the maps and
`data=corrections` all lie exactly over the source in a GIS. The cut is recorded in the file's
tags; a session folder holds one window, and asking it for another is refused rather than
mixing two grids in one edit log.
"""

from __future__ import annotations

from pathlib import Path

import rasterio
from rasterio.windows import Window

from landcover.atomic import atomic_target
from landcover.errors import LandcoverError
from landcover.predict.writer import verify_raster

WINDOW_TAG = "landcover_studio_window"
SOURCE_TAG = "landcover_studio_source"


class WindowError(LandcoverError):
    """The window asked for cannot be cut from this scene."""


def cut_window(
    source: Path, window: tuple[int, int, int, int], folder: Path, name: str | None = None
) -> Path:
    """`source`'s pixels inside `window` (col, row, width, height) as
    `<folder>/<name or source stem>_window.tif`, written once (whole or not at all) and reused
    by a reopened session."""
    col, row, width, height = window
    source = source.resolve()
    target = folder / f"{name or source.stem}_window.tif"
    wanted = {WINDOW_TAG: f"{col},{row},{width},{height}", SOURCE_TAG: str(source)}
    if target.exists():
        with rasterio.open(target) as done:
            held = {key: done.tags().get(key) for key in wanted}
        if held == wanted:
            return target
        raise WindowError(
            f"{folder} holds the window {held[WINDOW_TAG]} of {held[SOURCE_TAG]}, not "
            f"{wanted[WINDOW_TAG]} of {source}: a session folder is one window (--session "
            "another folder)"
        )
    try:
        src_handle = rasterio.open(source)
    except rasterio.errors.RasterioIOError as err:
        raise WindowError(f"{source}: cannot be read as a raster ({err})") from err
    with src_handle as src:
        if width <= 0 or height <= 0 or col < 0 or row < 0:
            raise WindowError(
                f"--window {col} {row} {width} {height}: offsets must be 0 or more and sizes "
                "more than 0"
            )
        if col + width > src.width or row + height > src.height:
            raise WindowError(
                f"--window {col} {row} {width} {height} reaches past {source} "
                f"({src.width} x {src.height} px)"
            )
        area = Window(col, row, width, height)
        pixels = src.read(window=area)
        profile = src.profile.copy()
        profile.update(
            driver="GTiff",
            width=width,
            height=height,
            transform=src.window_transform(area),
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="deflate",
        )
        colormap = src.colormap(1) if src.count == 1 and _has_colormap(src) else None
        tags = {**src.tags(), **wanted}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_target(target) as tmp:  # a full disk named, nothing half-written left
        with rasterio.open(tmp, "w", **profile) as out:
            out.update_tags(**tags)
            if colormap is not None:  # before the pixels: GDAL fixes the photometric then
                out.write_colormap(1, colormap)
            out.write(pixels)
        verify_raster(tmp, target, pixels.shape)  # GDAL logs some write failures only
    return target


def cut_scene(
    image: Path, labels: Path | None, window: tuple[int, int, int, int], folder: Path
) -> tuple[Path, Path | None]:
    """The window of the image and of its labels (named apart even where both files share a
    stem, as `scene.tif` in two folders would)."""
    cut = cut_window(image, window, folder)
    if labels is None:
        return cut, None
    stem = labels.stem if labels.stem != image.stem else f"{labels.stem}_labels"
    return cut, cut_window(labels, window, folder, stem)


def _has_colormap(src: rasterio.io.DatasetReader) -> bool:
    try:
        src.colormap(1)
    except ValueError:  # "NULL color table": the band has none
        return False
    return True
