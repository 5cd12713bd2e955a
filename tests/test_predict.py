"""Tiled prediction: exact where it should be, seamless where it blends, GIS-ready, safe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from landcover import artifacts
from landcover.artifacts.reference import ModelReferenceError, from_module
from landcover.data.scenes import SceneError
from landcover.models import SegmentationModel, build_model
from landcover.predict.predictor import PredictSettings, predict_raster
from landcover.predict.writer import NODATA, OutputError
from tests.conftest import write_raster

SCHEMA = {
    "name": "three",
    "classes": [
        {"name": "water", "color": "#0000ff", "codes": [1]},
        {"name": "trees", "color": "#008000", "codes": [2]},
        {"name": "field", "color": "#80ff80", "codes": [3]},
    ],
    "ignore_codes": [15],
}


def metadata(margin: int = 0, divisor: int = 1) -> dict:
    return {"schema": SCHEMA, "bands": 4, "output_margin": margin, "size_divisor": divisor}


def small_fcn() -> SegmentationModel:
    """Receptive field 7 px: with >= 3 px of context, tiles reproduce a full pass exactly."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 3, 3, padding=1),
    )
    return SegmentationModel(net, mean=[128.0] * 4, std=[64.0] * 4, size_divisor=1).eval()


def random_scene(tmp_path, height=150, width=130, crs="EPSG:26918", nodata=None):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (4, height, width), dtype=np.uint8)
    path = write_raster(
        tmp_path / "scene.tif", pixels, crs=crs, transform=from_origin(500000, 4200000, 2.0, 2.0)
    )
    if nodata is not None:
        with rasterio.open(path, "r+") as dst:
            dst.nodata = nodata
    return path, pixels


def capture_probabilities(height, width, classes=3):
    canvas = np.full((classes, height, width), np.nan, dtype=np.float32)

    def on_rows(row, _classes, _confidence, probabilities):
        canvas[:, row : row + probabilities.shape[1]] = probabilities

    return canvas, on_rows


def full_pass(module, pixels, context):
    padded = np.pad(pixels, ((0, 0), (context, context), (context, context)), mode="symmetric")
    with torch.inference_mode():
        logits = module(torch.from_numpy(padded)[None].float())[0]
    return torch.softmax(logits, 0)[:, context:-context, context:-context].numpy()


def test_centre_mode_equals_a_full_raster_pass(tmp_path):
    path, pixels = random_scene(tmp_path)
    module = small_fcn()
    canvas, on_rows = capture_probabilities(150, 130)
    result = predict_raster(
        from_module(module, metadata()),
        path,
        tmp_path / "out.tif",
        PredictSettings.defaults(tile_size=40, overlap=16, mode="centre", progress=False),
        on_rows=on_rows,
        keep_probabilities=True,
    )
    expected = full_pass(module, pixels, 8)
    np.testing.assert_allclose(canvas, expected, atol=1e-5)
    with rasterio.open(result.outputs["classes"]) as out:
        codes = out.read(1)
    np.testing.assert_array_equal(codes, np.array([1, 2, 3], np.uint8)[expected.argmax(0)])


def test_blending_leaves_no_seams(tmp_path):
    """Seam lines (tile core borders) must jump no more than ordinary neighbouring columns;
    the same tiles merged without context or blending do show the seams (control)."""
    path, _ = random_scene(tmp_path, 192, 192)
    torch.manual_seed(0)
    model = build_model(
        {
            "arch": "unet",
            "encoder_name": "resnet18",
            "encoder_depth": 3,
            "encoder_weights": None,
            "decoder_channels": [32, 16, 8],
        },
        in_channels=4,
        num_classes=3,
        mean=[128.0] * 4,
        std=[64.0] * 4,
    ).eval()
    loaded = from_module(model, metadata(divisor=8))

    def column_jumps(settings):
        canvas, on_rows = capture_probabilities(192, 192)
        predict_raster(
            loaded, path, tmp_path / "x.tif", settings, on_rows=on_rows, keep_probabilities=True
        )
        return np.abs(np.diff(canvas, axis=2)).mean(axis=(0, 1))  # jump between col k and k+1

    blended = column_jumps(
        PredictSettings.defaults(tile_size=64, overlap=32, mode="blend", progress=False)
    )
    hard = column_jumps(
        PredictSettings.defaults(tile_size=64, overlap=0, mode="centre", progress=False)
    )
    seams = [47, 95, 143]  # blend: cores of 48 px; the jump sits between col 47 and col 48
    hard_seams = [63, 127]  # no context: cores of 64 px
    typical = np.median(blended)
    assert max(blended[s] for s in seams) < 1.5 * typical
    assert min(hard[s] for s in hard_seams) > 1.5 * np.median(hard)  # the control shows seams


def test_output_keeps_georeferencing_colour_table_and_is_a_cog(tmp_path):
    path, _ = random_scene(tmp_path, 1100, 1050)
    result = predict_raster(
        from_module(small_fcn(), metadata()),
        path,
        tmp_path / "map.tif",
        PredictSettings.defaults(
            tile_size=256, overlap=16, progress=False, confidence=True, probabilities=True
        ),
    )
    with rasterio.open(path) as src, rasterio.open(result.outputs["classes"]) as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.overviews(1)  # overviews for a raster larger than one block
        assert out.block_shapes[0] == (512, 512)
        assert out.colormap(1)[1][:3] == (0, 0, 255)
        assert json.loads(out.tags()["class_names"]) == ["water", "trees", "field"]
        assert out.nodata == NODATA
    with rasterio.open(result.outputs["probabilities"]) as probs:
        assert probs.count == 3
    assert result.outputs["confidence"].exists()
    table = result.area_table.rows()
    assert sum(r["pixels"] for r in table) == 1100 * 1050
    assert sum(r["area_m2"] for r in table) == pytest.approx(1100 * 1050 * 4.0)
    assert sum(r["share_percent"] for r in table) == pytest.approx(100.0)


def test_no_crs_in_gives_no_crs_out(tmp_path):
    path, _ = random_scene(tmp_path, 64, 64, crs=None)
    result = predict_raster(
        from_module(small_fcn(), metadata()),
        path,
        tmp_path / "map.tif",
        PredictSettings.defaults(tile_size=32, overlap=8, progress=False),
    )
    with rasterio.open(result.outputs["classes"]) as out:
        assert out.crs is None
    assert all(r["area_m2"] is None for r in result.area_table.rows())


def test_input_nodata_stays_nodata(tmp_path):
    path, _ = random_scene(tmp_path, 64, 64)
    with rasterio.open(path, "r+") as dst:
        pixels = dst.read()
        pixels[:, :10, :20] = 0
        dst.write(pixels)
        dst.nodata = 0
    result = predict_raster(
        from_module(small_fcn(), metadata()),
        path,
        tmp_path / "map.tif",
        PredictSettings.defaults(tile_size=32, overlap=8, progress=False),
    )
    with rasterio.open(result.outputs["classes"]) as out:
        codes = out.read(1)
    assert (codes[:10, :20] == NODATA).all()
    assert (codes[10:, :] != NODATA).all()
    assert sum(r["pixels"] for r in result.area_table.rows()) == 64 * 64 - 200


def test_centre_output_model_tiles_with_its_margin(tmp_path):
    path, _ = random_scene(tmp_path, 300, 260)
    seed = build_model(
        {"arch": "seed"}, in_channels=4, num_classes=3, mean=[0.0] * 4, std=[256.0] * 4
    ).eval()
    loaded = from_module(seed, metadata(margin=64, divisor=8))
    result = predict_raster(
        loaded, path, tmp_path / "map.tif", PredictSettings.defaults(tile_size=256, progress=False)
    )
    with rasterio.open(result.outputs["classes"]) as out:
        assert out.shape == (300, 260)
        assert set(np.unique(out.read(1))) <= {1, 2, 3}
    with pytest.raises(ValueError, match="needs a full-output model"):
        predict_raster(loaded, path, tmp_path / "b.tif", PredictSettings.defaults(mode="blend"))


def test_wrong_band_count_is_refused_before_writing(tmp_path):
    path = write_raster(tmp_path / "rgb.tif", np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(SceneError, match="has 3 band") as err:
        predict_raster(from_module(small_fcn(), metadata()), path, tmp_path / "map.tif")
    assert str(path) in str(err.value) and "expects 4" in str(err.value)
    assert not (tmp_path / "map.tif").exists()


def test_unreadable_input(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(SceneError, match="not a readable raster"):
        predict_raster(from_module(small_fcn(), metadata()), junk, tmp_path / "map.tif")


def test_output_directory_missing_or_not_a_directory(tmp_path):
    path, _ = random_scene(tmp_path, 32, 32)
    with pytest.raises(OutputError, match="does not exist"):
        predict_raster(from_module(small_fcn(), metadata()), path, tmp_path / "no" / "map.tif")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        predict_raster(from_module(small_fcn(), metadata()), path, blocker / "map.tif")


def test_interrupted_prediction_leaves_nothing_behind(tmp_path):
    path, _ = random_scene(tmp_path, 128, 128)
    calls = []

    def interrupt(row, *_):
        calls.append(row)
        raise KeyboardInterrupt

    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    (out_dir / "map.tif").write_bytes(b"previous map")  # an earlier result must survive
    with pytest.raises(KeyboardInterrupt):
        predict_raster(
            from_module(small_fcn(), metadata()),
            path,
            out_dir / "map.tif",
            PredictSettings.defaults(tile_size=32, overlap=8, progress=False),
            on_rows=interrupt,
        )
    assert calls
    assert sorted(p.name for p in out_dir.iterdir()) == ["map.tif"]
    assert (out_dir / "map.tif").read_bytes() == b"previous map"


def test_missing_model_reference(tmp_path):
    with pytest.raises(ModelReferenceError, match="does not exist"):
        artifacts.load(str(tmp_path / "nothing.pt"))
    with pytest.raises(ModelReferenceError, match="ONNX file does not exist"):
        artifacts.load(str(tmp_path / "nothing.onnx"))
    with pytest.raises(ModelReferenceError, match="cannot be loaded"):
        artifacts.load(
            "models:/no-such-model@champion", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"
        )
