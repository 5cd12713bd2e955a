"""Study storage, sampler and pruner from config, and the worker loop's bookkeeping.

Several worker processes (or machines, with a server database) share one study. Optuna gives
every trial a unique number; to run exactly `n_trials`, a worker takes the study lock, counts
the trials that are done or running, and asks for a new one only if the budget allows. With
SQLite the lock is a file lock beside the database, with PostgreSQL an advisory lock; with
another server database two workers may race for the last slot, and the loser's trial is
closed as FAILED with reason `over_budget`.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from landcover.errors import ConfigError

OVER_BUDGET = "over_budget"


def sqlite_path(storage: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage.startswith(prefix) else None


def make_storage(url: str) -> optuna.storages.RDBStorage:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # heartbeats let a restarted sweep fail the trials of a worker that died mid-trial
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=30,
        grace_period=120,
        engine_kwargs={"connect_args": {"timeout": 60}} if path is not None else None,
    )


def make_sampler(cfg: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    name = cfg.get("name", "tpe")
    seed = cfg.get("seed")
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=int(cfg.get("n_startup_trials", 5))
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"hydra.sweeper.sampler.name={name!r} is not one of tpe, random")


def make_pruner(cfg: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    name = cfg.get("name", "median")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(cfg.get("n_startup_trials", 2)),
            n_warmup_steps=int(cfg.get("n_warmup_steps", 1)),
        )
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=int(cfg.get("min_resource", 1)),
            max_resource=cfg.get("max_resource", "auto"),
            reduction_factor=int(cfg.get("reduction_factor", 3)),
        )
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(
            lower=cfg.get("lower"),
            upper=cfg.get("upper"),
            n_warmup_steps=int(cfg.get("n_warmup_steps", 0)),
        )
    raise ConfigError(
        f"hydra.sweeper.pruner.name={name!r} is not one of none, median, hyperband, threshold"
    )


ADVISORY_LOCK_KEY = 0x1A9DC0  # one PostgreSQL advisory lock for landcover sweeps


def has_study_lock(storage: str) -> bool:
    return sqlite_path(storage) is not None or storage.startswith(("postgresql:", "postgresql+"))


@contextlib.contextmanager
def study_lock(storage: str) -> Iterator[None]:
    """Exclusive across workers: a file lock for SQLite, an advisory lock for PostgreSQL."""
    if storage.startswith(("postgresql:", "postgresql+")):
        import sqlalchemy

        engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})"))
            try:
                yield
            finally:
                connection.execute(
                    sqlalchemy.text(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
                )
        engine.dispose()
        return
    path = sqlite_path(storage)
    if path is None:
        yield
        return
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that use up the budget: all but those closed as over budget."""
    return trial.user_attrs.get("reason") != OVER_BUDGET


def budget_used(study: optuna.Study) -> int:
    states = (
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    )
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if counted(t))


def failure_rate(study: optuna.Study) -> tuple[int, int]:
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and counted(t)]
    return sum(t.state == TrialState.FAIL for t in done), len(done)
