"""Files written before the config refactor still load and predict the same logits."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from landcover import serving
from landcover.predict.reference import load_model_reference

FIXTURE = Path(__file__).parent / "fixtures" / "pre_refactor"


def pixels() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.uniform(0, 255, (1, 4, 64, 64)).astype("float32"))


def test_pre_refactor_checkpoint_predicts_the_same_logits() -> None:
    model = load_model_reference(str(FIXTURE / "checkpoint.pt"), device="cpu")
    logits = model.forward(pixels()).numpy()
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), atol=1e-5)


def test_pre_refactor_logged_model_predicts_the_same_logits() -> None:
    module = serving.load_module(FIXTURE / "logged_model")
    with torch.no_grad():
        logits = module(pixels()).numpy()
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model(str(FIXTURE / "logged_model"))
    codes = pyfunc.predict(pixels().numpy())
    expected = np.array([1, 2, 3, 4])[np.load(FIXTURE / "expected_logits.npy").argmax(1)]
    np.testing.assert_array_equal(codes, expected)
