"""Compare the runs of an MLflow experiment or of one sweep: a table and two plots.

Reads MLflow alone (no config files, no checkpoints), so it works on any store a team shares:

    .venv/bin/python analysis/compare_runs.py --experiment chesapeake_sample \\
        [--sweep <study name>] [--metric val/mIoU] [--tracking-uri sqlite:///mlflow.db] \\
        [--out comparison]

writes <out>.md and <out>.csv (best first) and <out>_epochs.png / <out>_architecture.png
(the objective against the number of epochs trained and against the architecture).
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


def comparison_rows(
    client: MlflowClient, experiment: str, metric: str, sweep: str | None = None
) -> list[dict]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment named {experiment!r} in {client.tracking_uri}")
    rows = []
    query = f"tags.`sweep.study` = '{sweep}'" if sweep else ""
    for run in client.search_runs([found.experiment_id], filter_string=query, max_results=10_000):
        if run.data.tags.get("landcover.kind") == "sweep":
            continue  # a sweep's parent run holds no training
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


def plots(rows: list[dict], metric: str, out: str) -> list[Path]:
    """The objective against epochs trained and against architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = f"best {metric}"
    scored = [r for r in rows if r[best] == r[best]]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["epochs"] for r in scored], [r[best] for r in scored])
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(best)
    ax.set_title(f"{best} against epochs")
    written.append(_save(fig, Path(f"{out}_epochs.png")))
    arches = sorted({r["model.arch"] or "?" for r in scored})
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, arch in enumerate(arches):
        values = [r[best] for r in scored if (r["model.arch"] or "?") == arch]
        ax.scatter([i] * len(values), values, alpha=0.7)
    ax.set_xticks(range(len(arches)), arches)
    ax.set_ylabel(best)
    ax.set_title(f"{best} by architecture")
    written.append(_save(fig, Path(f"{out}_architecture.png")))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # loaded (headless) by plots()

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    parser.add_argument("--sweep", default=None, help="only the trials of this study")
    parser.add_argument("--metric", default="val/mIoU")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.csv")
    args = parser.parse_args(argv)
    rows = comparison_rows(
        MlflowClient(args.tracking_uri), args.experiment, args.metric, args.sweep
    )
    table = markdown(rows)
    sys.stdout.write(table)
    if args.out and rows:
        Path(f"{args.out}.md").write_text(table)
        with open(f"{args.out}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plots(rows, args.metric, args.out)


if __name__ == "__main__":
    main()
