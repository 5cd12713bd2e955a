"""Benchmark: how fast the console scripts answer `--help` (what shell completion waits for on
every TAB), against importing Hydra itself, best of N runs each, in one run.

    .venv/bin/python experiments/bench_cli.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import mlflow

BIN = Path(sys.executable).parent
COMMANDS = ("landcover-train", "landcover-predict", "landcover-evaluate", "landcover-promote")


def best_seconds(command: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, timeout=120)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    baseline = best_seconds([sys.executable, "-c", "import hydra, omegaconf"], args.repeats)
    print(f"python -c 'import hydra, omegaconf': {baseline:.3f} s")
    results = {"import_hydra_seconds": baseline}
    for command in COMMANDS:
        seconds = best_seconds([str(BIN / command), "--help"], args.repeats)
        print(f"{command} --help: {seconds:.3f} s ({seconds / baseline:.1f}x)")
        results[f"{command}_help_seconds"] = seconds
        results[f"{command}_help_ratio"] = seconds / baseline
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_cli"):
        mlflow.log_param("repeats", args.repeats)
        mlflow.log_metrics(results)


if __name__ == "__main__":
    main()
