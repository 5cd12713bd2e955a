"""Test-time augmentation: transforms undone exactly, invariant models unchanged, maps seamless."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from landcover.artifacts.reference import from_module
from landcover.config import PredictSettings
from landcover.errors import ConfigValueError
from landcover.predict import tta
from landcover.predict.predictor import predict_raster
from tests.conftest import write_raster

SCHEMA = {
    "name": "three",
    "classes": [{"name": n, "color": "#000000", "codes": [i]} for i, n in enumerate("abc")],
    "ignore_codes": [],
}
METADATA = {"schema": SCHEMA, "bands": 4, "output_margin": 0, "size_divisor": 1}


def network(kernel: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 3, kernel, padding=kernel // 2),
    ).eval()


def test_every_transform_is_undone_and_d4_has_eight_distinct_ones():
    batch = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    seen = set()
    for transform in tta.MODES["d4"]:
        moved = tta.apply(batch, transform)
        assert np.array_equal(tta.undo(moved, transform), batch)
        seen.add(tuple(moved.flatten().tolist()))
    assert len(seen) == 8
    assert set(tta.MODES["flips"]) < set(tta.MODES["d4"]) and len(tta.MODES["flips"]) == 4


def probabilities_of(module: torch.nn.Module, mode: str, tmp_path) -> np.ndarray:
    rng = np.random.default_rng(0)
    scene = tmp_path / "scene.tif"
    if not scene.exists():
        write_raster(scene, rng.integers(0, 255, (4, 150, 130), dtype=np.uint8))
    settings = PredictSettings.defaults(
        tile_size=64, overlap=16, progress=False, probabilities=True, backend="torch", tta=mode
    )
    output = tmp_path / f"map_{mode}_{id(module)}.tif"
    predict_raster(from_module(module, METADATA), scene, output, settings)
    with rasterio.open(str(output).replace(".tif", "_probabilities.tif")) as src:
        return src.read().astype(np.int16)


def test_a_symmetric_model_maps_the_same_with_and_without_tta(tmp_path):
    pointwise = network(1)  # 1 x 1 convolutions: invariant to every flip and turn
    plain = probabilities_of(pointwise, "none", tmp_path)
    for mode in ("flips", "d4"):
        assert np.abs(probabilities_of(pointwise, mode, tmp_path) - plain).max() <= 1


def test_an_asymmetric_model_changes_under_tta_without_seams(tmp_path):
    spatial = network(3)  # random 3 x 3 kernels see orientation
    plain = probabilities_of(spatial, "none", tmp_path)
    averaged = probabilities_of(spatial, "d4", tmp_path)
    assert np.abs(averaged - plain).max() > 5
    # seams would show as jumps along tile borders (cores of 48 px): compare the mean step
    # across a border with the mean step inside tiles
    steps = np.abs(np.diff(averaged.astype(np.float32), axis=2)).mean(axis=(0, 1))
    borders = [c - 1 for c in range(48, averaged.shape[2], 48)]
    inside = np.delete(steps, borders)
    assert steps[borders].mean() < 2 * inside.mean() + 1


def test_softmax_matches_torch():
    logits = np.random.default_rng(0).normal(0, 20, (2, 5, 7, 3)).astype(np.float32)
    expected = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(tta.softmax(logits.copy()), expected, atol=1e-6)


def test_unknown_mode_and_turns_of_oblong_tiles_are_config_errors():
    with pytest.raises(ConfigValueError, match="predict.tta='d8'"):
        tta.check_mode("d8", 64, 64)
    with pytest.raises(ConfigValueError, match="square tiles"):
        tta.check_mode("d4", 64, 32)
    assert tta.check_mode("flips", 64, 32) == tta.MODES["flips"]
