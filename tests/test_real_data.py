"""Checks on the REAL Chesapeake data in ../shared (skipped with a reason where it is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from landcover.config import validate_config
from landcover.data.loaders import schema_from_config, split_scenes
from landcover.data.scenes import open_raster, scan_label_codes, validate_scene
from landcover.errors import SceneError
from tests.conftest import compose_train

pytestmark = pytest.mark.shared


def sample_config(shared, *overrides):
    return validate_config(
        compose_train(
            "data=chesapeake_sample",
            f"data.root={shared / 'data' / 'chesapeake-sample'}",
            *overrides,
        )
    )


@pytest.mark.parametrize("suffix", ["_naip-old.tif", "_naip-new.tif"])
def test_real_patches_validate_without_crs(shared, suffix):
    cfg = sample_config(shared, f"data.image_suffix={suffix}")
    schema = schema_from_config(cfg.data)
    train = split_scenes(cfg.data, "train", schema)
    val = split_scenes(cfg.data, "val", schema)
    assert len(train) == 8 and len(val) >= 5
    assert all(s.crs is None and (s.width, s.height) == (256, 256) for s in train + val)
    assert all(s.image_path.endswith(suffix) for s in train)


def test_real_georeferenced_tile_keeps_its_crs(shared):
    cfg = sample_config(shared)
    tile = shared / "data" / "chesapeake-sample" / "tiles" / "m_3907833_nw_17_1"
    scene = validate_scene(
        f"{tile}_naip-old.tif", f"{tile}_lc.tif", bands=4, schema=schema_from_config(cfg.data)
    )
    assert scene.crs == "EPSG:26917"


def test_large_real_label_raster_scanned_block_by_block(shared):
    """10000 x 10000 Chesapeake 7-class product: codes 1-6 and 15 (no data), nothing else."""
    path = next((shared / "data" / "chesapeake-labels").glob("Baywide_7class_*.tif"))
    with open_raster(path) as src:
        counts = scan_label_codes(src, str(path))
    codes = set(np.flatnonzero(counts).tolist())
    assert codes <= {1, 2, 3, 4, 5, 6, 15}
    assert counts[15] > 0.5 * counts.sum()  # mostly no data (open water outside the map)
    schema = schema_from_config(sample_config(shared).data)
    assert schema.unknown_codes(codes) == []


def test_thirteen_class_raster_is_refused_by_the_four_class_schema(shared, tmp_path):
    """A label product with other codes is caught, with the codes listed."""
    from tests.conftest import write_raster

    labels = next((shared / "data" / "chesapeake-labels").glob("Baywide_13Class_*.tif"))
    with open_raster(labels) as src:
        window = src.read(1, window=((4000, 4256), (4000, 4256)))
        crs, transform = src.crs.to_string(), src.window_transform(((4000, 4256), (4000, 4256)))
    label = write_raster(tmp_path / "x_lc.tif", window, crs=crs, transform=transform)
    image = write_raster(
        tmp_path / "x_naip.tif", np.ones((4, 256, 256), np.uint8), crs=crs, transform=transform
    )
    unknown = sorted(set(np.unique(window).tolist()) - {1, 2, 3, 4, 5, 6, 15})
    if not unknown:
        pytest.skip("this window of the 13-class product holds only 7-class codes")
    with pytest.raises(SceneError, match="not in class schema") as err:
        validate_scene(
            str(image), str(label), bands=4, schema=schema_from_config(sample_config(shared).data)
        )
    assert str(label) in str(err.value)


def test_prediction_on_the_real_georeferenced_tile_round_trips(shared, tmp_path):
    """CRS, transform, colour table and COG layout survive a prediction of the real tile."""
    import rasterio

    from landcover.artifacts.reference import from_module
    from landcover.predict.predictor import PredictSettings, predict_raster
    from tests.test_predict import metadata, small_fcn

    tile = shared / "data" / "chesapeake-sample" / "tiles" / "m_3907833_nw_17_1_naip-old.tif"
    result = predict_raster(
        from_module(small_fcn(), metadata()),
        tile,
        tmp_path / "map.tif",
        PredictSettings.defaults(tile_size=128, overlap=16, progress=False),
    )
    with rasterio.open(tile) as src, rasterio.open(result.outputs["classes"]) as out:
        assert out.crs == src.crs and out.crs.to_epsg() == 26917
        assert out.transform == src.transform
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.colormap(1)[1][:3] == (0, 0, 255)
        # NIR is the 4th band, not an alpha mask: every pixel is mapped
        assert (out.read(1) != 255).all()


def test_the_nlcd_legend_lifts_the_2018_networks_rare_class_on_real_patches(shared, tmp_path):
    """The legend prior on the published 2018 network, both quarter-quads: where NLCD says
    developed (the val patches) barren + impervious is found far more often with OA intact;
    where it hardly does (the train patches) the map stays as it was."""
    from analysis.baselines import patch_pairs, score, scores_of
    from landcover import artifacts
    from landcover.artifacts.tutorial_model import load_schema
    from landcover.predict.prior import prior_table, with_prior

    cntk = shared / "models" / "seed-cntk" / "250epochs.model"
    if not cntk.is_file():
        pytest.skip(f"{cntk} is absent")
    network = artifacts.load(str(cntk), device="cpu")
    fused = with_prior(network, prior_table("nlcd_legend"))
    scheme = load_schema("chesapeake_4class")
    scores = {}
    for split in ("val", "train"):
        pairs = patch_pairs(shared / "data" / "chesapeake-sample", split, "naip-old")
        for name, model in (("plain", network), ("fused", fused)):
            folder = tmp_path / f"{split}_{name}"
            folder.mkdir()
            scores[split, name] = scores_of(score(model, pairs, scheme, folder)[0], scheme)
    val_plain, val_fused = scores["val", "plain"], scores["val", "fused"]
    assert val_fused["iou_barren_impervious"] > 2 * val_plain["iou_barren_impervious"]
    assert val_fused["iou_barren_impervious"] >= 0.15
    assert val_fused["overall_accuracy"] >= val_plain["overall_accuracy"]
    train_plain, train_fused = scores["train", "plain"], scores["train", "fused"]
    assert abs(train_fused["overall_accuracy"] - train_plain["overall_accuracy"]) < 0.002
