"""Benchmark: patches/s of the training data pipeline next to the training step rate.

The pipeline is the real one: windowed GeoTIFF reads of image and labels (no in-memory scene
cache), random sampling, flips/rotations, collation into batches of 16 patches of 256 x 256,
and the model's per-band normalisation of each batch. It runs on a generated 4096 x 4096 scene
with 0 and 2 DataLoader workers; the training step rate is unet/resnet18 at 256 x 256.
Figures are printed and logged to MLflow (experiment `benchmarks`).

    .venv/bin/python experiments/bench_loader.py [--size 4096] [--batches 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch.utils.data import DataLoader

from landcover.data.reader import SceneReader
from landcover.data.sampling import RandomPatchDataset
from landcover.data.scenes import validate_scene
from landcover.data.schema import ClassSchema
from landcover.data.synthetic import write_scene
from landcover.models import build_model
from landcover.tracking.runs import environment_tags

SCHEMA = ClassSchema.from_config(
    {
        "name": "chesapeake_4class",
        "classes": [
            {"name": n, "color": "#000000", "codes": c}
            for n, c in (
                ("water", [1]),
                ("trees", [2]),
                ("low_vegetation", [3]),
                ("barren_impervious", [4, 5, 6]),
            )
        ],
        "ignore_codes": [15],
    }
)
MEAN, STD = [100.0, 110.0, 85.0, 140.0], [40.0, 35.0, 30.0, 50.0]


def loader_rate(
    scene,
    workers: int,
    batches: int,
    *,
    normalise_on_cpu: bool,
    batch_size: int = 16,
    patch: int = 256,
    warmup: int = 5,
) -> float:
    """Patches/s delivered; with `normalise_on_cpu` the main process also normalises each batch
    (on a GPU the model does that on the device, where it costs next to nothing)."""
    reader = SceneReader([scene], SCHEMA.lookup_table(), cache_max_pixels=0)
    dataset = RandomPatchDataset(
        reader, patch_size=patch, length=(batches + warmup) * batch_size, seed=0
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    normalise = build_model(
        {"arch": "seed"}, in_channels=4, num_classes=4, mean=MEAN, std=STD
    ).normalize
    patches = 0
    for step, (image, target) in enumerate(loader):
        if step == warmup:
            started = time.perf_counter()
        if step >= warmup:
            if normalise_on_cpu:
                normalise(image)
                target.long()
            patches += image.shape[0]
    return patches / (time.perf_counter() - started)


def train_step_rate(steps: int = 4, batch_size: int = 8) -> float:
    model = build_model(
        {
            "arch": "unet",
            "encoder_name": "resnet18",
            "encoder_depth": 5,
            "encoder_weights": None,
            "decoder_channels": [256, 128, 64, 32, 16],
        },
        in_channels=4,
        num_classes=4,
        mean=MEAN,
        std=STD,
    )
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    image = torch.randint(0, 255, (batch_size, 4, 256, 256), dtype=torch.uint8)
    target = torch.randint(0, 4, (batch_size, 256, 256))
    rates = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.append(batch_size / (time.perf_counter() - started))
    return float(np.median(rates[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        image_path, label_path = write_scene(
            Path(tmp), "bench", args.size, np.random.default_rng(0), origin=(400000, 4300000)
        )
        print(
            f"generated a {args.size} x {args.size} scene in "
            f"{time.perf_counter() - started:.1f} s ({image_path.stat().st_size / 2**20:.0f} MiB)"
        )
        scene = validate_scene(str(image_path), str(label_path), bands=4, schema=SCHEMA)
        results = {}
        threads = torch.get_num_threads()
        for workers in (0, 2):
            # with workers, the cores are theirs: the main process keeps one thread
            torch.set_num_threads(threads if workers == 0 else 1)
            for on_cpu in (False, True):
                rate = loader_rate(scene, workers, args.batches, normalise_on_cpu=on_cpu)
                where = "normalised on CPU" if on_cpu else "uint8 to the device"
                suffix = "_cpu_normalise" if on_cpu else ""
                results[f"loader_patches_per_s_workers{workers}{suffix}"] = rate
                print(
                    f"data pipeline, {workers} worker(s), {where:19s}: {rate:6.0f} patches/s"
                    " (256 x 256, batches of 16)"
                )
        torch.set_num_threads(threads)
    rate = train_step_rate()
    results["train_patches_per_s_unet_resnet18"] = rate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"training step, unet/resnet18 on {device}: {rate:8.1f} patches/s")
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_loader", tags=environment_tags(torch.device(device))):
        mlflow.log_params(
            {
                "scene_size": args.size,
                "batches": args.batches,
                "batch_size": 16,
                "patch_size": 256,
                "cpu_threads": torch.get_num_threads(),
            }
        )
        mlflow.log_metrics(results)


if __name__ == "__main__":
    main()
