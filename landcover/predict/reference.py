"""One resolver for every command that takes a model.

A reference may be an MLflow run id, a `runs:/` or `models:/` URI (`models:/name/3`,
`models:/name@champion`), a training checkpoint (`.pt`), or an ONNX file. Whatever it is, the
result carries the class schema, band count and output margin logged with the model at
training time, so prediction needs no settings repeated and can refuse a wrong input early.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landcover.checkpoint import read_checkpoint
from landcover.data.schema import ClassSchema
from landcover.errors import LandcoverError
from landcover.models.files import UnsafeModelError, convert_hint

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ModelReferenceError(LandcoverError):
    """The reference names no model that can be loaded."""


@dataclass
class LoadedModel:
    """A model ready for tiled prediction: raw float32 pixels in, logits out."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    metadata: dict[str, Any]
    reference: str
    kind: str
    source_run_id: str | None = None
    torch_module: torch.nn.Module | None = None
    preferred_batch: int = 1  # tiles per forward call when predict.batch_size is 0 (auto)
    model_id: str | None = None  # the MLflow 3 logged model, which evaluations link metrics to

    @property
    def schema(self) -> ClassSchema:
        """The class schema logged with the model."""
        return ClassSchema.from_config(self.metadata["schema"])

    @property
    def bands(self) -> int:
        """Bands the model expects; other inputs are refused early."""
        return int(self.metadata["bands"])

    @property
    def output_margin(self) -> int:
        """Pixels the model loses on every side (the 2018 network: 64)."""
        return int(self.metadata.get("output_margin", 0))

    @property
    def size_divisor(self) -> int:
        """Tile edges are rounded to a multiple of this (the network's stride)."""
        return int(self.metadata.get("size_divisor", 32))


def _torch_forward(
    module: torch.nn.Module,
    device: torch.device,
    channels_last: bool,
    autocast: torch.dtype | None | str = "default",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eager forward on `device`; `autocast` is the reduced precision to compute in (None:
    float32; "default": bf16 on CUDA, float32 on CPU)."""
    if autocast == "default":
        autocast = torch.bfloat16 if device.type == "cuda" else None
    dtype = autocast if isinstance(autocast, torch.dtype) else None
    module = module.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)

    @torch.inference_mode()
    def forward(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return module(batch).float()

    return forward


def _from_checkpoint(path: Path, device: torch.device, channels_last: bool) -> LoadedModel:
    from omegaconf import OmegaConf

    from landcover.models import build_model

    state = read_checkpoint(path, ModelReferenceError)
    if not isinstance(state, dict) or "metadata" not in state or "config" not in state:
        raise ModelReferenceError(f"{path}: not a landcover training checkpoint")
    cfg = OmegaConf.create(state["config"])
    metadata = state["metadata"]
    model = build_model(
        cfg.model,
        in_channels=metadata["bands"],
        num_classes=len(metadata["schema"]["classes"]),
        mean=metadata["normalize"]["mean"],
        std=metadata["normalize"]["std"],
        config_version=int(metadata.get("config_version", 1)),
    )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, LandcoverError) as err:
        first = str(err).splitlines()[0]
        raise ModelReferenceError(f"{path}: weights do not fit its model config ({first})") from err
    return LoadedModel(
        _torch_forward(model, device, channels_last),
        metadata,
        str(path),
        "checkpoint",
        state.get("run_id"),
        model,
    )


def _from_onnx(path: Path) -> LoadedModel:
    from landcover.interop.onnx import load_onnx

    session, metadata = load_onnx(path)
    input_name = session.get_inputs()[0].name

    def forward(batch: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(None, {input_name: batch.cpu().numpy().astype(np.float32)})
        return torch.from_numpy(logits)

    return LoadedModel(forward, metadata, str(path), "onnx", metadata.get("source_run_id"))


def _from_mlflow(
    uri: str, tracking_uri: str | None, device: torch.device, channels_last: bool
) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    from landcover.serving import load_model

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
        module = load_model(uri)
    except UnsafeModelError as err:
        raise ModelReferenceError(convert_hint(uri)) from err
    except (MlflowException, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelReferenceError(
            f"model reference {uri!r} cannot be loaded from {mlflow.get_tracking_uri()}: "
            f"{first_line}"
        ) from err
    metadata = dict(info.metadata or {})
    if "schema" not in metadata:
        raise ModelReferenceError(
            f"model {uri!r} was not logged by landcover (no class schema in its metadata)"
        )
    return LoadedModel(
        _torch_forward(module, device, channels_last),
        metadata,
        uri,
        "mlflow",
        info.run_id,
        module,
        model_id=getattr(info, "model_id", None),
    )


def load_model_reference(
    reference: str,
    *,
    tracking_uri: str | None = None,
    device: str = "auto",
    channels_last: bool = True,
) -> LoadedModel:
    """Resolve and load; every failure is a ModelReferenceError naming the reference."""
    from landcover.runtime import select_device

    torch_device = select_device(device)
    channels_last = channels_last and torch_device.type == "cuda"
    reference = str(reference)
    path = Path(reference)
    if reference.endswith(".onnx"):
        if not path.is_file():
            raise ModelReferenceError(f"{reference}: ONNX file does not exist")
        return _from_onnx(path)
    if path.is_file():
        return _from_checkpoint(path, torch_device, channels_last)
    if RUN_ID.match(reference):
        reference = f"runs:/{reference}/model"
    if reference.startswith(("runs:/", "models:/")):
        return _from_mlflow(reference, tracking_uri, torch_device, channels_last)
    raise ModelReferenceError(
        f"model reference {reference!r} does not exist: it is not a file, an MLflow run id, "
        "a runs:/ URI or a models:/ URI"
    )


def from_module(
    module: torch.nn.Module,
    metadata: dict[str, Any],
    reference: str = "in-memory",
    device: str = "cpu",
) -> LoadedModel:
    """Wrap a model already in memory (tests, benchmarks, a training process)."""
    return LoadedModel(
        _torch_forward(module, torch.device(device), False),
        metadata,
        reference,
        "module",
        None,
        module,
    )
