"""Vectorising a class map: time, polygons and peak memory (`predict.vectorize=true`).

A generated 4096 x 4096 class map (smoothed random fields thresholded into 4 classes, so
regions look like land cover rather than noise) is written as the predictor writes maps, then
vectorised in a fresh process whose peak RSS (VmHWM) is read at the end. Figures are printed
and logged to MLflow (experiment `benchmarks`).

    .venv/bin/python experiments/bench_vectorize.py --size 4096
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
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter

CHILD = """
import json, sys, time
from pathlib import Path
from landcover.predict.vectorize import vectorize_map
started = time.perf_counter()
path = vectorize_map(Path(sys.argv[1]))
seconds = time.perf_counter() - started
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "bytes": path.stat().st_size}))
"""


def class_map(path: Path, size: int) -> None:
    rng = np.random.default_rng(0)
    field = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 12)
    classes = np.digitize(field, np.quantile(field, [0.1, 0.5, 0.9])).astype(np.uint8) + 1
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:26918",
        "transform": from_origin(400000, 4300000, 1, 1),
        "nodata": 255,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        dst.update_tags(
            class_names=json.dumps(["water", "tree_canopy", "low_vegetation", "barren"]),
            class_codes=json.dumps([1, 2, 3, 4]),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "map.tif"
        class_map(path, args.size)
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        figures["wall_seconds"] = time.perf_counter() - started
        import pyogrio

        figures["polygons"] = pyogrio.read_info(Path(folder) / "map.gpkg")["features"]
    print(
        f"{args.size} x {args.size}: {figures['polygons']} polygons in {figures['seconds']:.1f} s, "
        f"peak RSS {figures['peak_mib']:.0f} MiB, GeoPackage {figures['bytes'] / 1e6:.1f} MB"
    )
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_vectorize"):
        mlflow.log_param("size", args.size)
        mlflow.log_metrics({k: float(v) for k, v in figures.items()})


if __name__ == "__main__":
    main()
