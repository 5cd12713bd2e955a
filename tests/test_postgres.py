"""The team set-up for real: PostgreSQL behind an authenticated MLflow server and a study.

As the README's team recipe: `mlflow server --app-name basic-auth` backed by PostgreSQL (runs,
and the users and permissions too), artifacts served by the server, an admin whose password
comes from the environment. An anonymous request is refused; a user created by the admin
trains with credentials passed the MLflow way (`MLFLOW_TRACKING_USERNAME/PASSWORD`), and two
sweep workers share one Optuna study stored in the same PostgreSQL: no trial is duplicated or
lost. Skipped, with the reason, where PostgreSQL cannot run.
"""

from __future__ import annotations

import os
import subprocess

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from landcover import artifacts
from landcover.training.train import train
from tests.conftest import compose_train
from tests.postgres import postgres_server, skip_reason
from tests.servers import add_members, basic_auth_server, patched_environ
from tests.test_sweep import run_workers, sweep_command
from tests.test_train_e2e import tiny_overrides

REASON = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    with postgres_server(("mlflow", "optuna", "mlflow_auth")) as database:
        stores = (f"{database}/mlflow", f"{database}/mlflow_auth")
        # the admin creates a team member; everyone else authenticates as that member
        alice = {"alice": "alice-password-1"}
        with basic_auth_server(tmp, alice, stores) as (url, _), patched_environ(member("alice")):
            yield database, url, tmp


def test_anonymous_and_wrong_credentials_are_refused(team):
    _, url, _ = team
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert urllib_status(search) == 401
    assert urllib_status(search, ("alice", "wrong")) == 401
    assert urllib_status(search, ("alice", "alice-password-1")) == 200


def urllib_status(url: str, credentials: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


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
    assert run.info.user_id == "alice"  # recorded as the authenticated member
    assert urllib_status(f"{url}/api/2.0/mlflow/runs/get?run_id={result.run_id}") == 401
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # stored by the server
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"confusion_matrix"}
    assert list((tmp / "artifacts").rglob("confusion_matrix.png"))
    model = artifacts.load(result.run_id, tracking_uri=url, device="cpu")
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
        "hydra.sweeper.n_trials=4",
        f"hydra.sweeper.storage={storage}",
        f"tracking.uri={url}",
    )
    run_workers(command, tmp)
    trials = optuna.load_study(study_name="smoke", storage=storage).get_trials()
    summary = [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert sorted(t.number for t in trials) == list(range(4)), summary
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), summary
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    numbers = sorted(int(r.data.tags["sweep.trial_number"]) for r in children)
    assert numbers == list(range(4))  # none duplicated, none lost


def landcover(command: str, *args: str, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    import sys
    from pathlib import Path

    return subprocess.run(
        [str(Path(sys.executable).parent / command), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, **env},
    )


def member(name: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": f"{name}-password-1"}


def test_a_team_promotes_grants_and_refuses_in_one_line(team, tiny_synthetic):
    """Alice's first promotion works (basic-auth answers 403 for a model that does not exist
    yet); Bob, once Alice grants him EDIT, records a run in her experiment; Carol, never
    granted, gets one line naming the permission and how it is granted, no traceback."""
    _, url, tmp = team
    add_members(url, f"{team[0]}/mlflow_auth", {n: f"{n}-password-1" for n in ("bob", "carol")})
    overrides = tiny_overrides(
        tiny_synthetic,
        tmp,
        "trainer.max_epochs=1",
        "trainer.num_panels=0",
        "tracking.system_metrics=false",
        f"tracking.uri={url}",
        "tracking.experiment=team-e2e",
    )
    result = train(compose_train(*overrides))  # as alice
    promoted = landcover(
        "landcover-promote",
        f"run={result.run_id}",
        "registry.name=team-model",
        f"tracking.uri={url}",
        env=member("alice"),
        cwd=tmp,
    )
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    champion = MlflowClient(url).get_model_version_by_alias("team-model", "champion")
    assert champion.run_id == result.run_id

    granted = landcover(
        "landcover-team",
        "grant",
        "bob",
        "--experiment",
        "team-e2e",
        "--model",
        "team-model",
        "--permission",
        "EDIT",
        "--tracking-uri",
        url,
        env=member("alice"),
        cwd=tmp,
    )
    assert granted.returncode == 0, granted.stderr[-3000:]
    assert "granted: bob EDIT on experiment 'team-e2e'" in granted.stdout

    bob = landcover("landcover-train", *overrides, env=member("bob"), cwd=tmp)
    assert bob.returncode == 0, bob.stderr[-3000:]
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("team-e2e")
    users = {r.info.user_id: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert users.get("bob") == "FINISHED", users

    carol = landcover("landcover-train", *overrides, env=member("carol"), cwd=tmp)
    assert carol.returncode == 1
    assert "Traceback" not in carol.stderr, carol.stderr[-3000:]
    last = carol.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the tracking server refused carol"), last
    assert "landcover-team grant carol" in last
