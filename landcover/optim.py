"""Loss, optimiser and learning-rate schedule from config."""

from __future__ import annotations

import torch
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


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    name = cfg.name.value if hasattr(cfg.name, "value") else str(cfg.name)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(
            params,
            lr=cfg.lr,
            alpha=cfg.alpha,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    raise ConfigError(f"config value optimizer.name={name!r} is not supported")


def build_scheduler(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, max_epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch."""
    name = cfg.name.value if hasattr(cfg.name, "value") else str(cfg.name)
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max_epochs, eta_min=cfg.min_lr
        )
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    raise ConfigError(f"config value scheduler.name={name!r} is not supported")
