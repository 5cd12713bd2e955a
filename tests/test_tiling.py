import numpy as np
import pytest

from landcover.config import TrainConfig, TrainerConfig, train_settings, validate_config
from landcover.predict.tiling import StripAccumulator, TileLayout, blend_weights
from landcover.training.loop import EarlyStopping
from tests.conftest import compose_train


def test_layout_covers_the_raster_with_cores():
    layout = TileLayout(width=1000, height=700, tile=512, context=32)
    assert layout.core == 448
    assert (layout.rows, layout.cols) == (2, 3)
    assert layout.col_lefts() == [0, 448, 896]
    with pytest.raises(ValueError, match="leaves no core"):
        TileLayout(width=10, height=10, tile=64, context=32)


def test_blend_weights_ramp_across_the_overlap():
    weights = blend_weights(64, 8)
    assert weights.shape == (64, 64)
    assert weights[32, 32] == 1.0 and weights.min() > 0
    # two neighbours overlapping by 2 x context sum to a constant across the overlap
    ramp = weights[32]
    overlap = ramp[48:] + ramp[:16]
    np.testing.assert_allclose(overlap, overlap[0], rtol=1e-5)


@pytest.mark.parametrize("blend", [True, False])
def test_accumulator_hands_out_every_row_once_with_constant_memory(blend):
    layout = TileLayout(width=100, height=130, tile=32, context=4)
    accumulator = StripAccumulator(layout, num_classes=2, blend=blend)
    buffer_shape = accumulator.sums.shape
    tops = list(layout.row_tops())
    seen = np.zeros(layout.height, dtype=int)
    for index, top in enumerate(tops):
        for col in layout.col_lefts():
            probabilities = np.zeros((2, layout.tile, layout.tile), np.float32)
            probabilities[0] = 1.0
            accumulator.add(probabilities, top, col)
        row, classes, confidence, merged = accumulator.flush(
            tops[index + 1] if index + 1 < len(tops) else None, keep_probabilities=True, chunk=40
        )
        seen[row : row + merged.shape[1]] += 1
        assert merged.shape[2] == layout.width and classes.shape == merged.shape[1:]
        np.testing.assert_allclose(merged[0], 1.0, rtol=1e-5)  # weights normalise exactly
        assert (classes == 0).all() and np.allclose(confidence, 1.0)
        assert accumulator.sums.shape == buffer_shape
    assert (seen == 1).all()


def test_early_stopping_and_improvement_logic():
    stopping = EarlyStopping("max", min_delta=0.01, patience=2)
    assert stopping.improved(0.5, None)
    assert not stopping.improved(float("nan"), None)
    assert not stopping.improved(0.505, 0.5)  # within min_delta
    assert stopping.improved(0.52, 0.5)
    lower = EarlyStopping("min", min_delta=0.0, patience=None)
    assert lower.improved(0.4, 0.5) and not lower.improved(0.6, 0.5)
    assert stopping.should_stop(2) and not stopping.should_stop(1)
    assert not lower.should_stop(1000)  # no patience: never


def test_the_job_passes_typed_settings_down():
    cfg = validate_config(compose_train("trainer.early_stopping.patience=3"))
    settings = train_settings(cfg)
    assert isinstance(settings, TrainConfig) and isinstance(settings.trainer, TrainerConfig)
    assert settings.trainer.early_stopping.patience == 3
    assert settings.trainer.max_epochs == cfg.trainer.max_epochs
