"""On a Ray cluster a team already runs: two nodes started apart with `ray start` (one CPU
each, on this machine's own address), in a shell whose environment is not the driver's.

A sweep attaches by address and its trials, which need the driver's tracking credentials,
get them on the workers without the password reaching any param, tag or log; a mapping job
spreads over both nodes pixel-identical to the local engine; killing the second node mid-job
still maps every raster on the head (one MLflow run, manifest all done), a re-run maps
nothing, and a new job on the smaller cluster finishes instead of waiting for a node that
will not come back. The tests share one cluster and run in file order (the kill comes last).
"""

from __future__ import annotations

import csv
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import local_ray_turn
from tests.ray_nodes import Cluster, two_node_cluster
from tests.servers import basic_auth_server
from tests.test_mapping_job import job_command, read_maps, tiles
from tests.test_sweep import sweep_command

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the Ray launcher is not installed")
pytestmark = pytest.mark.slow

SECRET = "s3cret-only-the-driver-knows-7Q"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    """The file's cluster, while no other test of this run has a Ray of its own: a Ray started
    on the same machine meanwhile replaces the session (and its auth token) that `ray.init`
    finds by default, and clients of this cluster are then refused."""
    with local_ray_turn(), two_node_cluster(tmp_path_factory.mktemp("nodes")) as running:
        yield running


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """An authenticated MLflow server with one member, `dora`, whose password only the
    driver's environment holds."""
    with basic_auth_server(tmp_path_factory.mktemp("auth"), {"dora": SECRET}) as server:
        yield server


def test_a_sweep_attaches_by_address_and_its_trials_get_the_drivers_credentials(
    cluster, auth_server, tmp_path
):
    url, server_folder = auth_server
    command = sweep_command(
        tmp_path,
        "hydra/launcher=ray",
        f"hydra.launcher.ray.init.address={cluster.address}",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "trainer.num_threads=1",
        f"tracking.uri={url}",
    )
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_USERNAME": "dora",
        "MLFLOW_TRACKING_PASSWORD": SECRET,
    }
    out = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=environment
    )
    assert out.returncode == 0, out.stderr[-4000:]
    said = out.stdout + out.stderr
    assert f"Ray: attached to the cluster at {cluster.address} (2 node(s)" in said, said[-3000:]
    assert "MLFLOW_TRACKING_PASSWORD" in said  # named as carried, never shown

    trials = optuna.load_study(
        study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    ).get_trials()
    summary = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert len(trials) == 4, summary
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), summary
    assert len({(t.params["optimizer.lr"], t.params["trainer.max_epochs"]) for t in trials}) == 4

    client = MlflowClient(url)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update({"MLFLOW_TRACKING_USERNAME": "dora", "MLFLOW_TRACKING_PASSWORD": SECRET})
    try:
        experiment = client.get_experiment_by_name("sweeps")
        runs = client.search_runs([experiment.experiment_id])
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and {r.info.user_id for r in children} == {"dora"}
    assert len({r.data.tags["landcover.node"] for r in children}) == 2  # both nodes trained
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run in runs:  # the password is in no param and no tag
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if SECRET in v], run.info.run_name
    # nor in any log: the command's, the trials' (Hydra's job logs), Ray's on both nodes
    assert SECRET not in out.stdout + out.stderr
    logs = [p for p in tmp_path.rglob("*.log")] + [
        p
        for p in cluster.temp_dir.rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err")
    ]
    assert logs
    leaked = [p for p in logs if SECRET in p.read_text(errors="replace")]
    assert not leaked, leaked


def manifest_rows(folder: Path) -> list[dict[str, str]]:
    path = folder / "manifest.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def run_job(tmp: Path, folder: Path, *extra: str, inputs: str | None = None):
    return subprocess.run(
        job_command(tmp, inputs or f"{tmp}/in/*.tif", folder, *extra),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_mapping_job_spreads_over_both_nodes_pixel_for_pixel(cluster, tmp_path):
    tiles(tmp_path / "in", 8, size=640)  # enough work that the second worker gets some
    local = run_job(tmp_path, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    on_ray = run_job(
        tmp_path,
        tmp_path / "ray",
        "engine.name=ray",
        f"engine.address={cluster.address}",
        "engine.workers=2",
    )
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    rows = manifest_rows(tmp_path / "ray")
    assert {r["status"] for r in rows} == {"done"}
    assert len({r["node"] for r in rows}) == 2, rows  # both nodes mapped
    a, b = read_maps(tmp_path / "local"), read_maps(tmp_path / "ray")
    assert sorted(a) == sorted(b) and len(a) == 8
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_losing_a_node_mid_job_still_maps_every_raster(cluster, tmp_path):
    tiles(tmp_path / "in", 6, size=1792)  # a few seconds each: the kill lands mid-raster
    folder = tmp_path / "maps"
    command = job_command(
        tmp_path,
        f"{tmp_path}/in/*.tif",
        folder,
        "engine.name=ray",
        f"engine.address={cluster.address}",
        "engine.workers=2",
        "engine.placement_timeout=20",
    )
    # asked before the job starts: asking takes seconds (a Ray driver of its own), and in CI the
    # job had mapped every raster before the answer came, so the kill hit an idle node
    head = cluster.head_node_id()[:8]
    job = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    # wait until the second node has mapped a raster (so it holds the next one), then kill it
    while not [r for r in manifest_rows(folder) if r["node"] and not r["node"].startswith(head)]:
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the second node never mapped a raster"
        time.sleep(0.2)
    done = [r for r in manifest_rows(folder) if r["status"] == "done"]
    assert len(done) < 6, "every raster was mapped before the kill"
    cluster.kill_node(1)
    out, err = job.communicate(timeout=600)
    said = out + err
    assert job.returncode == 0, said[-4000:]
    rows = manifest_rows(folder)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}, rows
    assert "re-queued" in said, said[-4000:]  # the killed node's raster went to the head
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    again = run_job(
        tmp_path, folder, "engine.name=ray", f"engine.address={cluster.address}", "engine.workers=2"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 of 6 inputs already mapped" in again.stdout + again.stderr

    # a new job asking for two workers on what is left: the pool shrinks, the job ends
    started = time.monotonic()
    smaller = run_job(
        tmp_path,
        tmp_path / "after",
        "engine.name=ray",
        f"engine.address={cluster.address}",
        "engine.workers=2",
        "engine.placement_timeout=20",
        inputs=f"[{tmp_path}/in/tile_00.tif,{tmp_path}/in/tile_01.tif]",
    )
    assert smaller.returncode == 0, (smaller.stdout + smaller.stderr)[-3000:]
    assert {r["status"] for r in manifest_rows(tmp_path / "after")} == {"done"}
    assert time.monotonic() - started < 240
