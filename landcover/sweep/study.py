"""Study storage, samplers, pruners, the study lock and the budget's bookkeeping.

Several sweepers (processes or machines), each with several slots, share one study. Optuna
gives every trial a unique number; to run exactly `n_trials`, a slot takes the study lock,
counts the trials that use the budget, and asks for a new one only if the budget allows.
With SQLite the lock is a file lock beside the database, with PostgreSQL an advisory lock;
with another server database two slots may race for the last trial, and the loser's trial is
closed as FAILED with reason `over_budget`.

A trial whose worker died stops sending heartbeats; after the grace period the next slot that
takes the lock fails it (reason `stale`) and enqueues a replacement with the same parameters,
so the study still ends with `n_trials` finished trials. Stale and over-budget trials do not
count against the budget.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from landcover import locks
from landcover.errors import ConfigError, last_line
from landcover.locks import absolute_sqlite_url  # noqa: F401  (the sweep's name for it)

OVER_BUDGET = "over_budget"
REPLACES = "replaces"  # user attr of a replacement trial: the number of the dead one
FAIL_REASON = "fail_reason"  # user attr of a failed trial: the last line of its error
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc", "grid")
PRUNERS = ("none", "median", "hyperband", "threshold")


@dataclass(frozen=True)
class Heartbeat:
    """How often a running trial says it is alive, and how long silence means death."""

    interval: int  # hydra.sweeper.heartbeat_interval (its default lives in the sweeper config)
    grace_period: int

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.grace_period <= self.interval:
            raise ConfigError(
                f"hydra.sweeper.heartbeat_interval={self.interval} must be positive and "
                f"hydra.sweeper.grace_period={self.grace_period} larger than it"
            )


class StaleTrials:
    """Heartbeat-stale callback: note each dead trial and enqueue its replacement."""

    def __init__(self) -> None:
        self.failed: list[FrozenTrial] = []
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback for a trial whose heartbeat stopped: replace it, once."""
        study.enqueue_trial(dict(trial.params), user_attrs={REPLACES: trial.number})
        with self._lock:
            self.failed.append(trial)

    def take(self) -> list[FrozenTrial]:
        """The dead trials found since the last call (replacements to enqueue)."""
        with self._lock:
            failed, self.failed = self.failed, []
        return failed


def make_storage(
    url: str, heartbeat: Heartbeat, stale: StaleTrials | None = None
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats, shared by every worker of a study."""
    path = locks.sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=heartbeat.interval,
        grace_period=heartbeat.grace_period,
        heartbeat_stale_trial_callback=stale,
        engine_kwargs={"connect_args": {"timeout": 60}} if path is not None else None,
    )


def trial_seed(cfg: Mapping[str, Any], trial_number: int) -> int | None:
    """The sampler's seed for one trial: `sampler.seed + trial number`.

    Two workers (or slots) that share `sampler.seed` would otherwise draw the same values; a
    seed per trial number keeps a single-slot sweep reproducible and parallel draws distinct.
    """
    seed = cfg.get("seed")
    return None if seed is None else int(seed) + trial_number


def make_sampler(
    cfg: Mapping[str, Any],
    trial_number: int = 0,
    grid: Mapping[str, Sequence[Any]] | None = None,
    multi_objective: bool = False,
) -> optuna.samplers.BaseSampler:
    """The sampler named by `hydra.sweeper.sampler.name`, seeded for one trial.

    QMC keeps the study's seed: its scrambling must be the same for every trial, and the
    position in the sequence comes from the storage. Grid search needs `grid` (every
    parameter a choice or a range).
    """
    name = cfg.get("name", "tpe")
    seed = trial_seed(cfg, trial_number)
    startup = int(cfg.get("n_startup_trials", 5))
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, constant_liar=bool(cfg.get("constant_liar", True))
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        if multi_objective:
            raise ConfigError("hydra.sweeper.sampler.name=cmaes has one objective; use tpe, gp")
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "qmc":
        qmc_type = cfg.get("qmc_type", "sobol")
        return optuna.samplers.QMCSampler(seed=cfg.get("seed"), qmc_type=qmc_type)
    if name == "grid":
        if not grid:
            raise ConfigError("hydra.sweeper.sampler.name=grid needs a search space of choices")
        return optuna.samplers.GridSampler(dict(grid), seed=seed)
    raise ConfigError(f"hydra.sweeper.sampler.name={name!r} is not one of {', '.join(SAMPLERS)}")


def make_pruner(cfg: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The configured Optuna pruner (median, hyperband, none)."""
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
    raise ConfigError(f"hydra.sweeper.pruner.name={name!r} is not one of {', '.join(PRUNERS)}")


@contextlib.contextmanager
def study_lock(storage: str) -> Iterator[None]:
    """Exclusive across slots, workers and machines: a file lock for SQLite, an advisory
    lock for PostgreSQL (and a thread lock for the slots of one process)."""
    with locks.store_lock(storage, "sweep"):
        yield


def replaced_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the dead trials that a replacement stands in for."""
    return {int(t.user_attrs[REPLACES]) for t in trials if REPLACES in t.user_attrs}


def counting(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that use up the budget: all but over-budget ones and replaced dead ones."""
    replaced = replaced_numbers(trials)
    return [
        t for t in trials if t.user_attrs.get("reason") != OVER_BUDGET and t.number not in replaced
    ]


def budget_used(study: optuna.Study) -> int:
    """Trials that count toward n_trials (replaced and over-budget ones do not)."""
    return len(counting(study.get_trials(deepcopy=False)))


def failure_rate(study: optuna.Study) -> tuple[int, int]:
    """The share of finished trials that failed (a sweep stops when too many do)."""
    done = [t for t in counting(study.get_trials(deepcopy=False)) if t.state.is_finished()]
    return sum(t.state == TrialState.FAIL for t in done), len(done)


def waiting(study: optuna.Study) -> bool:
    """Trials queued to run (enqueued settings, replacements of dead trials)."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def running_elsewhere(study: optuna.Study, mine: set[int]) -> list[int]:
    """Trials in flight that this process's slots do not hold (another worker's)."""
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.number not in mine
    ]


def fail_reason(trial: FrozenTrial) -> str:
    """Why a trial failed, as far as anyone recorded it."""
    attrs = trial.user_attrs
    return str(attrs.get(FAIL_REASON) or last_line(attrs.get("error", "")) or "no reason recorded")
