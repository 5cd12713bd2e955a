"""A Hydra Sweeper that runs an Optuna study: `landcover-train -m hydra/sweeper=optuna ...`.

Our own integration with Optuna 5 (the official hydra-optuna-sweeper pins optuna<3, runs
trials in synchronous batches and cannot prune). Hydra imports every plugin module whenever
any app starts (`--help` included), so this module holds only the config schema and a thin
class; the sweep itself lives in `landcover.sweep.sweeper`, imported when a sweep starts.

No `from __future__ import annotations` here: Hydra imports plugin modules without registering
them in sys.modules, and dataclasses then cannot resolve string annotations.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig


@dataclass
class OptunaSweeperConf:
    """`hydra/sweeper=optuna` settings: types only. The values are in
    `conf/hydra/sweeper/optuna.yaml` (one place, as for every other config group); the
    search space is the `params` of a sweep config."""

    _target_: str = MISSING
    study_name: str | None = MISSING
    storage: str | None = MISSING  # null: sqlite:///optuna.db in the working directory
    n_trials: int = MISSING
    n_jobs: int = MISSING  # trials in flight at once; > 1 needs a parallel Hydra launcher
    direction: Any = MISSING  # maximize | minimize, or a list: a multi-objective study
    metric: Any = MISSING  # or a list, e.g. [val/mIoU, model/gflops_per_tile]
    max_failure_rate: float = MISSING
    min_trials_for_failure_rate: int = MISSING
    heartbeat_interval: int = MISSING  # seconds between a running trial's heartbeats
    grace_period: int = MISSING  # a RUNNING trial silent this long is failed and replaced
    wait_for_others: bool = MISSING
    sampler: dict[str, Any] = MISSING
    pruner: dict[str, Any] = MISSING
    params: dict[str, Any] = MISSING
    enqueue: list[dict[str, Any]] = MISSING
    carry_env: list[str] = MISSING


# the schema under its own name; `optuna` itself is the YAML, which starts from it
ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna_types", node=OptunaSweeperConf, provider="landcover"
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
