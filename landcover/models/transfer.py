"""Start training from another model (`init.model=<any model reference>`).

Every tensor whose name and shape match is copied. The output layer (the tensors whose first
dimension is the source's class count) is re-mapped class by class when the schemas differ: a
new class takes the rows of the source classes that share its label codes (the tutorial's
`trees`, code 2, becomes `tree_canopy`, code 2), else of the class with its name, else of the
classes `init.class_map` names; a class with none starts fresh. What was loaded, re-mapped,
left fresh and dropped is reported, so a run says what it started from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError


@dataclass
class TransferReport:
    """Which target tensors came from where (JSON-able, logged with the run)."""

    loaded: list[str] = field(default_factory=list)
    remapped: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    class_sources: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """One log line."""
        return (
            f"{len(self.loaded)} tensors loaded, {len(self.remapped)} re-mapped by class, "
            f"{len(self.fresh)} left fresh, {len(self.dropped)} of the source's dropped"
        )


def class_sources(
    source: ClassSchema, target: ClassSchema, class_map: Mapping[str, Sequence[str]] | None
) -> dict[str, list[str]]:
    """For each target class, the source classes its output rows come from (maybe none)."""
    scored = [c for c in source.classes if not c.ignore]
    known = {c.name for c in scored}
    chosen: dict[str, list[str]] = {}
    for info in target.classes:
        if class_map and info.name in class_map:
            names = [str(n) for n in class_map[info.name]]
            unknown = sorted(set(names) - known)
            if unknown:
                raise ConfigError(
                    f"config value init.class_map.{info.name}: {unknown} are not classes of "
                    f"the source model ({sorted(known)})"
                )
        else:
            names = [c.name for c in scored if set(c.codes) & set(info.codes)]
            names = names or [c.name for c in scored if c.name == info.name]
        chosen[info.name] = names
    return chosen


def transfer_weights(
    target: nn.Module,
    source_state: Mapping[str, torch.Tensor],
    source_schema: ClassSchema,
    target_schema: ClassSchema,
    class_map: Mapping[str, Sequence[str]] | None = None,
) -> TransferReport:
    """Copy what fits from `source_state` into `target` (in place) and say what happened."""
    report = TransferReport()
    report.class_sources = class_sources(source_schema, target_schema, class_map)
    source_index = {c.name: i for i, c in enumerate(source_schema.classes)}
    n_source, n_target = len(source_schema.classes), len(target_schema.classes)
    state = target.state_dict()
    used = set()
    with torch.no_grad():
        for name, tensor in state.items():
            incoming = source_state.get(name)
            if incoming is None or not isinstance(incoming, torch.Tensor):
                report.fresh.append(name)
                continue
            if incoming.shape == tensor.shape:
                tensor.copy_(incoming)
                report.loaded.append(name)
                used.add(name)
            elif (
                incoming.ndim == tensor.ndim
                and incoming.shape[1:] == tensor.shape[1:]
                and incoming.shape[0] == n_source
                and tensor.shape[0] == n_target
            ):
                rows = {}
                for row, info in enumerate(target_schema.classes):
                    names = report.class_sources[info.name]
                    if names:
                        picked = [source_index[n] for n in names]
                        tensor[row] = incoming[picked].mean(dim=0)
                        rows[info.name] = names
                report.remapped[name] = rows
                used.add(name)
            else:
                report.fresh.append(name)
    report.dropped = sorted(set(source_state) - used)
    target.load_state_dict(state)
    return report


ALL_BUT_HEAD = "all_but_head"


def classifier_conv(module: nn.Module, num_classes: int | None = None) -> nn.Conv2d | None:
    """The classifier of a segmentation network: its last convolution (with one output per
    class when `num_classes` is given). What `init.freeze=[all_but_head]` leaves learning and
    what landcover-studio's retrain adapts. None: the model has no such convolution."""
    found = [
        m
        for m in module.modules()
        if isinstance(m, nn.Conv2d) and num_classes in (None, m.out_channels)
    ]
    return found[-1] if found else None


def freeze_prefixes(freeze: Sequence[str], model: nn.Module | None = None) -> list[str]:
    """`encoder` (smp's encoder, or the seed network's contracting levels), `all_but_head`
    (every parameter but the last convolution's, the classifier: what landcover-studio's
    retrain adapts) or module prefixes as `state_dict` names them (`net.encoder.layer1`)."""
    prefixes = []
    for item in freeze:
        if item == ALL_BUT_HEAD:
            if model is None:
                raise ConfigError(f"init.freeze: {ALL_BUT_HEAD} needs the model")
            classifier = classifier_conv(model)
            if classifier is None:
                raise ConfigError(f"init.freeze: {ALL_BUT_HEAD}: the model has no convolution")
            head = {id(p) for p in classifier.parameters()}
            prefixes += [n for n, p in model.named_parameters() if id(p) not in head]
        else:
            prefixes.append("net.encoder" if item == "encoder" else str(item))
    return prefixes


def parameter_groups(
    model: nn.Module, freeze: Sequence[str], frozen_lr_scale: float, lr: float
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the frozen prefixes not trained at all (scale 0) or at
    `lr * frozen_lr_scale`, everything else at `lr`. A prefix matching nothing is an error."""
    prefixes = freeze_prefixes(freeze, model)
    named = list(model.named_parameters())
    for prefix in prefixes:
        if not any(name == prefix or name.startswith(prefix + ".") for name, _ in named):
            raise ConfigError(
                f"config value init.freeze: {prefix!r} names no parameter of the model "
                f"(its modules: {sorted({n.split('.')[1] for n, _ in named if '.' in n})})"
            )
    held: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, parameter in named:
        frozen = any(name == p or name.startswith(p + ".") for p in prefixes)
        (held if frozen else rest).append(parameter)
    if frozen_lr_scale == 0:
        for parameter in held:
            parameter.requires_grad_(False)
        return [{"params": rest}]
    groups: list[dict[str, Any]] = [{"params": rest}]
    if held:
        groups.append({"params": held, "lr": lr * frozen_lr_scale})
    return groups
