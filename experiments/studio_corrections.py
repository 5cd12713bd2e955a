"""Study: correcting the 2018 network's missed road on a real val patch through the studio.

The road of val patch m_3708035_ne_17_1-2 is mostly mapped as vegetation by the imported 2018
CNTK network (barren + impervious IoU about 0.06). A person looking at the imagery paints road
where the map misses it; here the pixels are chosen from the labels the way a person would
choose them by eye: N pixels the labels call barren / impervious and the map calls something
else, spread along the road. Each N is painted through the studio's edit log (one-pixel brush
dots), retrained through the studio's own retrain (an MLflow run in a temporary store), and
scored:

- that patch's barren + impervious IoU and OA (4 classes, whole patch) before and after, and
  the same without the corrected pixels themselves (what the model generalised, not what it
  was told);
- every OTHER val and train patch's OA and barren + impervious IoU with the adapted head:
  corrections must not break the rest;
- the seconds of the fit and of the whole retrain (run, dataset, figure, logged model) with
  torch on `--threads` cores.

    .venv/bin/python experiments/studio_corrections.py [--pixels 100 300 1000] [--threads 2]
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
from landcover.predict.writer import class_codes  # noqa: E402
from landcover.studio.head import Head, SceneFeatures, scene_features  # noqa: E402
from landcover.studio.retrain import retrain  # noqa: E402
from landcover.studio.session import Session  # noqa: E402
from landcover.studio.strokes import stroke_area  # noqa: E402

PATCH = "m_3708035_ne_17_1-2"
BARREN = 3  # barren + impervious in the 4-class evaluation


def scores(predicted: np.ndarray, target: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """OA and barren + impervious IoU over labelled pixels (optionally only where `keep`)."""
    valid = target != 255
    if keep is not None:
        valid &= keep
    p, t = predicted[valid], target[valid]
    union = ((p == BARREN) | (t == BARREN)).sum()
    return {
        "oa": float((p == t).mean()),
        "iou": float(((p == BARREN) & (t == BARREN)).sum() / union) if union else float("nan"),
        "pixels": int(valid.sum()),
    }


def main() -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser(__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    four = load_schema("chesapeake_4class").lookup_table()

    pairs = patch_pairs(args.data, "val", args.imagery) + patch_pairs(
        args.data, "train", args.imagery
    )
    target_image, target_labels = next(p for p in pairs if p[0].name.startswith(PATCH))
    others = [p for p in pairs if p[0] != target_image]

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        base = Session.open(target_image, str(args.cntk), Path(tmp) / "probe", uri)
        to_four = four[class_codes(base.schema)[: base.schema.num_classes]]  # index -> 4-class
        features = {str(img): features_of(base, img) for img, _ in others}
        labels = {str(img): four[read(lab)[0]] for img, lab in pairs}
        truth = labels[str(target_image)]
        start_map = to_four[base.class_indices()]
        missed = np.argwhere((truth == BARREN) & (start_map != BARREN))
        print(
            f"{PATCH}: {len(missed)} barren/impervious pixels the 2018 map misses "
            f"({int((truth == BARREN).sum())} in the labels); {args.threads} torch threads\n"
        )
        header = (
            "| corrected px | IoU b+i | OA | IoU b+i w/o corrected | OA w/o corrected "
            "| other patches OA (mean) | other patches IoU b+i (mean) | fit s | retrain s |"
        )
        print(header)
        print("|" + "---|" * 9)
        row(
            start_map,
            truth,
            None,
            others,
            features,
            base.heads["base"],
            base,
            labels,
            to_four,
            "0 (the 2018 map)",
            "",
            "",
        )
        rng = np.random.default_rng(args.seed)
        for count in args.pixels:
            session = Session.open(target_image, str(args.cntk), Path(tmp) / f"n{count}", uri)
            chosen = missed[np.sort(rng.choice(len(missed), min(count, len(missed)), False))]
            for r, c in chosen:
                session.edits.add(
                    stroke_area("paint", [[c + 0.5, r + 0.5]], 0.5, *truth.shape[::-1]),
                    int(np.flatnonzero(to_four == BARREN)[0]),
                    author="study",
                    tab="study",
                )
            began = time.perf_counter()
            version, report, fit_seconds = retrain(session, uri, "studio-study", "study")
            total = time.perf_counter() - began
            corrected = np.zeros(truth.shape, bool)
            corrected[chosen[:, 0], chosen[:, 1]] = True
            row(
                to_four[session.class_indices()],
                truth,
                corrected,
                others,
                features,
                session.heads[version.id],
                session,
                labels,
                to_four,
                str(len(chosen)),
                f"{fit_seconds:.2f}",
                f"{total:.1f}",
            )
    return 0


def features_of(session: Session, image: Path) -> SceneFeatures:
    pixels = read(image).astype(np.float32)
    margin = int(session.metadata.get("output_margin", 0))
    return scene_features(session.module, pixels, session.schema.num_classes, margin)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def row(
    mapped,
    truth,
    corrected,
    others,
    features,
    head: Head,
    session,
    labels,
    to_four,
    name,
    fit_s,
    total_s,
) -> None:
    whole = scores(mapped, truth)
    rest = scores(mapped, truth, None if corrected is None else ~corrected)
    other = [
        scores(to_four[features[img].classes_and_confidence(head)[0]], labels[img])
        for img in features
    ]
    oa = np.mean([o["oa"] for o in other])
    iou = np.nanmean([o["iou"] for o in other])
    print(
        f"| {name} | {whole['iou']:.3f} | {whole['oa']:.3f} | {rest['iou']:.3f} | "
        f"{rest['oa']:.3f} | {oa:.3f} | {iou:.3f} | {fit_s} | {total_s} |"
    )


if __name__ == "__main__":
    sys.exit(main())
