"""A whole NAIP quarter-quad in one studio session: seconds, peak memory, corners learnt.

A NAIP quarter-quad is about 6000 x 7500 px (45 Mpx). The studio opens it without `--window`:
the network's last feature map goes to disk block by block as it is computed (the session's
`features/` folder) and only a version's map (5 bytes a pixel) stays in memory. This generates
a 4-band scene of that size (a synthetic landscape tile repeated, georeferenced in UTM), opens
it with a U-Net of the project's default configuration (untrained: the cost does not depend on
the weights) or `--model`, paints a disk of a class the map does not show at each of the four
corners, retrains, and checks that every corner's stroke is kept (in the edit log and the
corrections raster) and learnt (the new map gives the painted class on most of its pixels);
then reopens the session (features read back from disk). Everything runs in one fresh process
with `--threads` torch threads whose peak RSS (VmHWM) is read at the end. Figures are printed
and logged to MLflow (experiment `benchmarks`).

    .venv/bin/python experiments/bench_studio_tile.py [--rows 7500 --cols 6000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import rasterio
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_studio_window import unet_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
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
radius, painted = 12, []
for row, col in ((40, 40), (40, width - 40), (height - 40, 40), (height - 40, width - 40)):
    disk = classes[row - radius : row + radius, col - radius : col + radius]
    shown = np.bincount(disk.ravel(), minlength=session.schema.num_classes)
    target = int(np.argmin(np.where(np.arange(len(shown)) == 0, 1 << 30, shown)))  # not no-data
    session.edits.add(shapely.Point(col, row).buffer(radius), target, author="bench", tab="b")
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
    learnt.append(float((after[area] == target).mean()))
figures["strokes_in_log"] = len({r.stroke for r in session.edits.active()})
figures["corners_kept"] = sum(kept)
figures["corners_learnt_share_min"] = min(learnt)
del session, classes, after, corrections
started = time.perf_counter()
again = Session.open(image, model, folder, uri)
figures["reopen_seconds"] = time.perf_counter() - started
figures["reopen_version"] = again.current
figures["peak_mib"] = peak()
print(json.dumps(figures))
"""


def write_scene(path: Path, rows: int, cols: int, block: int = 2048) -> None:
    """A synthetic landscape tile repeated over the scene (memory bounded at any size)."""
    from landcover.data.synthetic import generate_labels, render_image

    rng = np.random.default_rng(0)
    tile = render_image(generate_labels(rng, block), rng)
    profile = {
        "driver": "GTiff",
        "width": cols,
        "height": rows,
        "count": 4,
        "dtype": "uint8",
        "crs": "EPSG:26918",
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "transform": rasterio.transform.from_origin(400000, 4300000, 1, 1),
    }
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, rows, block):
            for col in range(0, cols, block):
                h, w = min(block, rows - row), min(block, cols - col)
                dst.write(tile[:, :h, :w], window=Window(col, row, w, h))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=7500)
    parser.add_argument("--cols", type=int, default=6000)
    parser.add_argument("--model", help="any model reference (default: the default U-Net)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "quarter_quad.tif"
        write_scene(image, args.rows, args.cols)
        model = args.model
        if model is None:
            model = str(Path(folder) / "unet.pt")
            unet_checkpoint(Path(model))
        started = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(image),
                model,
                str(Path(folder) / "session"),
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        figures = json.loads(out.stdout.strip().splitlines()[-1])
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
        f"{figures['corners_kept']}/4, learnt (worst corner) "
        f"{100 * figures['corners_learnt_share_min']:.0f} % of its pixels",
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
