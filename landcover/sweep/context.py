"""The trial a training job belongs to, handed from the sweeper to `landcover-train`.

Hydra's basic launcher runs each job in the sweeper's own process, so a module-level slot is
enough: the sweeper fills it before launching a job and clears it after. Training reads it to
report each epoch's objective to Optuna (which may prune the trial) and to nest its MLflow run
under the sweep's parent run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import optuna

from landcover.errors import RunPrunedError


class TrialPrunedError(RunPrunedError, optuna.TrialPruned):
    """Optuna's pruning signal that MLflow tracking also recognises (run ends KILLED)."""


@dataclass
class TrialContext:
    trial: optuna.Trial
    metric: str
    parent_run_id: str | None
    study_name: str
    params: Mapping[str, object] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        tags = {"sweep.study": self.study_name, "sweep.trial_number": str(self.trial.number)}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Epoch callback for the trainer: report the objective, prune when Optuna says so."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            return
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            raise TrialPrunedError(
                f"trial {self.trial.number} pruned at epoch {epoch} ({self.metric}={value:.4f})"
            )


_active: TrialContext | None = None


def active_trial() -> TrialContext | None:
    return _active


@contextlib.contextmanager
def running(context: TrialContext) -> Iterator[TrialContext]:
    global _active
    _active = context
    try:
        yield context
    finally:
        _active = None
