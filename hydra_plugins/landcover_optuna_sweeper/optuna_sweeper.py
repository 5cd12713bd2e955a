"""A Hydra Sweeper that runs an Optuna study: `landcover-train -m hydra/sweeper=optuna ...`.

Our own integration with Optuna 5 (the official hydra-optuna-sweeper pins optuna<3): trials are
asked one at a time from a shared study, so any number of workers can join a sweep; each epoch
reports to the trial so pruners can stop poor trials early; re-running the same command resumes
the study; failed trials are recorded and the sweep goes on, up to a maximum failure rate.
One MLflow parent run per study holds the search space, the best result, a CSV of all trials
and Optuna's plots; every trial is a nested child run.

No `from __future__ import annotations` here: Hydra imports plugin modules without registering
them in sys.modules, and dataclasses then cannot resolve string annotations.
"""

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from landcover import tracking
from landcover.errors import ConfigError
from landcover.sweep import context, space
from landcover.sweep import study as studies

log = logging.getLogger(__name__)
# fail_stale_trials and the matplotlib plots are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.landcover_optuna_sweeper.optuna_sweeper.LandcoverOptunaSweeper"
    study_name: str | None = None
    storage: str | None = None  # default: sqlite:///optuna.db in the working directory
    n_trials: int = 20
    direction: str = "maximize"
    metric: str = "val/mIoU"
    max_failure_rate: float = 0.5
    min_trials_for_failure_rate: int = 3
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    params: dict[str, Any] = field(default_factory=dict)
    enqueue: list[dict[str, Any]] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="landcover"
)


class LandcoverOptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str | None,
        storage: str | None,
        n_trials: int,
        direction: str,
        metric: str,
        max_failure_rate: float,
        min_trials_for_failure_rate: int,
        sampler: dict,
        pruner: dict,
        params: dict,
        enqueue: list,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise ConfigError(f"hydra.sweeper.direction={direction!r}: maximize or minimize")
        self.settings = {
            "study_name": study_name,
            "storage": storage or "sqlite:///optuna.db",
            "n_trials": n_trials,
            "direction": direction,
            "metric": metric,
            "max_failure_rate": max_failure_rate,
            "min_trials_for_failure_rate": min_trials_for_failure_rate,
            "sampler": dict(sampler),
            "pruner": dict(pruner),
        }
        self.space = space.parse_space(params or {})
        self.raw_params = {str(k): str(v) for k, v in (params or {}).items()}
        self.enqueue = [dict(e) for e in enqueue or []]

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------------------------------
    def _study(self, name: str) -> optuna.Study:
        s = self.settings
        direction = s["direction"]
        study = optuna.create_study(
            study_name=name,
            storage=studies.make_storage(s["storage"]),
            sampler=studies.make_sampler(s["sampler"]),
            pruner=studies.make_pruner(s["pruner"]),
            direction=direction,
            load_if_exists=True,
        )
        optuna.storages.fail_stale_trials(study)
        return study

    def _parent_run(self, study: optuna.Study, uri: str, experiment: str) -> str:
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if parent is None:
            parent = tracking.create_sweep_parent(
                uri,
                experiment,
                study.study_name,
                params={
                    "study_name": study.study_name,
                    "storage": self.settings["storage"],
                    "n_trials": self.settings["n_trials"],
                    "direction": self.settings["direction"],
                    "metric": self.settings["metric"],
                    "sampler": str(self.settings["sampler"]),
                    "pruner": str(self.settings["pruner"]),
                },
                search_space=self.raw_params,
            )
            study.set_user_attr("mlflow_parent_run_id", parent)
        return parent

    def sweep(self, arguments: list[str]) -> None:
        s = self.settings
        fixed_model = next(
            (a.split("=", 1)[1] for a in arguments if a.startswith("model=")),
            self.config.hydra.runtime.choices.get("model"),
        )
        name = s["study_name"] or f"sweep-{self.config.tracking.experiment}"
        uri, experiment = self.config.tracking.uri, self.config.tracking.experiment
        with studies.study_lock(s["storage"]):
            study = self._study(name)
            parent = self._parent_run(study, uri, experiment)
            if self.enqueue and not study.user_attrs.get("enqueued"):
                for values in self.enqueue:
                    study.enqueue_trial(values, skip_if_exists=True)
                study.set_user_attr("enqueued", True)
        log.info(
            "study %s in %s: %d of %d trials used; MLflow parent run %s",
            name,
            s["storage"],
            studies.budget_used(study),
            s["n_trials"],
            parent,
        )
        direction = "max" if s["direction"] == "maximize" else "min"
        base = [*arguments, f"trainer.monitor={s['metric']}", f"trainer.monitor_mode={direction}"]
        while True:
            with studies.study_lock(s["storage"]):
                if studies.budget_used(study) >= s["n_trials"]:
                    break
                trial = study.ask()
            if trial.number >= s["n_trials"] and not studies.has_study_lock(s["storage"]):
                trial.set_user_attr("reason", studies.OVER_BUDGET)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            self._run_trial(study, trial, base, fixed_model, parent)
            failed, done = studies.failure_rate(study)
            if done >= s["min_trials_for_failure_rate"] and failed / done > s["max_failure_rate"]:
                raise RuntimeError(
                    f"sweep {name} stopped: {failed} of {done} trials failed, more than "
                    f"hydra.sweeper.max_failure_rate={s['max_failure_rate']}"
                )
        tracking.log_sweep_summary(uri, parent, study, s["metric"])

    def _run_trial(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        base: list[str],
        fixed_model: str | None,
        parent: str,
    ) -> None:
        try:
            values = space.suggest(trial, self.space, fixed_model)
        except ConfigError as err:
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        overrides = [
            *base,
            f"tracking.run_name={study.study_name}-trial-{trial.number}",
            *space.as_overrides(values),
        ]
        trial_context = context.TrialContext(
            trial, self.settings["metric"], parent, study.study_name, values
        )
        with context.running(trial_context):
            (result,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        if result.status == JobStatus.COMPLETED and result.return_value is not None:
            study.tell(trial, float(result.return_value))
            log.info(
                "trial %d: %s = %.4f with %s",
                trial.number,
                self.settings["metric"],
                result.return_value,
                values,
            )
            return
        error = result._return_value  # the exception the job raised
        if isinstance(error, optuna.TrialPruned):
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, error)
            return
        message = f"{type(error).__name__}: {error}"[:2000]
        trial.set_user_attr("error", message)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        tracking.record_failed_trial(
            self.config.tracking.uri,
            self.config.tracking.experiment,
            parent,
            trial_context.tags,
            values,
            message,
        )
        log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
