"""Optuna sweeps through Hydra multirun, run as users run them: `landcover-train -m ...`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from landcover.sweep.space import parse_parameter, parse_space

pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).parent / "landcover-train"
TINY = [
    "data.synthetic.scenes={train: 2, val: 1}",
    "data.synthetic.size=128",
    "data.patch_size=64",
    "data.patches_per_epoch=16",
    "data.batch_size=8",
    "data.val_tile=64",
    "model.encoder_depth=3",
    "model.decoder_channels=[32,16,8]",
    "trainer.progress=false",
    "trainer.num_panels=0",
    "tracking.log_model=false",
    "tracking.experiment=sweeps",
]


def sweep_command(tmp: Path, *extra: str, sweep: str = "smoke") -> list[str]:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed (run `make setup`)")
    options = [e for e in extra if e.startswith("--")]  # Hydra's flags go before overrides
    extra = tuple(e for e in extra if not e.startswith("--"))
    return [
        str(SCRIPT),
        *options,
        "-m",
        f"sweep={sweep}",
        f"data.root={tmp / 'data'}",
        f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        *TINY,
        *extra,
    ]


def run_workers(command: list[str], cwd: Path, count: int = 2, timeout: int = 900) -> None:
    """`count` copies of one sweep command at once, as workers on several machines would."""
    workers = [
        subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, err[-3000:]


def run_sweep(tmp: Path, *extra: str, sweep: str = "smoke", check: bool = True):
    out = subprocess.run(
        sweep_command(tmp, *extra, sweep=sweep),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and out.returncode != 0:
        raise AssertionError(out.stderr[-3000:])
    return out


def write_sweep(tmp: Path, name: str, body: str) -> str:
    """A study config of the test's own, found through Hydra's --config-dir."""
    folder = tmp / "conf" / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: optuna\n\n" + body
    )
    return f"--config-dir={tmp / 'conf'}"


def load(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'optuna.db'}")


def children(tmp: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    return [
        r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]


def test_search_space_grammar():
    assert parse_parameter("model", "choice(seed, unet)").distribution.choices == ("seed", "unet")
    epochs = parse_parameter("trainer.max_epochs", "int(interval(2, 40))").distribution
    assert (epochs.low, epochs.high) == (2, 40) and isinstance(
        epochs, optuna.distributions.IntDistribution
    )
    lr = parse_parameter("optimizer.lr", "tag(log, interval(1e-4, 1e-2))").distribution
    assert lr.log and lr.low == pytest.approx(1e-4)
    assert parse_parameter("x", "range(1, 4)").distribution.high == 3
    ordered = parse_space({"model.encoder_name": "choice(resnet18)", "model": "choice(seed, unet)"})
    assert [p.name for p in ordered] == ["model", "model.encoder_name"]  # groups first


def test_conditional_encoder_is_only_sampled_for_smp_models():
    from landcover.sweep.space import suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = parse_space(
        {"model": "choice(seed, unet)", "model.encoder_name": "choice(resnet18, resnet34)"}
    )
    for _ in range(12):
        values = suggest(study.ask(), space, None)
        assert ("model.encoder_name" in values) == (values["model"] == "unet")


def test_two_workers_share_one_study(tmp_path):
    """4 trials, 2 concurrent workers, one SQLite study: no duplicate, none lost."""
    run_workers(sweep_command(tmp_path, "hydra.sweeper.n_trials=4"), tmp_path)
    trials = load(tmp_path, "smoke").get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    summary = [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert len(done) == 4 and len(trials) == 4, summary
    assert sorted(t.number for t in trials) == list(range(4))
    runs = children(tmp_path)
    assert len(runs) == 4
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1  # one parent
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.params["study_name"] == "smoke"
    assert parent.data.params["space.optimizer.lr"] == "tag(log, interval(1e-4, 1e-2))"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/trials.csv",
        "sweep/best.json",
        "sweep/plot_optimization_history.png",
        "sweep/plot_intermediate_values.png",
    } <= artifacts
    assert "best/val/mIoU" in parent.data.metrics
    by_number = {int(r.data.tags["sweep.trial_number"]): r for r in runs}
    for trial in trials:
        params = by_number[trial.number].data.params
        assert float(params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert int(params["trainer.max_epochs"]) == trial.params["trainer.max_epochs"]
        assert params["sweep.params.optimizer.lr"] == str(trial.params["optimizer.lr"])


def test_pruning_resume_and_failures(tmp_path):
    config_dir = write_sweep(
        tmp_path,
        "prune",
        """hydra:
  sweeper:
    study_name: prune
    n_trials: 2
    metric: val/mIoU
    pruner: {name: threshold, lower: 2.0, n_warmup_steps: 1}
    params:
      trainer.max_epochs: choice(3)
""",
    )
    run_sweep(tmp_path, config_dir, sweep="prune")
    study = load(tmp_path, "prune")
    assert [t.state for t in study.get_trials()] == [TrialState.PRUNED] * 2
    assert all(sorted(t.intermediate_values) == [0, 1] for t in study.get_trials())
    pruned_runs = children(tmp_path)
    assert {r.info.status for r in pruned_runs} == {"KILLED"}
    assert {r.data.tags.get("optuna.state") for r in pruned_runs} == {"PRUNED"}

    # resume: the same command with a larger budget adds trials, repeats none
    before = {t.number: t.datetime_start for t in study.get_trials()}
    run_sweep(tmp_path, config_dir, "hydra.sweeper.n_trials=3", sweep="prune")
    after = load(tmp_path, "prune").get_trials()
    assert [t.number for t in after] == [0, 1, 2]
    assert {t.number: t.datetime_start for t in after[:2]} == before

    # a trial that raises mid-training (here an absurd learning rate) is recorded FAILED with
    # its error in Optuna and MLflow, and the sweep completes
    config_dir = write_sweep(
        tmp_path,
        "failing",
        """hydra:
  sweeper:
    study_name: failing
    n_trials: 3
    max_failure_rate: 0.9
    pruner: {name: none}
    enqueue:
      - {optimizer.lr: 1.0e+38}
    params:
      optimizer.lr: choice(1.0e+38, 0.001)
      trainer.max_epochs: choice(1)
""",
    )
    run_sweep(tmp_path, config_dir, sweep="failing")
    trials = load(tmp_path, "failing").get_trials()
    assert len(trials) == 3 and trials[0].state == TrialState.FAIL
    error = trials[0].user_attrs["error"]
    assert error.startswith(("RuntimeError", "TrainingDivergedError"))
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 1
    failed = [
        r
        for r in children(tmp_path)
        if r.data.tags["sweep.study"] == "failing" and r.info.status == "FAILED"
    ]
    assert sorted(int(r.data.tags["sweep.trial_number"]) for r in failed) == [
        t.number for t in trials if t.state == TrialState.FAIL
    ]
    assert error.split(":")[0] in failed[0].data.tags["landcover.error"]


def test_failure_rate_stops_the_sweep(tmp_path):
    config_dir = write_sweep(
        tmp_path,
        "doomed",
        """hydra:
  sweeper:
    study_name: doomed
    n_trials: 6
    max_failure_rate: 0.5
    min_trials_for_failure_rate: 2
    params:
      optimizer.lr: choice(1.0e+38)
      trainer.max_epochs: choice(1)
""",
    )
    out = run_sweep(tmp_path, config_dir, sweep="doomed", check=False)
    assert out.returncode != 0
    assert "max_failure_rate" in out.stderr
    assert len(load(tmp_path, "doomed").get_trials()) == 2


def test_a_sweep_whose_every_trial_fails_exits_non_zero_saying_why(tmp_path):
    config_dir = write_sweep(
        tmp_path,
        "hopeless",
        """hydra:
  sweeper:
    study_name: hopeless
    n_trials: 1
    max_failure_rate: 1.0
    pruner: {name: none}
    params:
      optimizer.lr: choice(1.0e+38)
      trainer.max_epochs: choice(1)
""",
    )
    out = run_sweep(tmp_path, config_dir, sweep="hopeless", check=False)
    said = out.stdout + out.stderr
    assert out.returncode != 0
    assert "every trial failed (1)" in said, said[-3000:]
    assert "FAIL: None" not in said
    trials = load(tmp_path, "hopeless").get_trials()
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"] for t in trials)
    assert all(f"trial {t.number} FAIL: {t.user_attrs['fail_reason']}" in said for t in trials)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("landcover.kind") == "sweep"]
    assert (
        parent.info.status == "FAILED"
        and "every trial failed" in parent.data.tags["landcover.error"]
    )
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_sweep_at_a_cluster_that_is_not_there_stops_in_one_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="Ray launcher not installed")
    from tests.local_server import free_port

    address = f"127.0.0.1:{free_port()}"
    out = run_sweep(
        tmp_path,
        "hydra/launcher=ray",
        f"hydra.launcher.ray.init.address={address}",
        check=False,
    )
    assert out.returncode != 0
    assert f"cannot attach to the Ray cluster at {address}: nothing answers there" in out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_trial_is_never_pruned_at_its_last_epoch_and_the_sweep_reports_its_winner(tmp_path):
    """A pruner that prunes everything (threshold above any mIoU) may stop a 2-epoch trial
    after its first epoch, never at its last: 1-epoch trials complete. The sweep ends with the
    best trial, the page to open and the promote command; the parent run says the same."""
    config_dir = write_sweep(
        tmp_path,
        "ends",
        """hydra:
  sweeper:
    study_name: ends
    n_trials: 2
    pruner: {name: threshold, lower: 2.0, n_warmup_steps: 0}
    enqueue:
      - {trainer.max_epochs: 1}
      - {trainer.max_epochs: 2}
    params:
      trainer.max_epochs: choice(1, 2)
""",
    )
    out = run_sweep(tmp_path, config_dir, sweep="ends")
    trials = {t.params["trainer.max_epochs"]: t for t in load(tmp_path, "ends").get_trials()}
    assert trials[1].state == TrialState.COMPLETE  # its only epoch is its last
    assert trials[2].state == TrialState.PRUNED and sorted(trials[2].intermediate_values) == [0]
    said = out.stdout + out.stderr
    best = trials[1]
    assert f"best: trial {best.number}, val/mIoU = {best.value:.4f}" in said
    assert "browse the sweep:" in said
    assert (
        "promote the best: landcover-promote experiment=sweeps sweep=ends metric=val/mIoU" in said
    )
    assert "Heartbeat of storage" not in said
    launched = [line for line in said.splitlines() if "\t#0 : " in line]
    assert launched and "++trial." not in launched[0], launched  # the study's choices only
    assert "trainer.max_epochs=" in launched[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("landcover.kind") == "sweep"]
    description = parent.data.tags["mlflow.note.content"]
    assert "1 complete, 1 pruned" in description and f"| {best.number} |" in description
    (pruned,) = [r for r in runs if r.data.tags.get("landcover.outcome") == "pruned"]
    assert pruned.info.run_name.endswith("(pruned)")
