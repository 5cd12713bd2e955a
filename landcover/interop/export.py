"""`landcover-export`: write a model as ONNX, verify it, and log it to the model's MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from landcover import artifacts
from landcover.errors import LandcoverError
from landcover.interop.onnx import ForwardCheck, export_onnx, onnx_check
from landcover.predict.writer import check_writable
from landcover.tracking import runs as tracking

log = logging.getLogger("landcover.export")


def log_export(
    uri: str, run_id: str | None, experiment: str, path: Path, check: ForwardCheck, reference: str
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
            mlflow.log_metrics(check_metrics(check))
        return
    client = mlflow.tracking.MlflowClient(uri)
    client.log_artifact(run_id, str(path), "onnx")
    for key, value in check_metrics(check).items():
        client.log_metric(run_id, key, value)


def check_metrics(check: ForwardCheck) -> dict[str, float]:
    """The export's check as metrics of the run."""
    return {
        "onnx/max_abs_diff": check.max_abs,
        "onnx/relative_diff": check.relative,
        "onnx/class_agreement": check.agreement,
    }


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
    check = onnx_check(model.torch_module, output)
    refusal = check.refusal(float(cfg.tolerance), float(cfg.min_agreement))
    if refusal:
        output.unlink()
        raise LandcoverError(
            f"ONNX export of {cfg.model} is refused: {refusal}; nothing was written"
        )
    log.info("wrote %s (%s)", output, check)
    if cfg.log_to_mlflow:
        log_export(
            cfg.tracking.uri,
            model.source_run_id,
            cfg.tracking.experiment,
            output,
            check,
            model.reference,
        )
    return output, check.max_abs
