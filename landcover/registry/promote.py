"""`landcover-promote`: the best run of an experiment or sweep -> the registry's champion.

landcover-promote experiment=chesapeake sweep=arch_epochs metric=val/mIoU
landcover-predict model=models:/landcover@champion input=scene.tif output=map.tif
"""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from landcover.config import plain_dict
from landcover.errors import ConfigError
from landcover.registry.champion import package_if_moved
from landcover.registry.promotion import Promotion, candidate_of_run, find_best_run, promote

log = logging.getLogger("landcover.registry.promote")


def run_promotion(cfg: DictConfig) -> Promotion:
    """`landcover-promote`: choose, register and move the alias under the registry lock."""
    if int(cfg.filters.min_epochs) < 0:
        raise ConfigError(f"filters.min_epochs={cfg.filters.min_epochs} must be >= 0")
    client = MlflowClient(cfg.tracking.uri)
    if cfg.run:
        candidate = candidate_of_run(client, str(cfg.run), cfg.metric)
    else:
        candidate = find_best_run(
            client,
            experiment=cfg.experiment,
            metric=cfg.metric,
            direction=cfg.direction,
            study=cfg.sweep,
            min_epochs=int(cfg.filters.min_epochs),
            tags={str(k): str(v) for k, v in plain_dict(cfg.filters.tags).items()},
            where=cfg.filters.where or "",
        )
    experiment = client.get_experiment(candidate.run.info.experiment_id).name
    result = promote(
        client,
        candidate,
        name=cfg.registry.name,
        experiment=experiment,
        direction=cfg.direction,
        alias=cfg.registry.alias,
        previous_alias=cfg.registry.previous_alias,
        against=cfg.against,
        force=bool(cfg.force),
        reason=str(cfg.reason or ""),
    )
    log.info(
        "run %s (%s %.4f) -> %s version %s (%s); %s; aliases %s",
        candidate.run_id,
        candidate.metric,
        candidate.value,
        result.name,
        result.version,
        "new" if result.created else "already registered",
        result.reason,
        result.aliases,
    )
    package_if_moved(cfg, result)
    return result
