"""Benchmark: training throughput (patches/s) of the seed network and U-Net/resnet18 at
256 x 256, on CPU or GPU, with the trainer's own settings (bf16 autocast and channels_last on
CUDA, optional torch.compile). Batches are generated in memory so the figure is the model's
step, not the loader's (experiments/bench_loader.py measures that). Prints a table and logs
it to MLflow (experiment `benchmarks`), with GPU utilisation and peak memory on CUDA.

    .venv/bin/python experiments/bench_train.py [--steps 10] [--batch-size 8] [--compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import mlflow
import torch
import torch.nn.functional as F

from landcover.models import build_model, count_parameters

MODELS = {
    "seed": {"arch": "seed"},
    "unet/resnet18": {
        "arch": "unet",
        "encoder_name": "resnet18",
        "encoder_depth": 5,
        "encoder_weights": None,
        "decoder_channels": [256, 128, 64, 32, 16],
    },
}


def gpu_utilisation() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except Exception:  # needs pynvml / NVML; absent on CPU machines
        return None


def bench(name: str, cfg: dict, args, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg, in_channels=4, num_classes=5, mean=[100.0] * 4, std=[50.0] * 4)
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(args.batch_size, 4, 256, 256, device=device) * 255
    images = images.contiguous(memory_format=memory_format)
    margin = model.output_margin
    size = 256 - 2 * margin
    targets = torch.randint(0, 5, (args.batch_size, size, size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(step_model(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    utilisation = []
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
        if cuda:
            value = gpu_utilisation()
            if value is not None:
                utilisation.append(value)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "patches_per_s": args.steps * args.batch_size / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "parameters": float(count_parameters(model)),
    }
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if utilisation:
            result["gpu_utilisation_pct"] = sum(utilisation) / len(utilisation)
    print(
        f"| {name} | {result['patches_per_s']:.1f} | {result['step_ms']:.0f} | "
        f"{result.get('gpu_utilisation_pct', float('nan')):.0f} | "
        f"{result.get('peak_memory_gib', float('nan')):.2f} |",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 CPU, 32 GPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"device {device} ({where}), batch {args.batch_size}, 256 x 256, compile={args.compile}")
    print(
        "| model | patches/s | ms/step | GPU util % | peak GiB |\n| --- | --- | --- | --- | --- |"
    )
    results = {name: bench(name, cfg, args, device) for name, cfg in MODELS.items()}
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name=f"bench_train {device.type}"):
        mlflow.log_params(
            {
                "device": str(device),
                "device_name": where,
                "batch_size": args.batch_size,
                "compile": args.compile,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
        for name, values in results.items():
            mlflow.log_metrics({f"{name.replace('/', '_')}/{k}": v for k, v in values.items()})


if __name__ == "__main__":
    main()
