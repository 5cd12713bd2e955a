"""Study: do the studio's suggestions of where to label next beat random clicks?

A simulated person corrects the imported 2018 network on each real val patch: every "click" is
a disk (radius 4 px) labelled from the patch's ground truth, and after every batch of 5 clicks
the studio's own fit (`landcover.studio.adapt.fit_head`, what `R` runs, without the MLflow
records) retrains the head from the current map. Clicks are chosen three ways:

- suggestions: `landcover.studio.suggest` on the current map (what the page shows),
- random: uniform over the patch (the mean of `--random-seeds` draws),
- errors: the areas with the most wrong pixels (needs the truth: the ceiling).

For budgets of 10, 25 and 50 clicks it prints, and logs to MLflow (experiment
`studio-active-learning`), the patch's mIoU over the pixels NOT clicked (4 classes) and the
mean OA of the other patches (val and train) under the adapted head, per patch and on average,
and the seconds the suggestions took per retrain.

    .venv/bin/python experiments/studio_active_learning.py [--imagery naip-old] [--threads 2]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.baselines import patch_pairs, real_data_parser  # noqa: E402
from landcover.artifacts.tutorial_model import load_schema  # noqa: E402
from landcover.data.scenes import quiet_georeferencing_warnings  # noqa: E402
from landcover.data.schema import IGNORE_INDEX  # noqa: E402
from landcover.predict.writer import class_codes  # noqa: E402
from landcover.studio.adapt import fit_head  # noqa: E402
from landcover.studio.head import Head, SceneFeatures, scene_features  # noqa: E402
from landcover.studio.session import Session  # noqa: E402
from landcover.studio.suggest import area_scores, pick_spread, suggest  # noqa: E402

CLICK_RADIUS = 4
BATCH = 5
BUDGETS = (10, 25, 50)
STRATEGIES = ("suggestions", "random", "errors")


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def disk(shape: tuple[int, int], row: int, col: int, radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - row) ** 2 + (cols - col) ** 2 <= radius**2


def miou(predicted: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> float:
    """Mean IoU over the classes the truth holds (4 classes, labelled pixels where `keep`)."""
    valid = (truth != 255) & keep
    p, t = predicted[valid], truth[valid]
    ious = []
    for c in np.unique(t):
        union = ((p == c) | (t == c)).sum()
        ious.append(((p == c) & (t == c)).sum() / union)
    return float(np.mean(ious))


def oa(predicted: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != 255
    return float((predicted[valid] == truth[valid]).mean())


def choose(
    strategy: str,
    classes: np.ndarray,
    confidence: np.ndarray,
    clicked: np.ndarray,
    truth_index: np.ndarray,
    rng: np.random.Generator,
    skip: set[int],
) -> tuple[list[tuple[int, int]], float]:
    """`BATCH` click centres and the seconds the choice took."""
    began = time.perf_counter()
    if strategy == "suggestions":
        found = suggest(classes, confidence, clicked, BATCH, radius=CLICK_RADIUS, skip=skip)
        centres = [(s.row, s.col) for s in found]
    elif strategy == "errors":
        wrong = ((classes != truth_index) & (truth_index != IGNORE_INDEX)).astype(np.float32)
        scores = area_scores(1.0 - wrong, clicked, CLICK_RADIUS)  # "uncertainty" = error share
        spacing = 4 * CLICK_RADIUS
        found = pick_spread(scores, np.zeros_like(classes), BATCH, spacing, CLICK_RADIUS)
        centres = [(s.row, s.col) for s in found]
    else:
        free = np.argwhere(~clicked)
        centres = [tuple(free[i]) for i in rng.choice(len(free), BATCH, replace=False)]
    return centres, time.perf_counter() - began


def simulate(
    strategy: str,
    features: SceneFeatures,
    base: Head,
    truth_index: np.ndarray,
    truth_four: np.ndarray,
    to_four: np.ndarray,
    others: dict[str, tuple[SceneFeatures, np.ndarray]],
    seed: int,
    skip: set[int],
) -> dict[int, dict[str, float]]:
    rng = np.random.default_rng(seed)

    def score(head: Head, classes: np.ndarray, clicked: np.ndarray, seconds: list) -> dict:
        other_oa = [
            oa(to_four[f.classes_and_confidence(head)[0]], truth) for f, truth in others.values()
        ]
        return {
            "miou": miou(to_four[classes], truth_four, ~clicked),
            "other_oa": float(np.mean(other_oa)),
            "choice_s": float(np.mean(seconds)),
        }

    head = base
    classes, confidence = features.classes_and_confidence(head)
    corrections = np.full(classes.shape, IGNORE_INDEX, np.uint8)
    clicked = np.zeros(classes.shape, bool)
    results: dict[int, dict[str, float]] = {}
    choice_seconds = []
    clicks = 0
    while clicks < max(BUDGETS):
        centres, seconds = choose(strategy, classes, confidence, clicked, truth_index, rng, skip)
        choice_seconds.append(seconds)
        if not centres:  # nothing left to suggest: the rest of the budget is not spent
            break
        for row, col in centres[: max(BUDGETS) - clicks]:
            area = disk(classes.shape, row, col, CLICK_RADIUS)
            clicked |= area
            labelled = area & (truth_index != IGNORE_INDEX)
            corrections[labelled] = truth_index[labelled]
            clicks += 1
        if (corrections != IGNORE_INDEX).any():
            fitted = fit_head(features, head, classes, corrections, IGNORE_INDEX, seed=seed)
            head, classes, confidence = fitted.head, fitted.classes, fitted.confidence
        for budget in BUDGETS:  # the first time the clicks reach a budget
            if clicks >= budget and budget not in results:
                results[budget] = score(head, classes, clicked, choice_seconds)
    for budget in BUDGETS:  # a budget never reached is scored where the clicks stopped
        results.setdefault(budget, score(head, classes, clicked, choice_seconds))
    return results


def main() -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    four = load_schema("chesapeake_4class").lookup_table()
    val = patch_pairs(args.data, "val", args.imagery)
    train = patch_pairs(args.data, "train", args.imagery)

    with tempfile.TemporaryDirectory() as tmp:
        probe = Session.open(
            val[0][0], str(args.cntk), Path(tmp) / "probe", f"sqlite:///{tmp}/m.db"
        )
        schema, module = probe.schema, probe.module
        margin = int(probe.metadata.get("output_margin", 0))
        base = probe.heads["base"]
    to_four = four[class_codes(schema)[: schema.num_classes]]
    skip = {i for i, info in enumerate(schema.classes) if info.ignore}
    lookup = schema.lookup_table()
    everything = {}
    for image, labels in val + train:
        pixels = read(image).astype(np.float32)
        codes = read(labels)[0]
        everything[str(image)] = (
            scene_features(module, pixels, schema.num_classes, margin),
            lookup[codes],
            four[codes],
        )

    table: dict[str, dict[int, list[dict[str, float]]]] = {
        s: {b: [] for b in BUDGETS} for s in STRATEGIES
    }
    start_scores = []
    for image, _ in val:
        features, truth_index, truth_four = everything[str(image)]
        others = {k: (v[0], v[2]) for k, v in everything.items() if k != str(image)}
        classes, _ = features.classes_and_confidence(base)
        start_scores.append(miou(to_four[classes], truth_four, np.ones(classes.shape, bool)))
        for strategy in STRATEGIES:
            seeds = range(args.random_seeds) if strategy == "random" else [0]
            runs = [
                simulate(
                    strategy, features, base, truth_index, truth_four, to_four, others, s, skip
                )
                for s in seeds
            ]
            for budget in BUDGETS:
                table[strategy][budget].append(
                    {key: float(np.mean([r[budget][key] for r in runs])) for key in runs[0][budget]}
                )
        print(f"{image.name}: done", flush=True)

    names = [Path(image).name.replace(f"_{args.imagery}.tif", "") for image, _ in val]
    print(
        f"\n2018 network, {args.imagery}, {len(val)} val patches, clicks of radius "
        f"{CLICK_RADIUS} px, "
        f"a retrain every {BATCH} clicks; mIoU on the patch's unclicked pixels (start: "
        f"{np.mean(start_scores):.3f}), OA on the other {len(everything) - 1} patches\n"
    )
    print(
        "| budget | strategy | mIoU (mean) | "
        + " | ".join(names)
        + " | other patches OA | choice s |"
    )
    print("|" + "---|" * (5 + len(names)))
    metrics = {}
    for budget in BUDGETS:
        for strategy in STRATEGIES:
            rows = table[strategy][budget]
            mean = float(np.mean([r["miou"] for r in rows]))
            other = float(np.mean([r["other_oa"] for r in rows]))
            seconds = float(np.mean([r["choice_s"] for r in rows]))
            per_patch = " | ".join(f"{r['miou']:.3f}" for r in rows)
            cells = [str(budget), strategy, f"{mean:.3f}", per_patch, f"{other:.3f}"]
            print("| " + " | ".join([*cells, f"{seconds:.3f}"]) + " |")
            metrics[f"{strategy}/{budget}/mIoU"] = mean
            metrics[f"{strategy}/{budget}/other_OA"] = other
            metrics[f"{strategy}/{budget}/choice_s"] = seconds
    for budget in BUDGETS:
        wins = [
            s["miou"] > r["miou"]
            for s, r in zip(table["suggestions"][budget], table["random"][budget], strict=True)
        ]
        verdict = (
            "beat"
            if metrics[f"suggestions/{budget}/mIoU"] > metrics[f"random/{budget}/mIoU"]
            else "do NOT beat"
        )
        print(
            f"{budget} clicks: suggestions {verdict} random on average "
            f"(better on {sum(wins)} of {len(wins)} patches)"
        )

    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("studio-active-learning")
    with mlflow.start_run(run_name=f"suggestions vs random, {args.imagery}"):
        mlflow.log_params(
            {
                "imagery": args.imagery,
                "click_radius": CLICK_RADIUS,
                "batch": BATCH,
                "random_seeds": args.random_seeds,
                "patches": len(val),
            }
        )
        mlflow.log_metrics(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
