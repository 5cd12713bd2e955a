"""Loss, optimiser and learning-rate schedule from config.

The optimiser and the schedule are `_target_` configs (`conf/optimizer/`, `conf/scheduler/`):
their keys are the constructor's arguments, so any `torch.optim` class (or a user's own) is a
YAML file, not code here. `validate_config` has checked the keys against the signature.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.errors import ConfigError


def build_loss(loss_cfg: DictConfig, schema: ClassSchema) -> nn.CrossEntropyLoss:
    """Cross entropy that skips IGNORE_INDEX pixels, optionally weighted by class name."""
    weight = None
    if loss_cfg.class_weights:
        unknown = set(loss_cfg.class_weights) - set(schema.names)
        if unknown:
            raise ConfigError(
                f"config value loss.class_weights names unknown classes "
                f"{sorted(unknown)}; classes are {schema.names}"
            )
        weight = torch.tensor(
            [float(loss_cfg.class_weights.get(name, 1.0)) for name in schema.names]
        )
    return nn.CrossEntropyLoss(
        weight=weight, ignore_index=IGNORE_INDEX, label_smoothing=loss_cfg.label_smoothing
    )


def build_optimizer(cfg: DictConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The configured optimiser over `params`."""
    return instantiate(cfg, _partial_=True)(params)


def build_scheduler(
    cfg: DictConfig | None, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The configured schedule (stepped once per epoch), or None for `scheduler=none`."""
    if cfg is None or cfg.get("_target_") is None:
        return None
    scheduler = instantiate(cfg, _partial_=True)(optimizer)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ConfigError(f"config value scheduler._target_={cfg._target_} is not an LRScheduler")
    return scheduler
