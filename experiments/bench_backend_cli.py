"""Benchmark: `landcover-predict` wall time with predict.backend=torch and =onnxruntime on the
same raster, in one run, and how many pixels their maps share.

    .venv/bin/python experiments/bench_backend_cli.py [--size 4096]

U-Net/resnet18 (random weights), 512 px tiles, one generated 4-band raster. The ONNX graph is
compiled into a fresh cache by a first, untimed job on a small raster (a real user pays that
once per model), so the timed jobs compare mapping, start-up included. Figures are printed and
logged to the `benchmarks` MLflow experiment of ./mlflow.db.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).parent))
from bench_map_job import unet_checkpoint, write_rasters  # noqa: E402

BIN = Path(sys.executable).parent


def predict(model: Path, raster: Path, output: Path, backend: str, cache: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            str(BIN / "landcover-predict"),
            f"model={model}",
            f"input={raster}",
            f"output={output}",
            f"predict.backend={backend}",
            "predict.progress=false",
            "log_to_mlflow=false",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "LANDCOVER_CACHE_DIR": str(cache)},
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = unet_checkpoint(folder / "unet.pt")
        (folder / "small").mkdir()
        (folder / "big").mkdir()
        write_rasters(folder / "small", 1, 512)
        write_rasters(folder / "big", 1, args.size)
        small, big = folder / "small" / "r00.tif", folder / "big" / "r00.tif"
        compile_seconds = predict(model, small, folder / "warm.tif", "onnxruntime", folder / "c")
        seconds, maps = {}, {}
        for backend in ("torch", "onnxruntime"):
            output = folder / f"{backend}.tif"
            seconds[backend] = predict(model, big, output, backend, folder / "c")
            with rasterio.open(output) as src:
                maps[backend] = src.read(1)
    agreement = float(np.mean(maps["torch"] == maps["onnxruntime"]))
    ratio = seconds["torch"] / seconds["onnxruntime"]
    print(f"{args.size} x {args.size}, landcover-predict wall time (start-up included):")
    for backend, value in seconds.items():
        print(f"  predict.backend={backend:12s} {value:6.1f} s")
    print(f"onnxruntime is {ratio:.2f}x torch; maps agree on {100 * agreement:.5f} % of pixels")
    print(f"(first job on a 512 x 512 raster, compiling the model: {compile_seconds:.1f} s)")
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_backend_cli"):
        mlflow.log_params({"size": args.size})
        mlflow.log_metrics(
            {
                "seconds_torch": seconds["torch"],
                "seconds_onnxruntime": seconds["onnxruntime"],
                "speedup_onnxruntime": ratio,
                "agreement": agreement,
                "compile_job_seconds": compile_seconds,
            }
        )


if __name__ == "__main__":
    main()
