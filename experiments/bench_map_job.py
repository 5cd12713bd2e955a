"""Benchmark: a mapping job over 16 rasters on engine=local and engine=ray (1 and 2 workers),
in one run, on the same machine: tiles/s and Ray's overhead over local at the same worker count.

    .venv/bin/python experiments/bench_map_job.py [--rasters 16] [--size 512] [--repeats 1]

Each worker uses one torch thread (engine.threads=1), so "1 worker" is the same compute on
both engines and the ratio is Ray's own cost (actor start, model load, scheduling). Figures
are printed and logged to the `benchmarks` MLflow experiment of ./mlflow.db.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import rasterio
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TILE, OVERLAP = 512, 64


def unet_checkpoint(path: Path) -> Path:
    """A U-Net/resnet18 checkpoint (random weights: throughput does not depend on them)."""
    import torch
    import yaml

    from landcover.models import build_model

    model_cfg = {
        "arch": "unet",
        "encoder_name": "resnet18",
        "encoder_depth": 5,
        "encoder_weights": None,
        "decoder_channels": [256, 128, 64, 32, 16],
    }
    names = ["water", "tree_canopy", "low_vegetation", "barren_impervious"]
    schema = {
        "name": "chesapeake_4class",
        "classes": [
            {"name": n, "codes": [i + 1], "color": "#808080", "ignore": False}
            for i, n in enumerate(names)
        ],
        "ignore_codes": [],
    }
    normalize = {"mean": [100.0] * 4, "std": [50.0] * 4}
    model = build_model(model_cfg, in_channels=4, num_classes=4, **normalize)
    metadata = {
        "landcover_format": 2,
        "config_version": 2,
        "arch": "unet",
        "model": model_cfg,
        "schema": schema,
        "bands": 4,
        "band_names": ["red", "green", "blue", "nir"],
        "normalize": normalize,
        "output_margin": 0,
        "size_divisor": 32,
    }
    config = yaml.safe_dump({"model": model_cfg})
    torch.save({"model": model.state_dict(), "metadata": metadata, "config": config}, path)
    return path


def write_rasters(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        row, col = divmod(index, 4)
        profile = {
            "driver": "GTiff",
            "count": 4,
            "width": size,
            "height": size,
            "dtype": "uint8",
            "crs": "EPSG:26918",
            "transform": from_origin(400000 + col * size, 4300000 - row * size, 1, 1),
            "tiled": True,
        }
        with rasterio.open(folder / f"r{index:02d}.tif", "w", **profile) as dst:
            dst.write(rng.integers(0, 255, (4, size, size), dtype=np.uint8))


def run_job(model: Path, inputs: Path, output: Path, *engine: str) -> float:
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [
            str(BIN / "landcover-predict"),
            f"model={model}",
            f"input={inputs}/*.tif",
            f"output={output}/",
            f"predict.tile_size={TILE}",
            f"predict.overlap={OVERLAP}",
            "predict.progress=false",
            "engine.threads=1",
            "log_to_mlflow=false",
            *engine,
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rasters", type=int, default=16)
    parser.add_argument("--size", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    core = TILE - OVERLAP
    tiles = args.rasters * math.ceil(args.size / core) ** 2
    with tempfile.TemporaryDirectory() as tmp:
        model = unet_checkpoint(Path(tmp) / "unet.pt")
        inputs, tiny = Path(tmp) / "in", Path(tmp) / "tiny"
        inputs.mkdir()
        tiny.mkdir()
        write_rasters(inputs, args.rasters, args.size)
        write_rasters(tiny, 1, 64)
        cases = {
            "local": [],
            "ray, 1 worker": ["engine.name=ray", "engine.workers=1"],
            "ray, 2 workers": ["engine.name=ray", "engine.workers=2"],
        }
        seconds = {
            name: min(
                run_job(model, inputs, Path(tmp) / "out", *extra) for _ in range(args.repeats)
            )
            for name, extra in cases.items()
        }
        # fixed costs: the same command on one 64 x 64 raster (start-up, model load, Ray start)
        startup = {name: run_job(model, tiny, Path(tmp) / "out", *x) for name, x in cases.items()}
    print(f"{args.rasters} rasters of {args.size} x {args.size} ({tiles} tiles of {TILE}), wall")
    for name, value in seconds.items():
        steady = tiles / max(value - startup[name], 1e-9)
        print(
            f"  {name:15s} {value:6.1f} s  {tiles / value:6.2f} tiles/s "
            f"(start-up {startup[name]:4.1f} s; after it {steady:6.2f} tiles/s)"
        )
    overhead = seconds["ray, 1 worker"] / seconds["local"] - 1
    speedup = seconds["local"] / seconds["ray, 2 workers"]
    print(
        f"Ray's overhead at 1 worker: {100 * overhead:+.1f} %; "
        f"2 Ray workers vs local: {speedup:.2f}x"
    )
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_map_job"):
        mlflow.log_params(vars(args))
        mlflow.log_metrics(
            {
                **{
                    f"tiles_per_s/{k.replace(', ', '_').replace(' ', '_')}": tiles / v
                    for k, v in seconds.items()
                },
                **{
                    f"startup_s/{k.replace(', ', '_').replace(' ', '_')}": v
                    for k, v in startup.items()
                },
                "ray_overhead_1_worker": overhead,
                "ray_2_workers_speedup": speedup,
            }
        )


if __name__ == "__main__":
    main()
