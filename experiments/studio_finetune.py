"""Study: which defaults let a full training run start from a studio model without undoing it.

The studio's retrain adapts only the network's last layer. Its page then shows the command for
a full training on the session's labels and corrections (`landcover-train
data=corrections_mixed init.model=<the studio model> ...`). Run with the framework's training
defaults (AdamW at 1e-3, every layer learning) that command damaged the model: on the real val
patch m_3708035_ne_17_1-2 with the 2018 network one step took the patch's OA from 0.846 to
0.650. This puts each candidate default through the same command, settings and data, one
epoch each, and scores the patch's OA and mIoU (4 classes) of the model before and after:

- `defaults`: the framework's training defaults as they were;
- `lr=1e-4`, `lr=1e-5`: AdamW at a smaller learning rate;
- `head only`: every parameter but the studio's adapted layer frozen (`init.freeze`, batch-norm
  statistics held with their weights), at 1e-3 (what the studio itself fits, on all the data);
- `head only, lr=1e-4`, `head only, lr=1e-5`;
- `the page's command`: the command as the page shows it since this study (`init.freeze=
  [all_but_head] optimizer.lr=1e-4 trainer.keep_start=true`).

Each row runs `--patches` patches (one epoch); the candidates were compared at 32 (two steps of
16), the page's command at the corrections' own 256.

The session: the real patch with its labels (`--labels`), 300 one-pixel road dots painted where
the 2018 map misses the road (as in experiments/studio_corrections.py), one studio retrain.

    .venv/bin/python experiments/studio_finetune.py [--patches 256] [--threads 2]
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import shapely
import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.baselines import patch_pairs, real_data_parser  # noqa: E402
from landcover.artifacts.tutorial_model import load_schema  # noqa: E402
from landcover.data.scenes import quiet_georeferencing_warnings  # noqa: E402
from landcover.predict.writer import class_codes  # noqa: E402
from landcover.studio.app import FINE_TUNE, train_command  # noqa: E402
from landcover.studio.retrain import retrain  # noqa: E402
from landcover.studio.session import Session  # noqa: E402

PATCH = "m_3708035_ne_17_1-2"
BARREN = 3  # barren + impervious in the 4-class evaluation
CANDIDATES = {
    "defaults": [],
    "lr=1e-4": ["optimizer.lr=1e-4"],
    "lr=1e-5": ["optimizer.lr=1e-5"],
    "head only": ["init.freeze=[all_but_head]"],
    "head only, lr=1e-4": ["init.freeze=[all_but_head]", "optimizer.lr=1e-4"],
    "head only, lr=1e-5": ["init.freeze=[all_but_head]", "optimizer.lr=1e-5"],
    "the page's command": ["PAGE"],  # as the page shows it, with the defaults chosen here
}


def slug(name: str) -> str:
    """A candidate's name as an experiment name Hydra takes on the command line."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def four_class_scores(session: Session, labels: Path) -> dict[str, float]:
    """OA and mIoU (4 classes) of the session's current map against the patch's labels."""
    four = load_schema("chesapeake_4class").lookup_table()
    to_four = four[class_codes(session.schema)[: session.schema.num_classes]]
    predicted = to_four[session.class_indices()]
    with rasterio.open(labels) as src:
        target = four[src.read(1)]
    valid = target != 255
    p, t = predicted[valid], target[valid]
    ious = []
    for k in range(4):
        union = ((p == k) | (t == k)).sum()
        if union:
            ious.append(((p == k) & (t == k)).sum() / union)
    return {"oa": float((p == t).mean()), "miou": float(np.mean(ious))}


def main() -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--patches", type=int, default=256, help="data.patches_per_epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="candidates to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("studio_finetune.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = patch_pairs(args.data, "val", args.imagery)
    image, labels = next(p for p in pairs if p[0].name.startswith(PATCH))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        session = Session.open(image, str(args.cntk), Path(tmp) / "session", uri, labels=labels)
        start = four_class_scores(session, labels)
        four = load_schema("chesapeake_4class").lookup_table()
        to_four = four[class_codes(session.schema)[: session.schema.num_classes]]
        with rasterio.open(labels) as src:
            truth = four[src.read(1)]
        missed = np.argwhere((truth == BARREN) & (to_four[session.class_indices()] != BARREN))
        chosen = missed[np.random.default_rng(0).choice(len(missed), 300, replace=False)]
        barren = int(np.flatnonzero(to_four == BARREN)[0])
        dots = shapely.union_all([shapely.Point(c + 0.5, r + 0.5).buffer(0.5) for r, c in chosen])
        session.edits.add(dots, barren, author="study", tab="study")
        retrain(session, uri, "studio", "study")
        studio = four_class_scores(session, labels)
        print(f"2018 network {start}; studio model {studio}", flush=True)
        page = shlex.split(train_command(session, uri))
        command = [word for word in page if word not in FINE_TUNE]  # the defaults as they were
        for name, overrides in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            words = [
                *(page if overrides == ["PAGE"] else command),
                *[o for o in overrides if o != "PAGE"],
                "trainer.max_epochs=1",
                f"data.patches_per_epoch={args.patches}",
                "trainer.progress=false",
                f"tracking.experiment=finetune-{slug(name)}",
            ]
            began = time.perf_counter()
            done = subprocess.run(words, capture_output=True, text=True, cwd=tmp)
            seconds = time.perf_counter() - began
            if done.returncode != 0:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                rows[name] = {"error": done.stderr[-500:]}
                continue
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(f"finetune-{slug(name)}")
            (run,) = client.search_runs([experiment.experiment_id], max_results=1)
            tuned = Session.open(
                image, f"runs:/{run.info.run_id}/model", Path(tmp) / slug(name), uri
            )
            after = four_class_scores(tuned, labels)
            rows[name] = {**after, "seconds": seconds, "run": run.info.run_id}
            print(
                f"{name:>20}: OA {studio['oa']:.3f} -> {after['oa']:.3f}, mIoU "
                f"{studio['miou']:.3f} -> {after['miou']:.3f} ({seconds:.0f} s)",
                flush=True,
            )
    args.out.write_text(json.dumps({"start": start, "studio": studio, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
