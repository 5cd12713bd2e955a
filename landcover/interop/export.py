"""`landcover-export`: write a model as ONNX, verify it, and log it to the model's MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from landcover import artifacts
from landcover.errors import LandcoverError
from landcover.interop.onnx import export_onnx, max_abs_difference
from landcover.predict.writer import check_writable
from landcover.tracking import runs as tracking

log = logging.getLogger("landcover.export")


def log_export(
    uri: str, run_id: str | None, experiment: str, path: Path, max_abs_diff: float, reference: str
) -> None:
    """Attach an exported ONNX file to the model's training run (or a run of its own)."""
    mlflow.set_tracking_uri(uri)
    if run_id is None:
        with tracking.start_run(
            uri,
            experiment,
            run_name=f"export {path.name}",
            tags={"landcover.kind": "export", "landcover.model": reference},
        ):
            mlflow.log_artifact(str(path), "onnx")
            mlflow.log_metric("onnx/max_abs_diff", max_abs_diff)
        return
    client = mlflow.tracking.MlflowClient(uri)
    client.log_artifact(run_id, str(path), "onnx")
    client.log_metric(run_id, "onnx/max_abs_diff", max_abs_diff)


def run_export(cfg: DictConfig) -> tuple[Path, float]:
    """`landcover-export`: the model as ONNX, checked against PyTorch before it is kept."""
    output = Path(cfg.output)
    check_writable(output)
    model = artifacts.load(str(cfg.model), tracking_uri=cfg.tracking.uri, device="cpu")
    if model.torch_module is None:
        raise LandcoverError(f"{cfg.model}: only PyTorch models can be exported")
    if getattr(model.torch_module, "fitted_once", False):
        raise LandcoverError(
            f"{cfg.model}: pixel_gbm is a scikit-learn model inside a PyTorch shell; ONNX "
            "export covers the networks only"
        )
    metadata = {
        **model.metadata,
        "source_run_id": model.source_run_id,
        "source_reference": model.reference,
    }
    export_onnx(model.torch_module, metadata, output, opset=int(cfg.opset))
    difference = max_abs_difference(model.torch_module, output)
    if difference > float(cfg.tolerance):
        output.unlink()
        raise LandcoverError(
            f"ONNX export of {cfg.model} differs from PyTorch by {difference:.2e}"
            f" (tolerance {cfg.tolerance}); nothing was written"
        )
    log.info("wrote %s (max |onnx - torch| = %.2e)", output, difference)
    if cfg.log_to_mlflow:
        log_export(
            cfg.tracking.uri,
            model.source_run_id,
            cfg.tracking.experiment,
            output,
            difference,
            model.reference,
        )
    return output, difference
