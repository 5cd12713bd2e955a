"""Two processes that touch one new SQLite MLflow store at once both finish.

MLflow builds a new store's tables on first contact; two processes doing it at once (the two
tasks of `srun -n 2 landcover-train`, parallel sweep slots on a fresh mlflow.db) crashed one of
them with a raw SQL error ("duplicate column name: step" here, "Online migration expected to
match one row" on SLURM). Both processes are released at once by a barrier; with
`prepared=False` (MLflow alone) one of the two crashed in 3 of 3 tries on this machine.
"""

from __future__ import annotations

import multiprocessing
import traceback
from pathlib import Path

import pytest


def _first_contact(uri: str, barrier, answers, prepared: bool) -> None:
    try:
        barrier.wait()
        if prepared:
            from landcover.tracking.runs import use_experiment

            use_experiment(uri, "race")
        import mlflow

        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            mlflow.log_metric("x", 1.0)
        answers.put("ok")
    except Exception as err:  # the raw error is the finding
        answers.put("".join(traceback.format_exception_only(err))[-400:])


def race(uri: str, prepared: bool) -> list[str]:
    context = multiprocessing.get_context("spawn")
    barrier, answers = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_first_contact, args=(uri, barrier, answers, prepared))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    return [answers.get(timeout=5) for _ in workers]


@pytest.mark.slow
def test_two_processes_creating_one_new_store_both_finish(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'store{attempt}' / 'mlflow.db'}"
        assert race(uri, prepared=True) == ["ok", "ok"]
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
