"""The team set-up for real: PostgreSQL behind an MLflow tracking server and an Optuna study.

A training run goes to `mlflow server` backed by PostgreSQL (artifacts served by the server),
and two sweep workers share one Optuna study stored in the same PostgreSQL: no trial is
duplicated or lost. Skipped, with the reason, where PostgreSQL cannot run.
"""

from __future__ import annotations

import subprocess

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from landcover.local_server import mlflow_server_command
from landcover.predict.reference import load_model_reference
from landcover.train import train
from tests.conftest import compose_train
from tests.postgres import postgres_server, skip_reason
from tests.servers import HOST, free_port, running
from tests.test_sweep import run_workers, sweep_command
from tests.test_train_e2e import tiny_overrides

REASON = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    with postgres_server(("mlflow", "optuna")) as database:
        port = free_port()
        command = mlflow_server_command(
            f"{database}/mlflow", port, "--artifacts-destination", str(tmp / "artifacts")
        )
        url = f"http://{HOST}:{port}"
        with running(command, f"{url}/health", tmp / "mlflow-server.log", {}):
            yield database, url, tmp


def test_training_run_lands_in_the_postgres_backed_server(team, tiny_synthetic):
    database, url, tmp = team
    result = train(
        compose_train(
            *tiny_overrides(
                tiny_synthetic,
                tmp,
                "trainer.max_epochs=1",
                "trainer.num_panels=0",
                f"tracking.uri={url}",
            )
        )
    )
    client = MlflowClient(url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # stored by the server
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"confusion_matrix"}
    assert list((tmp / "artifacts").rglob("confusion_matrix.png"))
    model = load_model_reference(result.run_id, tracking_uri=url, device="cpu")
    assert model.bands == 4
    # the rows are in PostgreSQL, not in a file beside us
    tables = subprocess.run(
        ["psql", f"{database}/mlflow", "-tAc", "SELECT count(*) FROM runs"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if tables.returncode == 0:
        assert int(tables.stdout.strip()) == 1


def test_two_workers_share_a_study_stored_in_postgres(team):
    database, url, tmp = team
    storage = f"{database}/optuna"
    command = sweep_command(
        tmp,
        "hydra.sweeper.n_trials=6",
        f"hydra.sweeper.storage={storage}",
        f"tracking.uri={url}",
    )
    run_workers(command, tmp)
    trials = optuna.load_study(study_name="smoke", storage=storage).get_trials()
    summary = [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert sorted(t.number for t in trials) == list(range(6)), summary
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), summary
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    numbers = sorted(int(r.data.tags["sweep.trial_number"]) for r in children)
    assert numbers == list(range(6))  # none duplicated, none lost
