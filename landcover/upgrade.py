"""Configs written by earlier versions, brought up to today's keys (raster-vision's idea).

Checkpoints and logged models carry the config they were trained with. When a key is renamed
or a group changes shape, the files already on disk must still load: each change is one step
here, applied in order from the version a file records (files without one are version 1).

Version history:
  1. `model.encoder`, `optimizer.name` (+ every optimiser's keys), `scheduler.name`.
  2. (issue 13) keys are the constructors' arguments: `model.encoder_name`; optimiser and
     schedule are `_target_` configs.
  3. (issues 16, 17) the weights of `loss.cross_entropy`, `loss.dice`, `loss.focal`,
     `loss.lovasz` (cross entropy alone before), `loss.auto_weight_clip`, `loss.focal_gamma`;
     `init` (start from another model; none before); `tracking.system_metrics` and its
     interval (off before).
  4. (issue 16) `prior` (a low-resolution layer fused into the map; none before),
     `data.prior_suffix` (null), `trainer.keep_start` (false).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

CONFIG_VERSION = 4

OPTIMIZERS_V1 = {  # name -> (class, the v1 keys that class takes)
    "adam": ("torch.optim.Adam", ("lr", "weight_decay", "eps")),
    "adamw": ("torch.optim.AdamW", ("lr", "weight_decay", "eps")),
    "rmsprop": ("torch.optim.RMSprop", ("lr", "alpha", "eps", "weight_decay", "momentum")),
    "sgd": ("torch.optim.SGD", ("lr", "momentum", "weight_decay")),
}


def _model_v1_to_v2(model: dict[str, Any]) -> dict[str, Any]:
    if "encoder" in model:
        model["encoder_name"] = model.pop("encoder")
    return model


def _optimizer_v1_to_v2(optimizer: dict[str, Any]) -> dict[str, Any]:
    target, keys = OPTIMIZERS_V1[str(optimizer["name"])]
    return {"_target_": target, "_partial_": True, **{k: optimizer[k] for k in keys}}


def _scheduler_v1_to_v2(scheduler: dict[str, Any], max_epochs: int) -> dict[str, Any]:
    name = str(scheduler["name"])
    if name == "cosine":
        return {
            "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "_partial_": True,
            "T_max": max_epochs,
            "eta_min": scheduler["min_lr"],
        }
    if name == "step":
        return {
            "_target_": "torch.optim.lr_scheduler.StepLR",
            "_partial_": True,
            "step_size": scheduler["step_size"],
            "gamma": scheduler["gamma"],
        }
    return {"_target_": None}


def _train_v1_to_v2(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg["model"] = _model_v1_to_v2(dict(cfg["model"]))
    if "name" in cfg.get("optimizer", {}):
        cfg["optimizer"] = _optimizer_v1_to_v2(dict(cfg["optimizer"]))
    if "name" in cfg.get("scheduler", {}):
        max_epochs = int(cfg["trainer"]["max_epochs"])
        cfg["scheduler"] = _scheduler_v1_to_v2(dict(cfg["scheduler"]), max_epochs)
    return cfg


def _train_v2_to_v3(cfg: dict[str, Any]) -> dict[str, Any]:
    loss = dict(cfg.get("loss") or {})
    for term, weight in (("cross_entropy", 1.0), ("dice", 0.0), ("focal", 0.0), ("lovasz", 0.0)):
        loss.setdefault(term, weight)
    loss.setdefault("auto_weight_clip", 10.0)
    loss.setdefault("focal_gamma", 2.0)
    cfg["loss"] = loss
    cfg.setdefault("init", {"model": None, "freeze": [], "frozen_lr_scale": 0.0, "class_map": None})
    if "tracking" in cfg:
        tracking = dict(cfg["tracking"])
        tracking.setdefault("system_metrics", False)
        tracking.setdefault("system_metrics_interval", 10.0)
        cfg["tracking"] = tracking
    return cfg


def _train_v3_to_v4(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg.setdefault("prior", {"name": None, "layer": None, "reference": {}, "codes": {}})
    for section, key, value in (("data", "prior_suffix", None), ("trainer", "keep_start", False)):
        if section in cfg:
            cfg[section] = {**dict(cfg[section]), key: dict(cfg[section]).get(key, value)}
    return cfg


MODEL_STEPS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _model_v1_to_v2,
    2: lambda model: model,  # the model group did not change
    3: lambda model: model,
}
TRAIN_STEPS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _train_v1_to_v2,
    2: _train_v2_to_v3,
    3: _train_v3_to_v4,
}


def _upgrade(
    cfg: Mapping[str, Any], version: int, steps: Mapping[int, Callable[[dict], dict]]
) -> dict[str, Any]:
    if version > CONFIG_VERSION:
        from landcover.errors import LandcoverError

        raise LandcoverError(
            f"config version {version} was written by a newer landcover (this one reads up to "
            f"{CONFIG_VERSION}): upgrade landcover"
        )
    upgraded = dict(cfg)
    for step in range(version, CONFIG_VERSION):
        upgraded = steps[step](upgraded)
    return upgraded


def upgrade_model_config(model: Mapping[str, Any], version: int = 1) -> dict[str, Any]:
    """A `model` config (as logged in model metadata) in today's keys."""
    return _upgrade(model, version, MODEL_STEPS)


def upgrade_train_config(cfg: Mapping[str, Any], version: int = 1) -> dict[str, Any]:
    """A whole training config (as stored in checkpoints) in today's keys."""
    return _upgrade(cfg, version, TRAIN_STEPS)
