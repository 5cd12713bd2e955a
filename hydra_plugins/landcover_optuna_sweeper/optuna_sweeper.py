"""A Hydra Sweeper that runs an Optuna study: `landcover-train -m hydra/sweeper=optuna ...`.

Our own integration with Optuna 5 (the official hydra-optuna-sweeper pins optuna<3, runs
trials in synchronous batches and cannot prune). Hydra imports every plugin module whenever
any app starts (`--help` included), so this module holds only the config schema and a thin
class; the sweep itself lives in `landcover.sweep.sweeper`, imported when a sweep starts.

No `from __future__ import annotations` here: Hydra imports plugin modules without registering
them in sys.modules, and dataclasses then cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    """`hydra/sweeper=optuna` settings (the search space is the `params` of a sweep config)."""

    _target_: str = "hydra_plugins.landcover_optuna_sweeper.optuna_sweeper.LandcoverOptunaSweeper"
    study_name: str | None = None
    storage: str | None = None  # default: sqlite:///optuna.db in the working directory
    n_trials: int = 20
    n_jobs: int = 1  # trials in flight at once; > 1 needs a parallel Hydra launcher
    direction: Any = "maximize"  # or a list, one per metric: a multi-objective study
    metric: Any = "val/mIoU"  # or a list, e.g. [val/mIoU, model/gflops_per_tile]
    max_failure_rate: float = 0.5
    min_trials_for_failure_rate: int = 3
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a RUNNING trial silent this long is failed and replaced
    # when the budget is used, stay until other workers' trials end (replacing any that die),
    # so that no trial is left RUNNING once every worker has exited
    wait_for_others: bool = True
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    params: dict[str, Any] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    # Ray launcher: names of further variables the trials need from this shell (MLFLOW_*,
    # LANDCOVER_*, PG*, AWS_*, those the config reads by oc.env and the libpq password file
    # always travel; see landcover.cluster)
    carry_env: list[str] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="landcover"
)


class LandcoverOptunaSweeper(Sweeper):
    """Hydra's face of `landcover.sweep.sweeper.OptunaSweep`."""

    def __init__(self, **settings: Any) -> None:
        from landcover.sweep.sweeper import OptunaSweep

        self.sweep_impl = OptunaSweep(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Hand Hydra's context to the sweep."""
        self.sweep_impl.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run the study for the command line's overrides."""
        self.sweep_impl.sweep(arguments)
