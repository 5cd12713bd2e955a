"""Opening a studio session on a window of a large scene: seconds and peak memory.

A person correcting a whole NAIP quarter-quad (about 6000 x 7500 px) works one window at a
time (`landcover-studio --window`). What a window costs to open is the network's pass over it
(its last feature map is computed once and kept) plus the first map: this measures that for
square windows of the given sides, on a generated 4-band scene of `--scene` px a side, with a
U-Net of the project's default configuration (`model=unet`; untrained: the cost does not depend
on the weights). Each window opens in a fresh process with `--threads` torch threads, whose
peak RSS (VmHWM) is read at the end. Figures are printed and logged to MLflow (experiment
`benchmarks`).

    .venv/bin/python experiments/bench_studio_window.py --sides 1000 2000 4000 --threads 2
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

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from landcover.data.scenes import quiet_georeferencing_warnings
from landcover.studio.session import Session
from landcover.studio.window import cut_window
quiet_georeferencing_warnings()
scene, model, folder, side = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[5])
started = time.perf_counter()
image = cut_window(scene, (0, 0, side, side), folder)
cut = time.perf_counter() - started
Session.open(image, model, folder, f"sqlite:///{folder}/mlflow.db")
opened = time.perf_counter() - started
peak = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(json.dumps({"cut_seconds": cut, "open_seconds": opened, "peak_mib": int(peak) / 1024}))
"""


def scene(path: Path, side: int) -> None:
    """A 4-band uint8 scene with field-like structure (smoothed noise), georeferenced in UTM."""
    rng = np.random.default_rng(0)
    small = gaussian_filter(rng.normal(size=(4, side // 8, side // 8)), sigma=(0, 3, 3))
    bands = np.kron(small, np.ones((8, 8)))[:, :side, :side]
    bands = ((bands - bands.min()) / (np.ptp(bands) + 1e-9) * 255).astype(np.uint8)
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 4,
        "dtype": "uint8",
        "crs": "EPSG:26917",
        "transform": from_origin(500000, 4300000, 1.0, 1.0),
        "tiled": True,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as out:
        out.write(bands)


def unet_checkpoint(path: Path) -> None:
    """The default U-Net as a checkpoint file, without training."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from landcover.models import build_model
    from tests.conftest import compose_train

    cfg = compose_train("data.root=unused")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    schema = OmegaConf.to_container(cfg.data.schema, resolve=True)
    normalize = OmegaConf.to_container(cfg.data.normalize, resolve=True)
    model = build_model(model_cfg, in_channels=4, num_classes=len(schema["classes"]), **normalize)
    metadata = {
        "model": model_cfg,
        "arch": model_cfg["arch"],
        "schema": schema,
        "bands": 4,
        "normalize": normalize,
        "output_margin": 0,
        "size_divisor": 32,
    }
    torch.save(
        {"model": model.state_dict(), "metadata": metadata, "config": OmegaConf.to_yaml(cfg)}, path
    )


def child_figures(code: str, arguments: list[str], what: str) -> dict:
    """Run `code` in a fresh Python process (its own peak RSS) from the repository root and
    read the figures it prints as JSON on its last line; its error ends the benchmark."""
    out = subprocess.run(
        [sys.executable, "-c", code, *arguments], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(f"{what}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scene", type=int, default=6000)
    parser.add_argument("--sides", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path, model = Path(folder) / "scene.tif", Path(folder) / "unet.pt"
        scene(path, args.scene)
        unet_checkpoint(model)
        for side in args.sides:
            started = time.perf_counter()
            session = str(Path(folder) / f"session_{side}")
            arguments = [str(path), str(model), session, str(args.threads), str(side)]
            figures = child_figures(CHILD, arguments, f"window {side}")
            figures["wall_seconds"] = time.perf_counter() - started
            figures["megapixels"] = side * side / 1e6
            rows.append((side, figures))
            print(
                f"window {side} x {side} ({figures['megapixels']:g} Mpx): cut "
                f"{figures['cut_seconds']:.1f} s, open {figures['open_seconds']:.1f} s, peak RSS "
                f"{figures['peak_mib']:.0f} MiB ({args.threads} threads)",
                flush=True,
            )
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_studio_window"):
        mlflow.log_params({"scene": args.scene, "threads": args.threads, "model": "unet"})
        for side, figures in rows:
            mlflow.log_metrics({f"{key}_{side}": float(v) for key, v in figures.items()})


if __name__ == "__main__":
    main()
