"""`landcover-predict`: map one or many rasters with any model reference, record each map."""

from __future__ import annotations

import glob
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import rasterio
from omegaconf import DictConfig, ListConfig

from landcover import distributed as dist
from landcover import tracking
from landcover.atomic import write_text
from landcover.config import plain_dict
from landcover.errors import ConfigError
from landcover.figures import quicklook_figure
from landcover.predict.predictor import PredictionResult, PredictSettings, predict_raster
from landcover.predict.reference import LoadedModel, load_model_reference
from landcover.runtime import select_device

log = logging.getLogger("landcover.predict")


def log_prediction(
    *,
    input_path: Path,
    outputs: Mapping[str, Path],
    model_reference: str,
    source_run_id: str | None,
    settings: Mapping[str, Any],
    area_csv: str,
    area_json: str,
    quicklook: plt.Figure,
    seconds: float,
    pixels: int,
) -> None:
    """One prediction, inside an active run: what went in, what came out, how long."""
    mlflow.log_params(
        {
            "input": str(input_path),
            "model": model_reference,
            **{f"predict.{k}": v for k, v in settings.items()},
        }
    )
    mlflow.set_tags(
        {
            "landcover.kind": "prediction",
            **({"landcover.source_run_id": source_run_id} if source_run_id else {}),
            **{f"output.{k}": str(v) for k, v in outputs.items()},
        }
    )
    mlflow.log_metrics(
        {
            "seconds": seconds,
            "megapixels": pixels / 1e6,
            "megapixels_per_s": pixels / 1e6 / max(seconds, 1e-9),
        }
    )
    mlflow.log_text(area_csv, "area/area_table.csv")
    mlflow.log_text(area_json, "area/area_table.json")
    mlflow.log_figure(quicklook, "quicklook.png")
    plt.close(quicklook)


def expand_inputs(spec: str | Sequence[str]) -> list[Path]:
    """A path, a glob, or a list of either; every named file must exist."""
    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches:
            raise ConfigError(f"input={item!r} matches no file")
        paths.extend(Path(m) for m in matches)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"input file(s) {missing} do not exist")
    return paths


def output_paths(inputs: Sequence[Path], output: str) -> list[Path]:
    """One output per input: the file named, or <dir>/<stem>_landcover.tif."""
    target = Path(output)
    if len(inputs) == 1 and not output.endswith("/") and not target.is_dir():
        return [target]
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output={output}: {len(inputs)} inputs need an output directory")
    target.mkdir(parents=True, exist_ok=True)
    names = [p.stem for p in inputs]
    if len(set(names)) != len(names):
        raise ConfigError("inputs share file names; map them to separate output directories")
    return [target / f"{p.stem}_landcover.tif" for p in inputs]


def quicklook(path: Path, model: LoadedModel, size: int):
    """A small coloured picture of a written map, with class names, for the MLflow run."""
    with rasterio.open(path) as src:
        scale = max(src.width, src.height) / size
        shape = (max(1, int(src.height / max(scale, 1))), max(1, int(src.width / max(scale, 1))))
        codes = src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
        colors = src.colormap(1)
    schema = model.schema
    names = {info.codes[0]: info.name for info in schema.classes if info.codes}
    return quicklook_figure(codes.astype(np.uint8), colors, names, f"{path.name}")


def run_predictions(cfg: DictConfig) -> list[PredictionResult]:
    """`landcover-predict`: map every input with one loaded model, recording each map."""
    spec = [str(s) for s in cfg.input] if isinstance(cfg.input, ListConfig) else str(cfg.input)
    inputs = expand_inputs(spec)
    outputs = output_paths(inputs, str(cfg.output))
    device = str(select_device(cfg.device))
    distributed = dist.init(device.split(":")[0])
    if distributed.enabled and device == "cuda":
        device = f"cuda:{distributed.local_rank}"
    model = load_model_reference(str(cfg.model), tracking_uri=cfg.tracking.uri, device=device)
    settings = PredictSettings(**plain_dict(cfg.predict))
    # several processes (torchrun): rank r maps inputs r, r + N, ...; rank 0 records them all
    mine = list(zip(inputs, outputs, strict=True))[distributed.rank :: distributed.world_size]
    results = []
    for input_path, output_path in mine:
        result = predict_raster(model, input_path, output_path, settings)
        table = result.area_table
        log.info(
            "%s -> %s (%.1f Mpx in %.1f s, %.2f Mpx/s)",
            input_path,
            output_path,
            result.pixels / 1e6,
            result.seconds,
            result.pixels / 1e6 / result.seconds,
        )
        for name, path in result.outputs.items():
            if name == "classes":
                write_text(path.with_suffix(".areas.csv"), table.to_csv())
                write_text(path.with_suffix(".areas.json"), table.to_json())
        results.append(result)
    results = dist.gather_to_main(results)
    if distributed.is_main and cfg.log_to_mlflow:
        for result in results:
            input_path, table = result.input, result.area_table
            with tracking.start_run(
                cfg.tracking.uri, cfg.tracking.experiment, run_name=f"predict {input_path.name}"
            ):
                log_prediction(
                    input_path=input_path,
                    outputs=result.outputs,
                    model_reference=model.reference,
                    source_run_id=model.source_run_id,
                    settings=plain_dict(cfg.predict),
                    area_csv=table.to_csv(),
                    area_json=table.to_json(),
                    quicklook=quicklook(result.outputs["classes"], model, cfg.quicklook_size),
                    seconds=result.seconds,
                    pixels=result.pixels,
                )
    return results


if __name__ == "__main__":  # torchrun -m landcover.predict.cli: the console script's app
    from landcover.entrypoints import predict

    predict()
