"""Search spaces written in Hydra's override grammar, sampled define-by-run by Optuna.

    model: choice(seed, unet, fpn, deeplabv3plus)       # a config *group*
    model.encoder_name: choice(resnet18, resnet34)      # only for models that have an encoder
    trainer.max_epochs: int(interval(2, 40))            # or range(2, 41)
    optimizer.lr: tag(log, interval(1e-4, 1e-2))

A parameter under `model.` is sampled only when the chosen model's config has that key, so a
`seed` trial is never given an encoder it cannot use (conditional search space).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from landcover.errors import ConfigError
from landcover.paths import CONFIG_DIR


@dataclass(frozen=True)
class Parameter:
    """One searched key: its distribution, or a fixed value."""

    name: str
    distribution: BaseDistribution | None  # None: a fixed value
    fixed: Any = None


def parse_parameter(name: str, text: str) -> Parameter:
    """One `key: expression` of a sweep config as an Optuna distribution."""
    try:
        override = OverridesParser.create().parse_override(f"{name}={text}")
    except Exception as err:  # Hydra's grammar errors
        raise ConfigError(f"sweep parameter {name}: cannot parse {text!r} ({err})") from err
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return Parameter(name, CategoricalDistribution(cast(list[Any], value.list)))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if not all(isinstance(v, int) for v in (start, stop, step)):
            raise ConfigError(f"sweep parameter {name}: range() takes integers; use interval()")
        return Parameter(
            name, IntDistribution(cast(int, start), cast(int, stop) - 1, step=cast(int, step))
        )
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return Parameter(name, IntDistribution(value.start, value.end, log=log))
        low, high = cast(float, value.start), cast(float, value.end)
        return Parameter(name, FloatDistribution(float(low), float(high), log=log))
    return Parameter(name, None, value)


def parse_space(params: Mapping[str, Any]) -> list[Parameter]:
    """Every `key: expression` of a study config, config groups first."""
    space = [parse_parameter(str(k), str(v)) for k, v in params.items()]
    # groups first: which model is chosen decides which model.* keys exist
    return sorted(space, key=lambda p: "." in p.name)


def model_keys(model: str) -> set[str]:
    """The keys of the schema the model option's architecture selects (`model=fpn` -> FPN's)."""
    from dataclasses import fields

    from landcover.config import MODEL_SCHEMAS, plain_dict

    path = Path(CONFIG_DIR) / "model" / f"{model}.yaml"
    if not path.exists():
        raise ConfigError(f"sweep chose model={model!r} but {path} does not exist")
    arch = model if model in MODEL_SCHEMAS else plain_dict(OmegaConf.load(path)).get("arch")
    if arch not in MODEL_SCHEMAS:
        raise ConfigError(f"sweep chose model={model!r}, whose arch {arch!r} has no schema")
    return {f.name for f in fields(MODEL_SCHEMAS[arch])}


def suggest(trial: optuna.Trial, space: list[Parameter], fixed_model: str | None) -> dict:
    """Sample one trial's values, skipping model keys the chosen model does not have."""
    values: dict[str, Any] = {}
    for parameter in space:
        if parameter.name.startswith("model."):
            model = values.get("model", fixed_model)
            if model is not None and parameter.name.split(".", 1)[1] not in model_keys(model):
                continue
        if parameter.distribution is None:
            values[parameter.name] = parameter.fixed
        else:
            values[parameter.name] = _suggest(trial, parameter.name, parameter.distribution)
    return values


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    assert isinstance(distribution, FloatDistribution)
    return trial.suggest_float(
        name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
    )


def as_overrides(values: Mapping[str, Any]) -> list[str]:
    """Sampled values as Hydra overrides for the trial's job."""
    return [f"{name}={value}" for name, value in values.items()]


def grid(space: list[Parameter]) -> dict[str, list[Any]]:
    """The search space as a grid for Optuna's GridSampler: every choice, every range step.

    A continuous interval has no grid; name its points with choice() instead.
    """
    points: dict[str, list[Any]] = {}
    for parameter in space:
        distribution = parameter.distribution
        if distribution is None:
            continue
        if isinstance(distribution, CategoricalDistribution):
            points[parameter.name] = list(distribution.choices)
        elif isinstance(distribution, IntDistribution) and not distribution.log:
            points[parameter.name] = list(
                range(distribution.low, distribution.high + 1, distribution.step)
            )
        else:
            raise ConfigError(
                f"sweep parameter {parameter.name}: grid search needs choice() or range(), "
                "not a continuous interval"
            )
    return points
