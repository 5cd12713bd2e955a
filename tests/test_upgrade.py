"""Files written before the config refactor still load and predict the same logits."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from landcover import artifacts

FIXTURE = Path(__file__).parent / "fixtures" / "pre_refactor"


def pixels() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.uniform(0, 255, (1, 4, 64, 64)).astype("float32"))


def test_pre_refactor_checkpoint_predicts_the_same_logits() -> None:
    model = artifacts.load(str(FIXTURE / "checkpoint.pt"), device="cpu")
    logits = model.forward(pixels().numpy())
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), atol=1e-5)


def test_pre_refactor_logged_model_predicts_the_same_logits() -> None:
    model = artifacts.load(str(FIXTURE / "logged_model"), device="cpu")  # a model folder
    assert model.kind == "mlflow" and model.schema.names
    logits = model.forward(pixels().numpy())
    np.testing.assert_allclose(logits, np.load(FIXTURE / "expected_logits.npy"), atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model(str(FIXTURE / "logged_model"))
    codes = pyfunc.predict(pixels().numpy())
    expected = np.array([1, 2, 3, 4])[np.load(FIXTURE / "expected_logits.npy").argmax(1)]
    np.testing.assert_array_equal(codes, expected)


def test_a_format_1_training_config_upgrades_to_a_valid_config_of_today() -> None:
    import pytest
    from omegaconf import OmegaConf

    from landcover.artifacts.checkpoint import read_checkpoint
    from landcover.config import validate_config
    from landcover.errors import LandcoverError
    from landcover.upgrade import CONFIG_VERSION, upgrade_train_config

    state = read_checkpoint(FIXTURE / "checkpoint.pt")
    old = OmegaConf.to_container(OmegaConf.create(state["config"]))
    assert "config_version" not in state["metadata"]  # format 1 recorded no version
    assert old["model"]["encoder"] == "tu-mobilenetv3_small_050" and old["optimizer"]["name"]
    new = upgrade_train_config(old, version=1)
    assert (
        new["model"]["encoder_name"] == "tu-mobilenetv3_small_050" and "encoder" not in new["model"]
    )
    assert new["optimizer"] == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": old["optimizer"]["lr"],
        "momentum": 0.0,
        "weight_decay": old["optimizer"]["weight_decay"],
    }
    assert new["scheduler"] == {"_target_": None}  # format 1's `none`
    typed = validate_config(OmegaConf.create(new))  # every key known, every type right
    assert typed.model.encoder_name == "tu-mobilenetv3_small_050"
    assert upgrade_train_config(new, version=CONFIG_VERSION) == new  # today's: unchanged
    with pytest.raises(LandcoverError, match="newer landcover"):
        upgrade_train_config(new, version=CONFIG_VERSION + 1)


def test_format_1_schedules_become_their_torch_classes() -> None:
    from landcover.upgrade import upgrade_train_config

    base = {"model": {"arch": "seed"}, "trainer": {"max_epochs": 7}}
    cosine = upgrade_train_config(
        {**base, "scheduler": {"name": "cosine", "min_lr": 1e-5, "step_size": 3, "gamma": 0.1}}
    )["scheduler"]
    assert cosine["_target_"].endswith("CosineAnnealingLR") and cosine["T_max"] == 7
    assert cosine["eta_min"] == 1e-5
    step = upgrade_train_config(
        {**base, "scheduler": {"name": "step", "min_lr": 0.0, "step_size": 3, "gamma": 0.5}}
    )["scheduler"]
    assert (step["step_size"], step["gamma"]) == (3, 0.5) and step["_target_"].endswith("StepLR")
