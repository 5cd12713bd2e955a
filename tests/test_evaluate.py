"""The disagreement map marks exactly the pixels where the model is sure and the label differs."""

from __future__ import annotations

import numpy as np
import rasterio
import torch
from torch import nn

from landcover.artifacts.reference import from_module
from landcover.data.scenes import validate_scene
from landcover.data.schema import ClassSchema
from landcover.evaluate import DISAGREE, UNLABELLED, evaluate_scene
from landcover.predict.predictor import PredictSettings
from tests.conftest import write_raster
from tests.test_predict import SCHEMA


class BandsAreLogits(nn.Module):
    """Logits are the first three bands / 10: the test decides every pixel's prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3].float() / 10


def test_disagreement_marks_exactly_the_confident_wrong_pixels(tmp_path):
    rng = np.random.default_rng(0)
    height, width = 96, 80
    # background: logits within 1.5 of each other, never 90 % sure
    logits = rng.integers(0, 16, size=(3, height, width)).astype(np.uint8)
    # two solid blobs where the model is certain of class 0 (water)
    logits[:, 10:30, 10:40] = np.array([60, 0, 0], np.uint8)[:, None, None]
    logits[:, 60:70, 50:55] = np.array([60, 0, 0], np.uint8)[:, None, None]
    logits[:, 80:82, 70:72] = np.array([0, 60, 0], np.uint8)[:, None, None]  # 4 px: too small
    image = np.concatenate([logits, np.zeros((1, height, width), np.uint8)])
    labels = rng.integers(1, 4, size=(height, width)).astype(np.uint8)
    labels[10:30, 10:40] = 2  # the labels say trees
    labels[60:70, 50:55] = 3  # the labels say field
    labels[80:82, 70:72] = 1
    labels[0:5, :] = 15  # no data
    image_path = write_raster(tmp_path / "scene_naip.tif", image)
    label_path = write_raster(tmp_path / "scene_lc.tif", labels)
    schema = ClassSchema.from_config(SCHEMA)
    scene = validate_scene(str(image_path), str(label_path), bands=4, schema=schema)
    model = from_module(BandsAreLogits(), {"schema": SCHEMA, "bands": 4, "size_divisor": 1})
    out = tmp_path / "eval"
    out.mkdir()
    result = evaluate_scene(
        model,
        scene,
        out,
        PredictSettings.defaults(tile_size=32, overlap=8, confidence=True, progress=False),
        threshold=0.9,
        min_region_pixels=10,
    )

    probabilities = torch.softmax(torch.from_numpy(logits).float() / 10, 0).numpy()
    predicted, confidence = probabilities.argmax(0), probabilities.max(0)
    target = schema.lookup_table()[labels]
    expected = np.where((predicted != target) & (confidence >= 0.9), DISAGREE, 0)
    expected[target == 255] = UNLABELLED
    with rasterio.open(result.outputs["disagreement"]) as dis:
        mask = dis.read(1)
        assert dis.crs is not None and dis.colormap(1)[DISAGREE][:3] == (255, 0, 255)
    np.testing.assert_array_equal(mask, expected)
    assert (mask[10:30, 10:40] == DISAGREE).all()
    # low-confidence errors are not marked
    unsure_wrong = (predicted != target) & (confidence < 0.9) & (target != 255)
    assert unsure_wrong.any() and (mask[unsure_wrong] == 0).all()

    # the streamed confusion matrix counts every labelled pixel once
    assert result.matrix.sum() == (target != 255).sum()
    expected_matrix = np.zeros((3, 3), int)
    np.add.at(expected_matrix, (target[target != 255], predicted[target != 255]), 1)
    np.testing.assert_array_equal(result.matrix, expected_matrix)

    # the two planted blobs are the two largest regions, largest first, with their classes
    assert [r["pixels"] for r in result.regions] == [600, 50]  # the 4 px blob is below 10
    top = result.regions
    assert top[0]["label_class"] == "trees" and top[0]["predicted_class"] == "water"
    assert (top[0]["row_min"], top[0]["col_min"], top[0]["row_max"], top[0]["col_max"]) == (
        10,
        10,
        29,
        39,
    )
    assert top[1]["label_class"] == "field"
    assert top[0]["mean_confidence"] > 0.9


def test_per_scene_table_tolerates_metrics_missing_for_some_scenes():
    """A scene without a class has no precision for it: the CSV still holds every column."""
    from landcover.evaluate import _csv

    text = _csv(
        [{"scene": "a", "iou_water": 0.5}, {"scene": "b", "iou_water": 0.4, "precision_road": 0.9}]
    )
    assert text.splitlines() == ["scene,iou_water,precision_road", "a,0.5,", "b,0.4,0.9"]
