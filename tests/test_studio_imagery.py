"""The studio's imagery on real NAIP (band 4 tagged alpha) and on 3-, 4- and 8-band scenes:
the tiles the page shows are the file's bands after the scene's stretch, never a grey ghost."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

from landcover.errors import LandcoverError
from landcover.studio.tiles import Display, choose_bands, imagery_tile, max_zoom
from tests.conftest import write_raster

REAL_PATCH = "chesapeake-sample/val/m_3708035_ne_17_1-2_naip-old.tif"


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def expected_colours(path: Path, display: Display, kind: str) -> np.ndarray:
    """(rows, cols, 3) bytes: the file's bands for `kind` after the display's stretch, as
    rio-tiler rescales them (linear, rounded)."""
    with rasterio.open(path) as src:
        pixels = src.read(display.bands(kind))
    return np.round(display.stretched(pixels, kind) * 255).transpose(1, 2, 0)


@pytest.mark.shared
def test_real_naip_tiles_are_its_bands_not_its_alpha(shared):
    """Real NAIP tags band 4 (near-infrared) as alpha: before, the tile was RGB 0 with the
    near-infrared as its transparency. Now true and false colour are the file's bands."""
    path = shared / "data" / REAL_PATCH
    with rasterio.open(path) as src:
        assert src.colorinterp[3] == ColorInterp.alpha  # the file as the USDA tags it
    display = Display.of(path)
    assert display.rgb == (1, 2, 3) and display.nir == 4
    z = max_zoom(path)
    for kind in ("rgb", "nir"):
        tile = png_pixels(imagery_tile(display, kind, 0, 0, z))
        assert (tile[..., 3] == 255).all()  # opaque: no band is anybody's alpha
        shown = tile[:256, :256, :3].astype(int)
        expected = expected_colours(path, display, kind)
        assert np.abs(shown - expected).max() <= 1, kind
        assert shown.std() > 20  # a picture, not a ghost


def test_bands_are_chosen_from_names_interpretation_or_count(tmp_path):
    rng = np.random.default_rng(0)

    def scene(name: str, count: int, **profile) -> Path:
        image = rng.integers(1, 255, (count, 32, 32), dtype=np.uint8)
        path = write_raster(tmp_path / name, image)
        with rasterio.open(path, "r+") as dst:
            if "interpretation" in profile:
                dst.colorinterp = profile["interpretation"]
            for band, description in enumerate(profile.get("descriptions", []), start=1):
                dst.set_band_description(band, description)
        return path

    assert choose_bands(scene("three.tif", 3)) == ((1, 2, 3), None)
    assert choose_bands(scene("naip.tif", 4)) == ((1, 2, 3), 4)
    assert choose_bands(scene("worldview.tif", 8)) == ((5, 3, 2), 7)
    named = scene("named.tif", 4, descriptions=["nir", "blue", "green", "red"])
    assert choose_bands(named) == ((4, 3, 2), 1)
    bgr = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    assert choose_bands(scene("bgr.tif", 4, interpretation=bgr)) == ((3, 2, 1), 4)
    assert Display.of(scene("three_again.tif", 3)).bands("nir") is None  # no false colour
    with pytest.raises(LandcoverError, match="band 9 does not exist.*--nir-band"):
        Display.of(scene("four.tif", 4), nir=9)


def test_corrections_are_outlined_apart_from_the_map(tmp_path):
    """Corrections in the map's colours, inside a white outline and a dark one outside it."""
    from landcover.studio.tiles import outlined_tile

    codes = np.full((1, 64, 64), 255, np.uint8)  # 255: not corrected
    codes[0, 20:40, 10:30] = 1
    path = write_raster(tmp_path / "corrections.tif", codes)
    colours = {1: (0, 0, 255, 255), 255: (0, 0, 0, 0)}
    tile = png_pixels(outlined_tile(path, colours, 0, 0, max_zoom(path)))[:64, :64]
    assert tuple(tile[30, 20]) == (0, 0, 255, 255)  # inside: the class's colour
    assert tuple(tile[20, 20]) == (255, 255, 255, 255)  # its edge: white
    assert tuple(tile[19, 20][:3]) == (20, 20, 20)  # just outside: dark
    assert tile[5, 5, 3] == 0 and tile[30, 50, 3] == 0  # elsewhere: the map shows through
