"""Benchmark: what each backend and precision does to a trained model's maps and scores.

For every `backend[:precision]` spec (default: torch, onnxruntime, openvino, torch:bf16,
openvino:bf16), `landcover-evaluate`'s whole-scene evaluation of MODEL on the real val patches
(`../shared/data/chesapeake-sample`, or `--data-root`): overall accuracy and mIoU, seconds, and
the share of pixels whose class equals the PyTorch fp32 map; then the same evaluation with
test-time augmentation (`--tta flips d4`). With `--synthetic-model`, the same
agreement on a generated 2048 x 2048 scene mapped by that model. Specs whose backend is not
installed, or whose precision this CPU lacks, are skipped with the reason.

    .venv/bin/python experiments/bench_precision.py --model <run id | checkpoint | models:/...>
        [--synthetic-model <ref>] [--specs torch onnxruntime openvino:bf16]

Figures are printed and logged to the `benchmarks` MLflow experiment of --tracking-uri.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.bench_predict import write_scene  # noqa: E402
from landcover.errors import ConfigError  # noqa: E402

SPECS = ["torch", "onnxruntime", "openvino", "torch:bf16", "openvino:bf16"]


def compose_evaluate(*overrides: str):
    from hydra import compose, initialize_config_dir

    import landcover.config  # noqa: F401  (registers the schemas)
    from landcover.paths import COMMANDS_CONFIG_DIR

    with initialize_config_dir(config_dir=str(COMMANDS_CONFIG_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def evaluate(
    model: str, spec: str, output: Path, args, tta: str = "none"
) -> tuple[dict[str, float], float]:
    """Whole-scene metrics and seconds of one spec; its maps stay in `output`."""
    from landcover.evaluate import run_evaluation

    backend, _, precision = spec.partition(":")
    cfg = compose_evaluate(
        f"model={model}",
        "data=chesapeake_sample",
        f"data.root={args.data_root}",
        "split=val",
        f"output_dir={output}",
        f"predict.backend={backend}",
        f"predict.precision={precision or 'auto'}",
        "predict.progress=false",
        f"predict.tta={tta}",
        f"tracking.uri={args.tracking_uri}",
        "tracking.experiment=bench_precision",
    )
    started = time.perf_counter()
    metrics = run_evaluation(cfg)
    return metrics, time.perf_counter() - started


def class_maps(folder: Path) -> np.ndarray:
    """Every `*_landcover.tif` of an evaluation, flattened in name order."""
    pixels = []
    for path in sorted(folder.glob("*_landcover.tif")):
        with rasterio.open(path) as src:
            pixels.append(src.read(1).ravel())
    return np.concatenate(pixels)


def synthetic_agreement(model: str, specs: list[str], tracking_uri: str, tmp: Path) -> dict:
    """Share of pixels of a generated scene mapped like PyTorch fp32, per spec."""
    import mlflow
    import torch

    from landcover import artifacts
    from landcover.config import PredictSettings
    from landcover.predict.backends import with_backend
    from landcover.predict.predictor import predict_raster

    mlflow.set_tracking_uri(tracking_uri)
    scene = tmp / "scene.tif"
    write_scene(scene, 2048)
    settings = PredictSettings.defaults(progress=False)
    maps = {}
    for spec in specs:
        backend, _, precision = spec.partition(":")
        loaded = artifacts.load(model, tracking_uri=tracking_uri, device="cpu")
        model_on = with_backend(loaded, backend, torch.device("cpu"), precision or "auto")
        output = tmp / f"synthetic_{spec.replace(':', '_')}.tif"
        predict_raster(model_on, scene, output, settings)
        with rasterio.open(output) as src:
            maps[spec] = src.read(1)
    return {spec: float((maps[spec] == maps[specs[0]]).mean()) for spec in specs}


def usable(spec: str) -> str | None:
    """None, or why this machine cannot run the spec."""
    import torch

    from landcover.predict import backends

    backend, _, precision = spec.partition(":")
    if not backends.installed(backend):
        return f"{backend} is not installed"
    try:
        if precision:
            backends.check_precision(precision, backend, torch.device("cpu"))
    except ConfigError as err:
        return str(err)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--synthetic-model")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--data-root")
    parser.add_argument(
        "--tta", nargs="*", default=["flips", "d4"], help="also score these TTA modes (auto)"
    )
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    from landcover.data.scenes import quiet_georeferencing_warnings

    quiet_georeferencing_warnings()  # the real sample patches have no CRS, on purpose
    if args.data_root is None:
        shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "chesapeake-sample"
        if not shared.is_dir():
            sys.exit("../shared is absent: give --data-root <chesapeake-sample folder>")
        args.data_root = str(shared)
    specs = []
    for spec in args.specs:
        reason = usable(spec)
        if reason:
            print(f"{spec}: skipped ({reason})")
        else:
            specs.append(spec)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        maps = {}
        for spec in specs:
            metrics, seconds = evaluate(args.model, spec, folder / spec.replace(":", "_"), args)
            maps[spec] = class_maps(folder / spec.replace(":", "_"))
            agreement = float((maps[spec] == maps[specs[0]]).mean())
            oa, miou = metrics["eval/overall_accuracy"], metrics["eval/mIoU"]
            print(
                f"{spec:16s} val OA {oa:.4f}  mIoU {miou:.4f}  {seconds:5.1f} s  "
                f"{100 * agreement:.3f} % of pixels as {specs[0]}"
            )
            key = spec.replace(":", "_")
            results.update(
                {
                    f"oa_{key}": oa,
                    f"miou_{key}": miou,
                    f"seconds_{key}": seconds,
                    f"agreement_{key}": agreement,
                }
            )
        for mode in args.tta:
            metrics, seconds = evaluate(args.model, "auto", folder / f"tta_{mode}", args, mode)
            oa, miou = metrics["eval/overall_accuracy"], metrics["eval/mIoU"]
            print(f"auto, tta={mode:6s} val OA {oa:.4f}  mIoU {miou:.4f}  {seconds:5.1f} s")
            results.update({f"oa_tta_{mode}": oa, f"miou_tta_{mode}": miou})
        if args.synthetic_model:
            for spec, agreement in synthetic_agreement(
                args.synthetic_model, specs, args.tracking_uri, folder
            ).items():
                print(f"{spec:16s} generated 2048 x 2048: {100 * agreement:.3f} % as {specs[0]}")
                results[f"synthetic_agreement_{spec.replace(':', '_')}"] = agreement
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("benchmarks")
    with mlflow.start_run(run_name="bench_precision"):
        mlflow.log_params({"model": args.model, "specs": " ".join(specs)})
        mlflow.log_metrics(results)


if __name__ == "__main__":
    main()
