"""Compare the runs of an MLflow experiment: one table (markdown + CSV), best first.

Reads MLflow alone (no config files, no checkpoints), so it works on any store a team shares:

    .venv/bin/python analysis/compare_runs.py --experiment chesapeake_sample \\
        [--metric val/mIoU] [--tracking-uri sqlite:///mlflow.db] [--out comparison]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

PARAMS = (
    "model.arch",
    "model.encoder",
    "data.name",
    "data.patch_size",
    "trainer.max_epochs",
    "optimizer.name",
    "optimizer.lr",
)
METRICS = ("val/overall_accuracy", "val/mIoU", "val/kappa", "train/loss", "val/loss")


def comparison_rows(client: MlflowClient, experiment: str, metric: str) -> list[dict]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment named {experiment!r} in {client.tracking_uri}")
    rows = []
    for run in client.search_runs([found.experiment_id], max_results=10_000):
        history = client.get_metric_history(run.info.run_id, metric)
        row = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            f"best {metric}": max((m.value for m in history), default=float("nan")),
            "epochs": len(history),
        }
        row.update({p: run.data.params.get(p, "") for p in PARAMS})
        row.update({f"last {m}": run.data.metrics.get(m, float("nan")) for m in METRICS})
        rows.append(row)
    return sorted(
        rows,
        key=lambda r: (
            -r[f"best {metric}"] if r[f"best {metric}"] == r[f"best {metric}"] else float("inf")
        ),
    )


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)\n"
    header = list(rows[0])

    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--metric", default="val/mIoU")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.csv")
    args = parser.parse_args(argv)
    rows = comparison_rows(MlflowClient(args.tracking_uri), args.experiment, args.metric)
    table = markdown(rows)
    sys.stdout.write(table)
    if args.out and rows:
        Path(f"{args.out}.md").write_text(table)
        with open(f"{args.out}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
