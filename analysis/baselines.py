"""Baselines on the real val patches, one scheme for all: the 2018 CNTK model, the seed network
re-trained here, per-pixel gradient boosting and the best modern network.

Every contender maps the val patches through the framework's own tiled predictor (the seed
networks in the tutorial's 256 in / 128 out mode); the written maps and the labels are then
read through the 4-class scheme (water, tree canopy, low vegetation, barren + impervious), so
models with 5 tutorial labels and models with 4 classes are scored on the same pixels. A
prediction of a class outside the scheme (the tutorial's "no data") counts as an error.

    .venv/bin/python analysis/baselines.py [--seed <run>] [--gbm <run>] [--modern <run>] \\
        [--model NAME=REF ...] [--split val|train] [--tta flips|d4|none] \\
        [--cntk ../shared/models/seed-cntk/250epochs.model] [--imagery naip-old] [--out baselines]

`--split train` scores every contender on the train patches: with models trained on the val
patches (`data=chesapeake_sample_swapped`) that is the swapped-split check. The `tta_*` columns
score the same models with test-time augmentation (`--tta`, default flips).

writes <out>.md, <out>.csv and <out>.png (image | labels | each model, for a few patches) and
logs them with the metrics to MLflow (experiment `baselines`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402

import landcover.config  # noqa: E402, F401  (registers the config schemas with Hydra)
from landcover import artifacts  # noqa: E402
from landcover.artifacts.reference import LoadedModel  # noqa: E402
from landcover.artifacts.tutorial_model import load_schema  # noqa: E402
from landcover.data.scenes import (  # noqa: E402
    find_pairs,
    label_path_for,
    quiet_georeferencing_warnings,
)
from landcover.data.schema import IGNORE_INDEX, ClassSchema  # noqa: E402
from landcover.metrics import scores_from_matrix  # noqa: E402
from landcover.predict.predictor import PredictSettings, predict_raster  # noqa: E402
from landcover.predict.prior import literal_template, prior_table, with_prior  # noqa: E402
from landcover.tracking.figures import class_map_rgb, image_to_rgb  # noqa: E402

LABEL_SUFFIX = "_lc.tif"  # Chesapeake Conservancy labels beside every patch


def patch_pairs(data: Path, split: str, imagery: str) -> list[tuple[Path, Path]]:
    """(image, labels) of the real patches of one split in one imagery; exits naming the
    folder where there are none."""
    pairs = [
        (Path(image), Path(label))
        for image, label in find_pairs(
            pattern=str(data / split / f"*_{imagery}.tif"),
            manifest=None,
            image_suffix=f"_{imagery}.tif",
            label_suffix=LABEL_SUFFIX,
        )
    ]
    if not pairs:
        sys.exit(f"error: no {imagery} patches under {data / split}")
    return pairs


def settings_for(model: LoadedModel, tta: str = "none") -> PredictSettings:
    """The predictor's defaults; centre-output nets get the tutorial's 256 px tiles (the
    predictor then uses their margin as context, whatever the overlap)."""
    return PredictSettings.defaults(
        tile_size=256 if model.output_margin else 512, progress=False, tta=tta
    )


def score(
    model: LoadedModel,
    pairs: list[tuple[Path, Path]],
    scheme: ClassSchema,
    workdir: Path,
    tta: str = "none",
    layer_suffix: str = "_nlcd.tif",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Confusion matrix in `scheme` (+ one column for predictions outside it) and the maps; a
    model with a prior layer reads it beside each image (`<patch><layer_suffix>`)."""
    lookup = scheme.lookup_table()
    n = scheme.num_classes
    matrix = np.zeros((n + 1, n + 1), dtype=np.int64)
    maps = []
    for image, label in pairs:
        output = workdir / f"{image.stem}_{tta}.tif"
        layer = label_path_for(str(label), LABEL_SUFFIX, layer_suffix)
        settings = dataclasses.replace(
            settings_for(model, tta), prior_layer=literal_template(layer)
        )
        result = predict_raster(model, image, output, settings)
        with rasterio.open(result.outputs["classes"]) as src:
            predicted = lookup[src.read(1)]
        with rasterio.open(label) as src:
            target = lookup[src.read(1)]
        maps.append(predicted)
        labelled = target != IGNORE_INDEX
        predicted = np.where(predicted == IGNORE_INDEX, n, predicted)
        np.add.at(matrix, (target[labelled], predicted[labelled]), 1)
    return matrix, maps


def scores_of(matrix: np.ndarray, scheme: ClassSchema) -> dict[str, float]:
    """OA, IoU per class, mIoU (over the classes present) and the share predicted outside the
    scheme, from a confusion matrix with one extra "outside" column."""
    scores = scores_from_matrix(matrix, list(range(scheme.num_classes)))
    metrics = scores.as_metrics(
        [*scheme.names, "outside"], list(range(scheme.num_classes)), prefix=""
    )
    return {
        "overall_accuracy": metrics["overall_accuracy"],
        **{f"iou_{c}": metrics.get(f"iou_{c}", float("nan")) for c in scheme.names},
        "mIoU": metrics["mIoU"],
        "outside_scheme": matrix[:, -1].sum() / max(matrix.sum(), 1),
    }


def figure(pairs, names, all_maps, scheme: ClassSchema, count: int) -> plt.Figure:
    lookup = scheme.lookup_table()
    rows = min(count, len(pairs))
    columns = 2 + len(names)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for row in range(rows):
        image, label = pairs[row]
        with rasterio.open(image) as src:
            pixels = src.read()
        with rasterio.open(label) as src:
            target = lookup[src.read(1)]
        panels = [image_to_rgb(pixels), class_map_rgb(target, scheme)]
        panels += [class_map_rgb(maps[row], scheme) for maps in all_maps]
        for column, (panel, title) in enumerate(
            zip(panels, ["image", "labels", *names], strict=True)
        ):
            axes[row, column].imshow(panel)
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def real_data_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every study of the real patches shares: the 2018 model, the patches and
    their imagery, found in ../shared or $LANDCOVER_SHARED_DIR."""
    shared = Path(os.environ.get("LANDCOVER_SHARED_DIR", "../shared"))
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cntk", type=Path, default=shared / "models/seed-cntk/250epochs.model")
    parser.add_argument("--data", type=Path, default=shared / "data/chesapeake-sample")
    parser.add_argument("--imagery", default="naip-old")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser(__doc__.splitlines()[0])
    parser.add_argument("--seed", help="re-trained seed network (run / models:/)")
    parser.add_argument("--gbm", help="model=pixel_gbm run")
    parser.add_argument("--modern", help="best modern network")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=REF",
        help="one more contender (any model reference), e.g. 'chesapeake_best=<run id>'",
    )
    parser.add_argument(
        "--tta", default="flips", help="test-time augmentation of the extra columns (none: off)"
    )
    parser.add_argument(
        "--prior",
        help="also score every contender with this prior layer (conf/prior/, e.g. nlcd_legend)",
    )
    parser.add_argument("--split", default="val")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--panels", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("baselines"))
    args = parser.parse_args(argv)

    pairs = patch_pairs(args.data, args.split, args.imagery)
    scheme = load_schema("chesapeake_4class")
    references = {"CNTK 2018 (250 epochs, imported)": str(args.cntk)}
    named = {"seed re-trained here": args.seed, "pixel gradient boosting": args.gbm}
    named["modern network"] = args.modern
    references.update({name: ref for name, ref in named.items() if ref})
    for spec in args.model:
        name, _, ref = spec.partition("=")
        if not ref:
            sys.exit(f"error: --model {spec!r} is not NAME=REF")
        references[name] = ref
    contenders = {
        name: artifacts.load(ref, tracking_uri=args.tracking_uri)
        for name, ref in references.items()
    }
    if args.prior:
        table = prior_table(args.prior)
        for name, model in list(contenders.items()):
            contenders[f"{name} + {args.prior} prior"] = with_prior(model, table)
    rows, all_maps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, model) in enumerate(contenders.items()):
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            matrix, maps = score(model, pairs, scheme, workdir)
            all_maps.append(maps)
            row = {"model": name, "reference": model.reference}
            row["arch"] = model.metadata.get("arch", "?")
            row.update(scores_of(matrix, scheme))
            if args.tta != "none":
                augmented = scores_of(score(model, pairs, scheme, workdir, args.tta)[0], scheme)
                row["tta_overall_accuracy"] = augmented["overall_accuracy"]
                row["tta_mIoU"] = augmented["mIoU"]
            rows.append(row)
    columns = ["overall_accuracy", *[f"iou_{c}" for c in scheme.names], "mIoU", "outside_scheme"]
    if args.tta != "none":
        columns += ["tta_overall_accuracy", "tta_mIoU"]
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
        *[f"| {r['model']} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |" for r in rows],
    ]
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table)
    with open(f"{args.out}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = figure(pairs, list(contenders), all_maps, scheme, args.panels)
    fig.savefig(f"{args.out}.png", dpi=100)
    print(table)
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("baselines")
    with mlflow.start_run(run_name=f"baselines {args.split} {args.imagery}"):
        mlflow.log_params({"split": args.split, "imagery": args.imagery, "patches": len(pairs)})
        for r in rows:
            key = r["model"].split(" (")[0].replace(" ", "_")
            mlflow.log_param(f"model.{key}", r["reference"][:250])
            mlflow.log_metrics({f"{key}/{c}": float(r[c]) for c in columns if np.isfinite(r[c])})
        mlflow.log_text(table, "baselines.md")
        mlflow.log_figure(fig, "baselines.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
