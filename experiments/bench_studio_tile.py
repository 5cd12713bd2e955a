"""A whole NAIP quarter-quad in one studio session: seconds, peak memory, corners learnt.

A NAIP quarter-quad is about 6000 x 7500 px (45 Mpx). The studio opens it without `--window`:
the network's last feature map goes to disk block by block as it is computed (the session's
`features/` folder) and only a version's map (5 bytes a pixel) stays in memory. This generates
a 4-band scene of that size (a synthetic landscape tile repeated, georeferenced in UTM), opens
it with a U-Net of the project's default configuration (untrained: the cost does not depend on
the weights) or `--model`, paints near each of the four corners the disk where the map is
most wrong and the scene's labels are one class (with that class, as a person would), retrains,
and checks that every corner's stroke is kept (in the corrections raster) and learnt (the share
of the pixels the map had wrong there that the new map gets right); then reopens the session
(features read back from disk). Everything runs in one fresh process with `--threads` torch
threads whose peak RSS (VmHWM) is read at the end. Figures are printed and logged to MLflow
(experiment `benchmarks`).

    .venv/bin/python experiments/bench_studio_tile.py [--rows 7500 --cols 6000] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_predict import write_scene  # noqa: E402
from experiments.bench_studio_window import child_figures, unet_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
import rasterio
import shapely
import torch
torch.set_num_threads(int(sys.argv[4]))
from landcover.data.scenes import quiet_georeferencing_warnings
from landcover.data.schema import IGNORE_INDEX
from landcover.studio.retrain import retrain
from landcover.studio.session import Session
quiet_georeferencing_warnings()
image, model, folder = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
uri = f"sqlite:///{folder}/mlflow.db"
figures = {}
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
started = time.perf_counter()
session = Session.open(image, model, folder, uri)
figures["open_seconds"] = time.perf_counter() - started
figures["open_peak_mib"] = peak()
height, width = session.features.height, session.features.width
classes = session.class_indices()
with rasterio.open(sys.argv[5]) as src:  # a person paints what is there: the scene's labels
    truth = session.schema.lookup_table()[src.read(1)]
radius, painted = 12, []
for rows, cols in ((slice(0, 400), slice(0, 400)), (slice(0, 400), slice(width - 400, width)),
                   (slice(height - 400, height), slice(0, 400)),
                   (slice(height - 400, height), slice(width - 400, width))):
    # near each corner, the disk where the map is most wrong and the labels are one class
    best = None
    for row in range(rows.start + radius, rows.stop - radius, 4):
        for col in range(cols.start + radius, cols.stop - radius, 4):
            disk = truth[row - radius : row + radius + 1, col - radius : col + radius + 1]
            if disk.min() == disk.max() != 255:
                wrong = int((classes[row - radius : row + radius + 1,
                                     col - radius : col + radius + 1] != disk[0, 0]).sum())
                if best is None or wrong > best[0]:
                    best = (wrong, row, col, int(disk[0, 0]))
    _, row, col, target = best
    session.edits.add(shapely.Point(col + 0.5, row + 0.5).buffer(radius), target,
                      author="bench", tab="b")
    painted.append((row, col, target))
started = time.perf_counter()
version, report, seconds = retrain(session, uri, "studio", "bench")
figures["retrain_seconds"] = time.perf_counter() - started
figures["fit_seconds"] = seconds
figures["retrain_peak_mib"] = peak()
corrections = session.corrections_as_indices()
after = session.class_indices()
kept, learnt = [], []
for row, col, target in painted:
    inner = radius * 2 // 3  # a square well inside the disk
    area = (slice(row - inner, row + inner), slice(col - inner, col + inner))
    kept.append(bool((corrections[area] == target).all()))
    wrong = classes[area] != target  # where the map was wrong: right now?
    learnt.append(float((after[area][wrong] == target).mean()) if wrong.any() else 1.0)
figures["strokes_in_log"] = len({r.stroke for r in session.edits.active()})
figures["corners_kept"] = sum(kept)
figures["corners_learnt_share_min"] = min(learnt)
for corner, share in enumerate(learnt):
    figures[f"corner{corner}_learnt_share"] = share
figures["corrected_accuracy_before"] = report.corrected_accuracy_before
figures["corrected_accuracy_after"] = report.corrected_accuracy_after
del session, classes, after, corrections
started = time.perf_counter()
again = Session.open(image, model, folder, uri)
figures["reopen_seconds"] = time.perf_counter() - started
figures["reopen_version"] = again.current
figures["peak_mib"] = peak()
print(json.dumps(figures))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=7500)
    parser.add_argument("--cols", type=int, default=6000)
    parser.add_argument("--model", help="any model reference (default: the default U-Net)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        image, labels = Path(folder) / "quarter_quad.tif", Path(folder) / "quarter_quad_lc.tif"
        write_scene(image, args.rows, width=args.cols, labels=labels)
        model = args.model
        if model is None:
            model = str(Path(folder) / "unet.pt")
            unet_checkpoint(Path(model))
        started = time.perf_counter()
        session = str(Path(folder) / "session")
        figures = child_figures(
            CHILD, [str(image), model, session, str(args.threads), str(labels)], "whole tile"
        )
        figures["wall_seconds"] = time.perf_counter() - started
        features = sum(p.stat().st_size for p in (Path(folder) / "session").rglob("*.npy"))
        figures["features_on_disk_mib"] = features / 2**20
    megapixels = args.rows * args.cols / 1e6
    print(
        f"{args.cols} x {args.rows} px ({megapixels:.1f} Mpx), {model if args.model else 'unet'}: "
        f"open {figures['open_seconds']:.0f} s (peak {figures['open_peak_mib']:.0f} MiB), "
        f"retrain {figures['retrain_seconds']:.1f} s (fit {figures['fit_seconds']:.1f} s), "
        f"reopen {figures['reopen_seconds']:.1f} s; peak RSS {figures['peak_mib']:.0f} MiB; "
        f"features on disk {figures['features_on_disk_mib']:.0f} MiB; corners kept "
        f"{figures['corners_kept']}/4; learnt per corner "
        + " / ".join(f"{100 * figures[f'corner{i}_learnt_share']:.0f} %" for i in range(4))
        + " of the pixels the map had wrong; the fit's accuracy on the corrected pixels "
        f"{figures['corrected_accuracy_before']:.2f} -> {figures['corrected_accuracy_after']:.2f}",
        flush=True,
    )
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_studio_tile"):
        mlflow.log_params(
            {
                "rows": args.rows,
                "cols": args.cols,
                "threads": args.threads,
                "model": args.model or "unet (default config, untrained)",
            }
        )
        mlflow.log_metrics({k: float(v) for k, v in figures.items()})


if __name__ == "__main__":
    main()
