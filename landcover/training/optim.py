"""Loss, optimiser and learning-rate schedule from config.

The optimiser and the schedule are `_target_` configs (`conf/optimizer/`, `conf/scheduler/`):
their keys are the constructor's arguments, so any `torch.optim` class (or a user's own) is a
YAML file, not code here. `validate_config` has checked the keys against the signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.errors import ConfigError

LOSS_TERMS = ("cross_entropy", "dice", "focal", "lovasz")


class WeightedLoss(nn.Module):
    """A weighted sum of losses on the same logits and targets (e.g. cross entropy + Dice)."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: loss for name, (_, loss) in terms.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Each term's loss times its weight, summed."""
        total = logits.new_zeros(())
        for name, loss in self.terms.items():
            total = total + self.weights[name] * loss(logits, target)
        return total


def auto_class_weights(class_pixels: Sequence[int], clip: float) -> list[float]:
    """Median-frequency balancing (the median class's frequency over each class's), clipped
    to [1/clip, clip]: a class with 0.16 % of the pixels is not drowned by one with 60 %, and a
    class that is nearly absent cannot blow the loss up. Absent classes weigh 1."""
    counts = np.asarray(class_pixels, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return [1.0] * len(counts)
    frequency = counts / counts.sum()
    median = float(np.median(frequency[present]))
    weights = np.clip(median / np.maximum(frequency, 1e-12), 1 / clip, clip)
    return [float(w) if p else 1.0 for w, p in zip(weights, present, strict=True)]


def class_weight_vector(
    loss_cfg: DictConfig, schema: ClassSchema, class_pixels: Sequence[int] | None
) -> torch.Tensor | None:
    """`loss.class_weights`: None, `auto` (from the train labels' class counts) or
    {class name: weight} (classes not named weigh 1)."""
    weights = loss_cfg.class_weights
    if weights is None:
        return None
    if weights == "auto":
        if class_pixels is None:
            raise ConfigError("loss.class_weights=auto needs the train labels' class counts")
        return torch.tensor(auto_class_weights(class_pixels, float(loss_cfg.auto_weight_clip)))
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"config value loss.class_weights={weights!r} is not null, auto or "
            "{class_name: weight}"
        )
    unknown = set(weights) - set(schema.names)
    if unknown:
        raise ConfigError(
            f"config value loss.class_weights names unknown classes "
            f"{sorted(unknown)}; classes are {schema.names}"
        )
    return torch.tensor([float(weights.get(name, 1.0)) for name in schema.names])


def build_loss(
    loss_cfg: DictConfig, schema: ClassSchema, class_pixels: Sequence[int] | None = None
) -> nn.Module:
    """A weighted sum of cross entropy (class weights, label smoothing) and
    segmentation-models-pytorch's Dice, focal and Lovasz losses (`loss.<term>` is its weight,
    0 leaves it out), all skipping IGNORE_INDEX. One term of weight 1 is that loss itself."""
    from segmentation_models_pytorch import losses

    weights = {name: float(loss_cfg[name]) for name in LOSS_TERMS}
    negative = [f"loss.{name}={w}" for name, w in weights.items() if w < 0]
    if negative:
        raise ConfigError(f"config value {negative[0]}: a loss weight must be >= 0")
    terms = {name: w for name, w in weights.items() if w > 0}
    if not terms:
        raise ConfigError(
            f"config value loss: every weight of {list(LOSS_TERMS)} is 0; give one a weight"
        )
    weight = class_weight_vector(loss_cfg, schema, class_pixels)
    makers = {
        "cross_entropy": lambda: nn.CrossEntropyLoss(
            weight=weight, ignore_index=IGNORE_INDEX, label_smoothing=loss_cfg.label_smoothing
        ),
        "dice": lambda: losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX),
        "focal": lambda: losses.FocalLoss(
            "multiclass", ignore_index=IGNORE_INDEX, gamma=float(loss_cfg.focal_gamma)
        ),
        "lovasz": lambda: losses.LovaszLoss("multiclass", ignore_index=IGNORE_INDEX),
    }
    built = {name: (float(w), makers[name]()) for name, w in terms.items()}
    if len(built) == 1 and next(iter(built.values()))[0] == 1.0:
        return next(iter(built.values()))[1]
    return WeightedLoss(built)


def build_optimizer(
    cfg: DictConfig, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]]
) -> torch.optim.Optimizer:
    """The configured optimiser over `params` (parameters, or parameter groups with their own
    learning rates)."""
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
