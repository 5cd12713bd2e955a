"""The job side of a sweep trial: re-attach to the trial through the study storage.

The sweeper asks Optuna for a trial and launches a training job with `trial.study`,
`trial.storage` and `trial.number` among its overrides. Whatever launcher ran the job (this
process, a joblib worker, a SLURM node, a Ray worker), the job finds its trial in the storage,
sends heartbeats while it trains, reports every epoch (Optuna may prune it there), nests its
MLflow run under the sweep's parent run, and tells the study how it ended. The sweeper only
closes trials whose job never told (a job that could not start, or died).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import optuna
from optuna.trial import TrialState

from landcover.errors import ConfigError, LandcoverError, RunPrunedError
from landcover.sweep import study as studies

log = logging.getLogger(__name__)
# Optuna warns that storage heartbeats are meant for Study.optimize; a sweep built on ask and
# tell records them itself (see `heartbeat`), knowingly: the warning before every trial says
# nothing to the user
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

# study user attrs the sweeper sets so that every job reads the same study settings
METRICS_ATTR = "metrics"
PRUNER_ATTR = "pruner"
PARENT_ATTR = "mlflow_parent_run_id"


class TrialPrunedError(RunPrunedError, optuna.TrialPruned):
    """Optuna's pruning signal that MLflow tracking also recognises (run ends KILLED)."""


@contextlib.contextmanager
def heartbeat(
    storage: optuna.storages.RDBStorage, trial_id: int, interval: float
) -> Iterator[None]:
    """Record the trial's heartbeat every `interval` seconds while the block runs.

    Optuna records heartbeats only inside `Study.optimize`; a sweep built on ask/tell must do
    it itself, or a dead worker's trial would stay RUNNING forever.
    """
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as err:  # a busy database: try again next beat
                log.debug("heartbeat of trial id %d failed: %s", trial_id, err)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)


@dataclass
class TrialContext:
    """One running trial, attached from a job's `trial` config."""

    study: optuna.Study
    trial: optuna.Trial
    metrics: list[str]
    parent_run_id: str | None
    interval: float
    final_epoch: int | None = None  # the last epoch the trial will run (never pruned there)

    @classmethod
    def attach(cls, spec: Any) -> TrialContext:
        """Find trial `spec.number` of study `spec.study`; it must still be RUNNING."""
        storage = studies.make_storage(
            spec.storage, studies.Heartbeat(spec.heartbeat_interval, spec.grace_period)
        )
        try:
            study = optuna.load_study(study_name=spec.study, storage=storage)
        except KeyError as err:
            raise ConfigError(f"trial.study={spec.study!r} is not in {spec.storage}") from err
        study.pruner = studies.make_pruner(study.user_attrs.get(PRUNER_ATTR, {"name": "none"}))
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, spec.number)
        frozen = storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            raise LandcoverError(
                f"trial {spec.number} of study {spec.study} is {frozen.state.name}, not RUNNING: "
                "another worker closed it (its heartbeat went stale?); nothing to do"
            )
        metrics = list(study.user_attrs.get(METRICS_ATTR, ["val/mIoU"]))
        return cls(
            study=study,
            trial=optuna.Trial(study, trial_id),
            metrics=metrics,
            parent_run_id=study.user_attrs.get(PARENT_ATTR),
            interval=spec.heartbeat_interval,
        )

    @property
    def number(self) -> int:
        """The trial's number in its study."""
        return self.trial.number

    @property
    def multi_objective(self) -> bool:
        """Whether the study optimises several metrics (no pruning then)."""
        return len(self.study.directions) > 1

    @property
    def params(self) -> dict[str, Any]:
        """The trial's sampled values (logged as params)."""
        return dict(self.trial.params)

    @property
    def tags(self) -> dict[str, str]:
        """Tags that tie the trial's MLflow run to its study."""
        tags = {"sweep.study": self.study.study_name, "sweep.trial_number": str(self.number)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    @property
    def run_name(self) -> str:
        """`smoke #3 optimizer.lr=0.00123,trainer.max_epochs=2`: the trial and its values."""
        values = ",".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"{self.study.study_name} #{self.number} {values}".strip()

    @contextlib.contextmanager
    def alive(self) -> Iterator[None]:
        """Record heartbeats while the block runs, so a dead job's trial is noticed."""
        # attach() opened an RDB study (behind optuna's caching wrapper, which passes through)
        storage = cast(optuna.storages.RDBStorage, self.study._storage)
        with heartbeat(storage, self.trial._trial_id, self.interval):
            yield

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Epoch callback for the trainer: report the objective, prune when Optuna says so,
        but never at the trial's last epoch (its result is complete: pruning would only throw
        it away)."""
        if self.multi_objective:
            return  # Optuna prunes single-objective studies only
        value = metrics.get(self.metrics[0])
        if value is None or math.isnan(value):
            return
        self.trial.report(float(value), step=epoch)
        if self.final_epoch is not None and epoch >= self.final_epoch:
            return
        if self.trial.should_prune():
            raise TrialPrunedError(
                f"trial {self.number} pruned at epoch {epoch} ({self.metrics[0]}={value:.4f})"
            )

    def objective_values(self, summary: Mapping[str, float]) -> list[float]:
        """The study's objectives, read from the run's summary metrics."""
        missing = [m for m in self.metrics if m not in summary]
        if missing:
            raise ConfigError(
                f"hydra.sweeper.metric {missing} never logged by training; one of {sorted(summary)}"
            )
        return [float(summary[m]) for m in self.metrics]

    def tell(self, state: TrialState, values: list[float] | None = None, error: str = "") -> None:
        """Close the trial; a trial someone else closed meanwhile is left as it is."""
        try:
            if error:
                self.trial.set_user_attr("error", error[:2000])
                self.trial.set_user_attr(studies.FAIL_REASON, studies.last_line(error))
            self.study.tell(self.number, values, state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as err:
            log.warning("trial %d could not be closed as %s: %s", self.number, state.name, err)


TrainFunction = Callable[..., Any]


def run_trial(cfg: Any, train: TrainFunction) -> float | None:
    """Train as one trial: heartbeats while it runs, then tell the study how it ended.

    `train(cfg, epoch_callback=..., extra_tags=..., extra_params=..., run_name=...)` returns
    a FitResult whose `summary` holds the metrics the objectives are read from.
    """
    context = TrialContext.attach(cfg.trial)
    context.final_epoch = int(cfg.trainer.max_epochs) - 1
    with context.alive():
        try:
            result = train(
                cfg,
                epoch_callback=context.report,
                extra_tags=context.tags,
                extra_params={f"sweep.params.{k}": str(v) for k, v in context.params.items()},
                run_name=context.run_name,
            )
            values = context.objective_values(result.summary)
        except TrialPrunedError as err:
            context.tell(TrialState.PRUNED)
            log.info("%s", err)
            return None
        except BaseException as err:
            context.tell(TrialState.FAIL, error=f"{type(err).__name__}: {err}")
            raise
        if any(not math.isfinite(v) for v in values):
            context.tell(TrialState.FAIL, error=f"objective values {values} are not finite")
            return None
        context.tell(TrialState.COMPLETE, values)
        log.info("trial %d: %s = %s", context.number, context.metrics, values)
        return values[0]


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
