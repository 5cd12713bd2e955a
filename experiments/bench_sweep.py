"""Benchmark: the same Optuna study with and without pruning, or with 1 and 2 parallel slots;
wall time and best objective.

Each study is a real `landcover-train -m` sweep (our Hydra sweeper) on generated landscapes:
N trials of a small U-Net, a fixed number of epochs, learning rate and decoder width searched
by TPE with the same seed. Pruning uses the median pruner. `--n-jobs 1 2` instead compares
slots: the same study without pruning through `hydra/launcher=joblib` with
`hydra.sweeper.n_jobs` 1 and 2 and one torch thread per trial. Printed and logged to MLflow
(experiment `benchmarks`).

    .venv/bin/python experiments/bench_sweep.py [--trials 12] [--epochs 8] [--patches 256]
    .venv/bin/python experiments/bench_sweep.py --n-jobs 1 2 [--trials 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna

SCRIPT = Path(sys.executable).parent / "landcover-train"

STUDY = """# @package _global_
defaults:
  - override /hydra/sweeper: optuna

hydra:
  sweeper:
    study_name: bench
    n_trials: {trials}
    metric: val/mIoU
    sampler: {{name: tpe, seed: 0, n_startup_trials: 4}}
    pruner: {pruner}
    params:
      optimizer.lr: tag(log, interval(1e-4, 3e-2))
      model.decoder_channels: choice([32,16,8], [64,32,16])
"""


def run_study(
    folder: Path, trials: int, epochs: int, patches: int, pruner: str, extra: list[str] = ()
) -> tuple[float, float, dict]:
    (folder / "conf" / "sweep").mkdir(parents=True)
    (folder / "conf" / "sweep" / "bench.yaml").write_text(
        STUDY.format(trials=trials, pruner=pruner)
    )
    data = [
        f"data.root={folder / 'data'}",
        "data.synthetic.scenes={train: 3, val: 1}",
        "data.synthetic.size=256",
        "data.patch_size=64",
        "data.batch_size=16",
        "data.val_tile=128",
        "model.encoder_depth=3",
        "trainer.progress=false",
        "trainer.num_panels=0",
        "tracking.log_model=false",
    ]
    # the data is generated once, outside the timed sweep
    subprocess.run(
        [
            str(SCRIPT),
            *data,
            "model.decoder_channels=[32,16,8]",
            "trainer.max_epochs=1",
            "data.patches_per_epoch=16",
            f"tracking.uri=sqlite:///{folder / 'warmup.db'}",
            f"hydra.run.dir={folder / 'warmup'}",
        ],
        check=True,
        capture_output=True,
    )
    command = [
        str(SCRIPT),
        f"--config-dir={folder / 'conf'}",
        "-m",
        "sweep=bench",
        *data,
        f"data.patches_per_epoch={patches}",
        f"trainer.max_epochs={epochs}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
        "tracking.experiment=bench_sweep",
        f"hydra.sweeper.storage=sqlite:///{folder}/optuna.db",
        f"hydra.sweep.dir={folder / 'multirun'}",
        *extra,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=folder)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{folder}/optuna.db")
    states = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    return seconds, study.best_value, states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--patches",
        type=int,
        default=256,
        help="patches per epoch: enough that an epoch outweighs a trial's start",
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument(
        "--n-jobs",
        type=int,
        nargs="+",
        help="compare these slot counts (joblib launcher, no pruning) instead of pruning",
    )
    args = parser.parse_args()
    if args.n_jobs:
        compare_slots(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, pruner in (
            ("no_pruning", "{name: none}"),
            ("median_pruning", "{name: median, n_startup_trials: 3, n_warmup_steps: 0}"),
        ):
            seconds, best, states = run_study(
                Path(tmp) / label, args.trials, args.epochs, args.patches, pruner
            )
            print(f"{label:15s}: {seconds:6.0f} s, best val/mIoU {best:.4f}, trials {states}")
            results[f"{label}_seconds"] = seconds
            results[f"{label}_best_mIoU"] = best
            results[f"{label}_pruned_trials"] = states["PRUNED"]
    ratio = results["median_pruning_seconds"] / results["no_pruning_seconds"]
    gap = 100 * (results["no_pruning_best_mIoU"] - results["median_pruning_best_mIoU"])
    print(f"pruning: {ratio:.2f} of the time, best mIoU {gap:+.2f} points below no pruning")
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_sweep"):
        mlflow.log_params(
            {"trials": args.trials, "epochs": args.epochs, "patches_per_epoch": args.patches}
        )
        mlflow.log_metrics({**results, "time_ratio": ratio, "best_gap_points": gap})


def compare_slots(args: argparse.Namespace) -> None:
    """The same study with each slot count, one torch thread per trial, in one run."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for slots in args.n_jobs:
            extra = [
                "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={slots}",
                f"hydra.sweeper.n_jobs={slots}",
                "trainer.num_threads=1",
            ]
            seconds, best, states = run_study(
                Path(tmp) / f"slots{slots}",
                args.trials,
                args.epochs,
                args.patches,
                "{name: none}",
                extra,
            )
            print(f"{slots} slot(s): {seconds:6.0f} s, best val/mIoU {best:.4f}, trials {states}")
            results[f"slots{slots}_seconds"] = seconds
            results[f"slots{slots}_best_mIoU"] = best
    first, *others = args.n_jobs
    for slots in others:
        ratio = results[f"slots{first}_seconds"] / results[f"slots{slots}_seconds"]
        results[f"speedup_{slots}_over_{first}"] = ratio
        print(f"{slots} slots: {ratio:.2f}x the speed of {first}")
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_sweep slots"):
        mlflow.log_params(
            {
                "trials": args.trials,
                "epochs": args.epochs,
                "patches_per_epoch": args.patches,
                "n_jobs": " ".join(map(str, args.n_jobs)),
            }
        )
        mlflow.log_metrics(results)


if __name__ == "__main__":
    main()
