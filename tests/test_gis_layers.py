"""What a GIS user opens: class maps with their classes' style, probabilities as numbers (no
colour interpretation, one band per class named by it), confidence with its scale, areas in
hectares."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import rasterio
from rasterio.enums import ColorInterp

from tests.test_faults import random_raster, tiny_model_checkpoint


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    from landcover import artifacts
    from landcover.predict.predictor import PredictSettings, predict_raster

    tmp = tmp_path_factory.mktemp("gis")
    model = artifacts.load(str(tiny_model_checkpoint(tmp)))
    scene = random_raster(tmp / "scene.tif", 128)
    settings = PredictSettings.defaults(
        progress=False, confidence=True, probabilities=True, backend="torch"
    )
    result = predict_raster(model, scene, tmp / "map.tif", settings)
    return result, model.metadata["schema"]["classes"]


def test_probabilities_are_numbers_named_by_class_not_colours(mapped):
    result, classes = mapped
    with rasterio.open(result.outputs["probabilities"]) as src:
        assert src.count == len(classes)
        assert ColorInterp.alpha not in src.colorinterp
        assert src.colorinterp[1:] == tuple([ColorInterp.undefined] * (src.count - 1))
        assert list(src.descriptions) == [c["name"] for c in classes]
        assert src.scales == tuple([pytest.approx(1 / 255)] * src.count)
    with rasterio.open(result.outputs["confidence"]) as src:
        assert src.scales[0] == pytest.approx(1 / 255)
        assert "probability" in src.descriptions[0]


def test_a_class_map_has_a_qgis_style_with_exactly_its_classes(mapped):
    result, classes = mapped
    style = Path(result.outputs["classes"]).with_suffix(".qml")
    entries = ET.parse(style).getroot().findall(".//paletteEntry")
    assert [e.get("label") for e in entries] == [c["name"] for c in classes]
    assert [int(e.get("value")) for e in entries] == [c["codes"][0] for c in classes]
    assert [e.get("color") for e in entries] == [c["color"].lower() for c in classes]


def test_areas_come_in_hectares_too(mapped):
    result, _ = mapped
    rows = result.area_table.rows()
    assert all(r["area_ha"] == pytest.approx(r["area_m2"] / 1e4) for r in rows)
    assert result.area_table.to_csv().splitlines()[0].split(",")[4] == "area_ha"


def test_vectorize_polygons_add_up_to_the_area_table(mapped, tmp_path):
    """Per class, the polygons' total area equals the raster's area table (within one
    pixel's area per polygon), also when the map is read in strips that cut regions."""
    import shutil

    import pyogrio

    from landcover.predict.vectorize import vectorize_map

    result, classes = mapped
    class_map = tmp_path / "map.tif"
    shutil.copy(result.outputs["classes"], class_map)
    gpkg = vectorize_map(class_map, rows=32)
    meta, _, _, fields = pyogrio.raw.read(gpkg, layer="classes")
    assert meta["crs"] and meta["geometry_type"] == "Polygon"
    columns = dict(zip(meta["fields"], fields, strict=True))
    pixel = 1.0  # the test raster's pixels are 1 m
    for row in result.area_table.rows():
        mine = columns["code"] == row["code"]
        total = float(columns["area_m2"][mine].sum())
        assert abs(total - row["area_m2"]) <= pixel * max(int(mine.sum()), 1), row
        assert set(columns["class"][mine]) <= {row["class"]}
        assert columns["area_ha"][mine].sum() == pytest.approx(total / 1e4)
    _, _, _, bigger = pyogrio.raw.read(vectorize_map(class_map, min_area=20.0))
    assert (bigger[2] >= 20.0).all()


def test_the_region_overview_opens_on_its_own(mapped, tmp_path):
    """What the job's run holds of the region: a COG, not a VRT naming maps it does not hold."""
    from landcover.mapping import region

    result, classes = mapped
    class_map = Path(result.outputs["classes"])
    mosaic = region.write_mosaics(tmp_path, region.by_crs([class_map]))["EPSG:26918"]
    overview = region.write_overview(mosaic, class_map, max_size=32)
    with rasterio.open(mosaic) as full, rasterio.open(overview) as small:
        assert small.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert (small.width, small.height) == (32, 32) and small.crs == full.crs
        assert small.bounds == pytest.approx(full.bounds)
        codes = {c["codes"][0] for c in classes}
        assert set(small.read(1).ravel().tolist()) <= codes | {small.nodata}
        assert small.colorinterp[0] == ColorInterp.palette
    names = region.category_names(Path(f"{overview}.aux.xml"))
    assert [names[c["codes"][0]] for c in classes] == [c["name"] for c in classes]
    assert overview.with_suffix(".qml").is_file()


def test_the_quicklook_has_the_regions_shape_and_a_scale_bar():
    import numpy as np
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from landcover.tracking.figures import quicklook_figure

    codes = np.ones((40, 100), dtype=np.uint8)  # pixels twice as tall as wide on the ground
    colours = {1: (0, 128, 0, 255)}
    figure = quicklook_figure(codes, colours, {1: "trees"}, "t", (0, 100, 0, 80), metres=True)
    width, height = figure.get_size_inches()
    assert (height - 0.8) / width == pytest.approx(0.8)  # 100 m wide, 80 m tall
    (bar,) = [a for a in figure.axes[0].artists if isinstance(a, AnchoredSizeBar)]
    assert bar.txt_label.get_text() == "20 m"


SYSTEM_PYTHON = Path("/usr/bin/python3")


def qgis_available() -> str | None:
    """Why PyQGIS cannot run here, or None (Debian's python3-qgis; `.ci/run` installs it)."""
    import subprocess

    if not SYSTEM_PYTHON.exists():
        return f"{SYSTEM_PYTHON} is absent"
    probe = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import qgis.core"], capture_output=True, text=True
    )
    return None if probe.returncode == 0 else "PyQGIS is not installed (apt install python3-qgis)"


@pytest.mark.slow  # starts QGIS three times
def test_qgis_draws_the_map_and_its_region_with_the_models_legend(mapped, tmp_path):
    import json
    import os
    import subprocess

    import numpy as np
    from PIL import Image

    from landcover.mapping import region

    reason = qgis_available()
    if reason:
        pytest.skip(reason)
    result, classes = mapped
    class_map = Path(result.outputs["classes"])
    mosaic = region.write_mosaics(tmp_path, region.by_crs([class_map]))["EPSG:26918"]
    overview = region.write_overview(mosaic, class_map, max_size=64)
    colours = {tuple(int(c["color"][i : i + 2], 16) for i in (1, 3, 5)) for c in classes}
    for raster in (class_map, mosaic, overview):
        png = tmp_path / f"{raster.name}.png"
        done = subprocess.run(
            [
                str(SYSTEM_PYTHON),
                str(Path(__file__).with_name("qgis_render.py")),
                str(raster),
                str(png),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        said = json.loads(done.stdout.strip().splitlines()[-1])
        assert said["style"] and said["renderer"] == "paletted", (raster.name, said)
        assert [label for label, _ in said["legend"]] == [c["name"] for c in classes]
        assert [colour for _, colour in said["legend"]] == [c["color"].lower() for c in classes]
        drawn = {tuple(p) for p in np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)}
        assert drawn <= colours | {(255, 255, 255)}, (raster.name, drawn - colours)
        assert len(drawn & colours) >= 2  # the map itself, in the model's colours
