"""Sweeps that scale out: parallel slots through Hydra's launchers, pruning in launched
processes, a killed worker's trial failed and replaced, multi-objective studies, and a parent
run for every multirun. Run as users run them: `landcover-train -m ...`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from landcover.errors import ConfigError
from landcover.sweep import space as spaces
from landcover.sweep import study as studies
from tests.test_sweep import TINY, children, load, run_sweep, sweep_command, write_sweep

pytestmark = pytest.mark.slow
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LAUNCHER_MODULES = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "ray": "hydra_plugins.hydra_ray_launcher",
}


def all_runs(tmp: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def overlapping(runs: list) -> bool:
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "ray"])
def test_parallel_slots_through_a_launcher(tmp_path, launcher):
    """2 slots, 2 trials (what a launcher must show needs no more): both finished, the points
    distinct, one parent, the two at once. Each trial trains 8 epochs (runs of 3 s or more),
    so that a worker process a launcher starts on demand on a loaded machine still overlaps
    its sibling when the two run in parallel (with 1.4 s runs, Ray's two once did not in CI);
    run one after the other they cannot."""
    pytest.importorskip(LAUNCHER_MODULES[launcher], reason=f"{launcher} launcher not installed")
    config_dir = write_sweep(
        tmp_path,
        "slots",
        """hydra:
  sweeper:
    study_name: slots
    n_trials: 2
    n_jobs: 2
    params:
      trainer.max_epochs: choice(8)
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
""",
    )
    run_sweep(
        tmp_path, config_dir, f"hydra/launcher={launcher}", "trainer.num_threads=1", sweep="slots"
    )
    trials = load(tmp_path, "slots").get_trials()
    summary = [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert len(trials) == 2 and all(t.state in FINISHED for t in trials), summary
    points = {(t.params["optimizer.lr"], t.params["trainer.max_epochs"]) for t in trials}
    assert len(points) == 2  # the two slots did not sample the same point
    runs = children(tmp_path)
    assert len(runs) == 2
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    relative = [(start - spans[0][0], end - spans[0][0]) for start, end in spans]
    assert overlapping(runs), f"no two trials ran at the same time (ms): {relative}"
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]
    for run in runs:  # the job nested itself and says which trial it was
        number = int(run.data.tags["sweep.trial_number"])
        assert run.info.run_name.startswith(f"slots #{number} ")
        assert "++trial" not in run.data.tags["landcover.overrides"]


def test_pruning_happens_in_the_launched_process(tmp_path):
    pytest.importorskip(LAUNCHER_MODULES["joblib"], reason="joblib launcher not installed")
    config_dir = write_sweep(
        tmp_path,
        "prune",
        """hydra:
  sweeper:
    study_name: prune
    n_trials: 2
    n_jobs: 2
    pruner: {name: threshold, lower: 2.0, n_warmup_steps: 1}
    params:
      trainer.max_epochs: choice(3)
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
""",
    )
    run_sweep(tmp_path, config_dir, "hydra/launcher=joblib", "trainer.num_threads=1", sweep="prune")
    trials = load(tmp_path, "prune").get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [0, 1] for t in trials)
    runs = children(tmp_path)
    assert {r.info.status for r in runs} == {"KILLED"}
    assert {r.data.tags.get("optuna.state") for r in runs} == {"PRUNED"}
    # the trials ran in joblib's worker processes, not in the sweeper
    assert len({r.data.tags.get("host") for r in runs}) == 1


def test_a_killed_worker_is_replaced(tmp_path):
    """Two workers; SIGKILL one mid-trial; its trial is failed by heartbeat, its MLflow run
    closed, a replacement runs; a re-run leaves nothing RUNNING and n_trials finished."""
    config_dir = write_sweep(
        tmp_path,
        "crash",
        """hydra:
  sweeper:
    study_name: crash
    n_trials: 3
    heartbeat_interval: 1
    grace_period: 4
    pruner: {name: none}
    params:
      trainer.max_epochs: choice(3)
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
""",
    )
    command = sweep_command(tmp_path, config_dir, "data.patches_per_epoch=48", sweep="crash")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]  # noqa: SIM115
    workers = [
        subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        for log in logs
    ]
    victim = workers[0]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            study = load(tmp_path, "crash")
        except KeyError:  # not created yet
            time.sleep(0.5)
            continue
        mine = [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and t.intermediate_values
        ]
        if mine:
            break
        assert victim.poll() is None, (tmp_path / "worker0.log").read_text()[-3000:]
        time.sleep(0.3)
    else:
        pytest.fail("the first worker never reached the middle of a trial")
    killed_trial = mine[0].number
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert workers[1].wait(timeout=600) == 0, (tmp_path / "worker1.log").read_text()[-3000:]
    time.sleep(5)  # past the grace period, then the same command again
    run_sweep(tmp_path, config_dir, "data.patches_per_epoch=48", sweep="crash")
    for log in logs:
        log.close()

    trials = load(tmp_path, "crash").get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[killed_trial].state == TrialState.FAIL
    replacement = [t for t in trials if t.user_attrs.get("replaces") == killed_trial]
    assert len(replacement) == 1 and replacement[0].state in FINISHED
    assert replacement[0].params == by_number[killed_trial].params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state in FINISHED]) == 3
    assert not [r for r in all_runs(tmp_path) if r.info.status == "RUNNING"]
    dead_runs = [
        r for r in children(tmp_path) if r.data.tags["sweep.trial_number"] == str(killed_trial)
    ]
    assert [r.info.status for r in dead_runs] == ["FAILED"]
    assert "worker died" in dead_runs[0].data.tags["landcover.error"]


def test_multi_objective_study_logs_its_pareto_front(tmp_path):
    config_dir = write_sweep(
        tmp_path,
        "pareto",
        """hydra:
  sweeper:
    study_name: pareto
    n_trials: 3
    direction: [maximize, minimize]
    metric: [val/mIoU, model/gflops_per_tile]
    sampler: {name: random, seed: 0}
    params:
      trainer.max_epochs: choice(1)
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
""",
    )
    run_sweep(tmp_path, config_dir, sweep="pareto")
    trials = load(tmp_path, "pareto").get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert all(len(t.values) == 2 and t.values[1] > 0 for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(children(tmp_path)[0].data.tags["mlflow.parentRunId"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/pareto_front.csv", "sweep/plot_pareto_front.png"} <= artifacts
    front = client.download_artifacts(parent.info.run_id, "sweep/pareto_front.csv", str(tmp_path))
    header, *rows = Path(front).read_text().splitlines()
    assert header.startswith("number,val/mIoU,model/gflops_per_tile")
    assert rows and {"best/val/mIoU", "best/model/gflops_per_tile"} <= set(parent.data.metrics)


def test_basic_sweeper_multirun_has_a_parent_and_named_children(tmp_path):
    """Hydra's own grid sweeper: one parent, children named by their overrides."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        str(Path(sys.executable).parent / "landcover-train"),
        "-m",
        "optimizer.lr=0.001,0.002",
        f"data.root={tmp_path / 'data'}",
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "trainer.max_epochs=1",
        *TINY,
    ]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = all_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("landcover.kind") == "multirun"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in kids) == ["optimizer.lr=0.001", "optimizer.lr=0.002"]
    for kid in kids:
        assert kid.info.run_name in kid.data.tags["landcover.overrides"]
        assert "trainer.max_epochs=1" in kid.data.tags["landcover.overrides"]
    client = MlflowClient(uri)
    table = client.download_artifacts(
        parents[0].info.run_id, "multirun/children.csv", str(tmp_path)
    )
    assert len(Path(table).read_text().splitlines()) == 3


def test_parallel_slots_need_a_parallel_launcher(tmp_path):
    out = run_sweep(tmp_path, "hydra.sweeper.n_jobs=2", check=False)
    assert out.returncode != 0
    assert "hydra.sweeper.n_jobs=2" in out.stderr and "joblib" in out.stderr


def test_every_sampler_builds_and_per_trial_seeds_differ():
    space = spaces.parse_space(
        {"optimizer.lr": "tag(log, interval(1e-4, 1e-2))", "trainer.max_epochs": "range(1, 4)"}
    )
    for name in studies.SAMPLERS:
        if name == "grid":
            continue
        study = optuna.create_study(sampler=studies.make_sampler({"name": name, "seed": 0}))
        for _ in range(3):
            trial = study.ask()
            values = spaces.suggest(trial, space, None)
            study.tell(trial, values["optimizer.lr"])
    # two workers with the same configured seed: each trial number has its own seed
    first = [
        studies.make_sampler({"name": "random", "seed": 0}, number).sample_independent(
            None, None, "x", optuna.distributions.FloatDistribution(0, 1)
        )
        for number in range(4)
    ]
    assert len(set(first)) == 4
    assert studies.trial_seed({"seed": 0}, 3) == 3 and studies.trial_seed({}, 3) is None
    with pytest.raises(ConfigError, match="cmaes"):
        studies.make_sampler({"name": "cmaes"}, multi_objective=True)
    with pytest.raises(ConfigError, match="not one of"):
        studies.make_sampler({"name": "annealing"})


def test_grid_from_the_search_space():
    space = spaces.parse_space({"model": "choice(unet, fpn)", "trainer.max_epochs": "range(1, 4)"})
    assert spaces.grid(space) == {"model": ["unet", "fpn"], "trainer.max_epochs": [1, 2, 3]}
    with pytest.raises(ConfigError, match="grid search"):
        spaces.grid(spaces.parse_space({"optimizer.lr": "interval(1e-4, 1e-2)"}))
    # as the sweeper does: ask through a grid sampler, tell through a plain study object
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
    grid = studies.make_sampler({"name": "grid", "seed": 0}, 0, spaces.grid(space))
    asker = optuna.Study(study_name=study.study_name, storage=study._storage, sampler=grid)
    seen = set()
    for _ in range(6):
        trial = asker.ask()
        seen.add(tuple(spaces.suggest(trial, space, None).values()))
        study.tell(trial, 0.0)
    assert len(seen) == 6


def test_storage_urls_become_absolute_and_quoted(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from landcover.sweep.sweeper import _without_password, quote

    assert studies.absolute_sqlite_url("sqlite:///optuna.db", tmp_path) == (
        f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    assert studies.absolute_sqlite_url("sqlite:////abs/o.db") == "sqlite:////abs/o.db"
    url = "postgresql://user:p@ss'w=rd,x@db-host:5432/optuna"
    parsed = OverridesParser.create().parse_override(f"++trial.storage={quote(url)}")
    assert parsed.value() == url
    assert _without_password(url) == "postgresql://user:***@db-host:5432/optuna"
