"""The 2018 tutorial's two CNTK models, imported, scored on the real sample patches.

Both published models are imported (no CNTK), then mapped patch by patch in the tutorial's
evaluation mode (256 in, centre 128 out, 64 px of context; mirrored at patch edges) with the
5-label scheme, on train and val, naip-old and naip-new. Prints a table (overall accuracy over
labelled pixels, trees-vs-herbaceous accuracy, mIoU) and logs it to MLflow (experiment
`cntk_import`, one run).

    .venv/bin/python experiments/eval_cntk_models.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow
import numpy as np
from hydra import compose, initialize_config_dir

import landcover.config  # noqa: F401  (registers the config schemas with Hydra)
from landcover.artifacts.cntk_graph import import_cntk_seed
from landcover.artifacts.reference import from_module
from landcover.artifacts.tutorial_model import load_schema, tutorial_metadata, tutorial_model
from landcover.interop.import_cntk import evaluate_import
from landcover.paths import COMMANDS_CONFIG_DIR

MODELS = ("1epoch", "250epochs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(os.environ.get("LANDCOVER_SHARED_DIR", "../shared"))
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    schema = load_schema("tutorial_5label")
    rows = []
    with initialize_config_dir(config_dir=COMMANDS_CONFIG_DIR, version_base="1.3"):
        for name in MODELS:
            path = args.shared / "models" / "seed-cntk" / f"{name}.model"
            imported = import_cntk_seed(path)
            for imagery in ("naip-old", "naip-new"):
                for split in ("train", "val"):
                    cfg = compose(
                        "import_cntk",
                        [
                            f"file={path}",
                            f"evaluate_split={split}",
                            f"data.root={args.shared.resolve()}/data/chesapeake-sample",
                            f"data.image_suffix=_{imagery}.tif",
                        ],
                    )
                    model = tutorial_model(imported.net)
                    metadata = tutorial_metadata(schema, path, "-")
                    metrics, _ = evaluate_import(cfg, from_module(model, metadata), schema)
                    rows.append((name, imagery, split, metrics))
    header = "| model | imagery | split | overall accuracy | trees IoU | herbaceous IoU | mIoU |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, imagery, split, m in rows:
        lines.append(
            f"| {name} | {imagery} | {split} | {m['val/overall_accuracy']:.3f} | "
            f"{m['val/iou_trees']:.3f} | {m['val/iou_herbaceous']:.3f} | {m['val/mIoU']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("cntk_import")
    with mlflow.start_run(run_name="cntk models on chesapeake-sample"):
        for name, imagery, split, m in rows:
            mlflow.log_metrics(
                {
                    f"{name}.{imagery}.{split}.{k.removeprefix('val/')}": float(v)
                    for k, v in m.items()
                    if np.isfinite(v)
                }
            )
        mlflow.log_text(table + "\n", "cntk_models.md")


if __name__ == "__main__":
    main()
