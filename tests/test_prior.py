"""A prior layer (NLCD) fused into a model's map: the table's factors, the tiled predictor
reading the layer on the input's grid, the errors for a missing or misaligned layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from landcover.artifacts.reference import LoadedModel
from landcover.config import validate_config
from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError, ConfigValueError, SceneError
from landcover.predict.predictor import PredictSettings, predict_raster, prior_layer_path
from landcover.predict.prior import PriorLayer, literal_template, prior_table, with_prior
from tests.conftest import compose_train, write_raster

SCHEMA = ClassSchema.from_config(
    {
        "name": "three",
        "classes": [
            {"name": "water", "color": "#0000ff", "codes": [1]},
            {"name": "trees", "color": "#008000", "codes": [2]},
            {"name": "barren_impervious", "color": "#808080", "codes": [4]},
        ],
    }
)
TABLE = {
    "name": "test",
    "reference": {"barren_impervious": 0.05},
    "codes": {22: {"barren_impervious": 0.35}},
}


def test_a_code_scales_its_stated_class_and_shares_the_rest_and_others_change_nothing():
    prior = PriorLayer.from_metadata(TABLE, SCHEMA)
    np.testing.assert_allclose(prior.factors[22], [0.65 / 0.95, 0.65 / 0.95, 0.35 / 0.05])
    assert np.all(prior.factors[41] == 1) and np.all(prior.factors[0] == 1)
    probabilities = np.array([0.1, 0.6, 0.3], np.float32)[:, None, None] * np.ones((3, 1, 2))
    fused = prior.reweight(probabilities.astype(np.float32), np.array([[22, 41]], np.uint8))
    np.testing.assert_allclose(fused.sum(axis=0), 1, rtol=1e-6)
    assert fused[:, 0, 0].argmax() == 2  # developed: barren wins
    np.testing.assert_allclose(fused[:, 0, 1], [0.1, 0.6, 0.3], rtol=1e-6)  # said nothing


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({**TABLE, "codes": {22: {"road": 0.3}}}, "names class 'road'"),
        ({**TABLE, "codes": {22: {"barren_impervious": 1.5}}}, r"must be in \[0, 1\]"),
        ({**TABLE, "codes": {22: {"water": 0.5}}}, "no reference share"),
        ({**TABLE, "codes": {300: {"barren_impervious": 0.5}}}, "not a uint8 layer code"),
        ({**TABLE, "reference": {"barren_impervious": 0.0}}, r"must be in \(0, 1\)"),
    ],
)
def test_a_bad_table_is_one_error_naming_the_key(table, message):
    with pytest.raises(ConfigValueError, match=message):
        PriorLayer.from_metadata(table, SCHEMA)


def constant_model(probabilities: list[float]) -> LoadedModel:
    """Every pixel gets the same class probabilities (log-probabilities as logits)."""
    logits = np.log(np.asarray(probabilities, np.float32))[None, :, None, None]

    def forward(pixels: np.ndarray) -> np.ndarray:
        return np.broadcast_to(logits, (pixels.shape[0], 3, *pixels.shape[2:])).copy()

    metadata = {"schema": SCHEMA.to_dict(), "bands": 4, "arch": "constant"}
    return LoadedModel(forward=forward, metadata=metadata, reference="constant", kind="test")


@pytest.fixture
def image_and_layer(tmp_path):
    image = write_raster(tmp_path / "tile.tif", np.full((4, 64, 96), 100, np.uint8))
    codes = np.full((64, 96), 41, np.uint8)
    codes[:, :40] = 22  # developed on the left
    return image, write_raster(tmp_path / "tile_nlcd.tif", codes)


def test_the_predictor_fuses_the_layer_pixel_by_pixel(image_and_layer, tmp_path):
    image, layer = image_and_layer
    model = with_prior(constant_model([0.1, 0.6, 0.3]), TABLE)
    settings = PredictSettings.defaults(
        tile_size=64, overlap=16, progress=False, prior_layer="{dir}/{stem}_nlcd.tif"
    )
    result = predict_raster(model, image, tmp_path / "map.tif", settings)
    with rasterio.open(result.outputs["classes"]) as src:
        classes = src.read(1)
    assert np.all(classes[:, :40] == 4) and np.all(classes[:, 40:] == 2)  # barren | trees
    off = dataclasses.replace(settings, use_prior=False)
    result = predict_raster(model, image, tmp_path / "plain.tif", off)
    with rasterio.open(result.outputs["classes"]) as src:
        assert np.all(src.read(1) == 2)


def test_a_model_with_a_prior_refuses_to_map_without_its_layer(image_and_layer, tmp_path):
    image, _ = image_and_layer
    model = with_prior(constant_model([0.1, 0.6, 0.3]), TABLE)
    settings = PredictSettings.defaults(tile_size=64, overlap=16, progress=False)
    with pytest.raises(ConfigValueError, match="predict.prior_layer"):
        predict_raster(model, image, tmp_path / "map.tif", settings)
    assert not (tmp_path / "map.tif").exists()
    missing = dataclasses.replace(settings, prior_layer=str(tmp_path / "nowhere.tif"))
    with pytest.raises(SceneError, match="nowhere.tif: file does not exist"):
        predict_raster(model, image, tmp_path / "map.tif", missing)


def test_a_layer_off_the_image_grid_is_an_error_naming_both_files(image_and_layer, tmp_path):
    image, _ = image_and_layer
    shifted = write_raster(
        tmp_path / "shifted.tif",
        np.full((64, 96), 22, np.uint8),
        transform=from_origin(400001, 4300000, 1, 1),
    )
    model = with_prior(constant_model([0.1, 0.6, 0.3]), TABLE)
    settings = PredictSettings.defaults(
        tile_size=64, overlap=16, progress=False, prior_layer=literal_template(str(shifted))
    )
    with pytest.raises(SceneError, match="transform mismatch: .*tile.tif.*shifted.tif"):
        predict_raster(model, image, tmp_path / "map.tif", settings)
    assert not (tmp_path / "map.tif").exists()
    wide = write_raster(tmp_path / "two_bands.tif", np.full((2, 64, 96), 22, np.uint8))
    settings = dataclasses.replace(settings, prior_layer=literal_template(str(wide)))
    with pytest.raises(SceneError, match="one uint8 band"):
        predict_raster(model, image, tmp_path / "map.tif", settings)


def test_the_nlcd_legend_composes_and_must_name_the_datas_classes():
    cfg = validate_config(compose_train("data=chesapeake_sample", "prior=nlcd_legend"))
    assert cfg.prior.codes[22]["barren_impervious"] == pytest.approx(0.345)
    assert cfg.data.prior_suffix == "_nlcd.tif"
    six = compose_train(
        "data=chesapeake_sample", "prior=nlcd_legend", "data/schema=chesapeake_6class"
    )
    with pytest.raises(ConfigError, match="barren_impervious"):
        validate_config(six)
    assert prior_table("nlcd_legend")["name"] == "nlcd_legend"
    with pytest.raises(ConfigValueError, match="no .*nowhere.yaml"):
        prior_table("nowhere")


def test_the_layer_template_names_the_inputs_folder_and_stem_for_paths_and_urls():
    model = constant_model([0.1, 0.6, 0.3])
    template = "{dir}/{stem}_nlcd.tif"
    assert (
        prior_layer_path(template, "/data/a/m_1_naip.tif", model, "p")
        == "/data/a/m_1_naip_nlcd.tif"
    )
    assert (
        prior_layer_path(template, "https://host/cogs/m_1.tif", model, "p")
        == "https://host/cogs/m_1_nlcd.tif"
    )
    assert prior_layer_path(template, "m_1.tif", model, "p") == "./m_1_nlcd.tif"
    with pytest.raises(ConfigValueError, match=r"only \{stem\} and \{dir\}"):
        prior_layer_path("{name}.tif", "/data/m_1.tif", model, "p")


def test_a_truncated_layer_fails_naming_it_and_leaves_no_map(tmp_path):
    image = write_raster(tmp_path / "tile.tif", np.full((4, 256, 256), 100, np.uint8))
    codes = np.random.default_rng(0).integers(0, 100, (256, 256), dtype=np.uint8)
    layer = write_raster(tmp_path / "tile_nlcd.tif", codes)  # incompressible: truncation bites
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    model = with_prior(constant_model([0.1, 0.6, 0.3]), TABLE)
    settings = PredictSettings.defaults(
        tile_size=64, overlap=16, progress=False, prior_layer=literal_template(str(layer))
    )
    with pytest.raises(SceneError, match="tile_nlcd.tif"):
        predict_raster(model, image, tmp_path / "map.tif", settings)
    assert not (tmp_path / "map.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tile.tif", "tile_nlcd.tif"]
