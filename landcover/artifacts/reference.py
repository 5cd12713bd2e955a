"""One resolver for every command that takes a model.

A reference may be an MLflow run id, a `runs:/` or `models:/` URI (`models:/name/3`,
`models:/name@champion`), a logged model's folder on disk (downloaded or copied: its MLmodel
inside), a training checkpoint (`.pt`), an ONNX file, or a 2018 tutorial CNTK file (`.model`).
Whatever it is, the result carries the class schema, band count and output margin logged with
the model at training time, so prediction needs no settings repeated and can refuse a wrong
input early.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landcover.data.schema import ClassSchema
from landcover.errors import LandcoverError

if TYPE_CHECKING:  # torch is imported only where a model runs on it (predict/loading.py)
    import torch

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ModelReferenceError(LandcoverError):
    """The reference names no model that can be loaded."""


@dataclass
class LoadedModel:
    """A model ready for tiled prediction: raw float32 pixels (N, bands, H, W) in, class
    logits (N, classes, H, W) out, both numpy arrays whatever runs the network, so the tiled
    predictor needs no deep-learning framework of its own."""

    forward: Callable[[np.ndarray], np.ndarray]
    metadata: dict[str, Any]
    reference: str
    kind: str
    source_run_id: str | None = None
    torch_module: torch.nn.Module | None = None
    preferred_batch: int = 1  # tiles per forward call when predict.batch_size is 0 (auto)
    model_id: str | None = None  # the MLflow 3 logged model, which evaluations link metrics to
    # digest of the files the model was loaded from: finds its compiled graph without torch
    source_digest: str | None = None

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


def torch_forward(
    module: torch.nn.Module,
    device: torch.device,
    channels_last: bool,
    autocast: torch.dtype | None | str = "default",
) -> Callable[[np.ndarray], np.ndarray]:
    """Eager forward on `device`; `autocast` is the reduced precision to compute in (None:
    float32; "default": bf16 on CUDA, float32 on CPU)."""
    import torch

    if autocast == "default":
        autocast = torch.bfloat16 if device.type == "cuda" else None
    dtype = autocast if isinstance(autocast, torch.dtype) else None
    module = module.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=memory_format)

    @torch.inference_mode()
    def forward(pixels: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return module(batch).float().cpu().numpy()

    return forward


def files_digest(*paths: Path) -> str:
    """blake2b over the files' bytes (a folder: every file in it, by relative path): the same
    model file gives the same digest wherever it was copied or downloaded to."""
    digest = hashlib.blake2b(digest_size=16)
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(str(file.relative_to(root) if root.is_dir() else "").encode())
            with open(file, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _from_checkpoint(
    path: Path, device: torch.device, channels_last: bool, digest: str | None = None
) -> LoadedModel:
    from omegaconf import OmegaConf

    from landcover.artifacts.checkpoint import read_checkpoint
    from landcover.artifacts.files import rebuild

    state = read_checkpoint(path, ModelReferenceError)
    if not isinstance(state, dict) or "metadata" not in state or "config" not in state:
        raise ModelReferenceError(f"{path}: not a landcover training checkpoint")
    cfg = OmegaConf.create(state["config"])
    metadata = state["metadata"]
    model_config = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
    model = rebuild({**metadata, "model": model_config or metadata.get("model")}, str(path))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, LandcoverError) as err:
        first = str(err).splitlines()[0]
        raise ModelReferenceError(f"{path}: weights do not fit its model config ({first})") from err
    return LoadedModel(
        torch_forward(model, device, channels_last),
        metadata,
        str(path),
        "checkpoint",
        state.get("run_id"),
        model,
        source_digest=digest or files_digest(path),
    )


def _from_onnx(path: Path) -> LoadedModel:
    from landcover.artifacts.onnx_file import load_onnx

    session, metadata = load_onnx(path)
    input_name = session.get_inputs()[0].name

    def forward(pixels: np.ndarray) -> np.ndarray:
        (logits,) = session.run(None, {input_name: pixels.astype(np.float32, copy=False)})
        return logits

    return LoadedModel(forward, metadata, str(path), "onnx", metadata.get("source_run_id"))


def _from_cntk(
    path: Path, device: torch.device, channels_last: bool, digest: str | None = None
) -> LoadedModel:
    """A 2018 tutorial CNTK file, decoded by landcover's bounded reader (no CNTK, no code run)."""
    from landcover.artifacts.tutorial_model import load_cntk_file

    module, metadata = load_cntk_file(path)
    return LoadedModel(
        torch_forward(module, device, channels_last),
        metadata,
        str(path),
        "cntk",
        None,
        module,
        source_digest=digest or files_digest(path),
    )


@dataclass(frozen=True)
class ModelFiles:
    """The files a reference names, fetched once: a command that looks up the cached graph of a
    model and then (on a miss) loads it reads them a single time."""

    path: Path
    digest: str
    info: Any = None  # the MLflow model info of a logged model


def _download(uri: str, tracking_uri: str | None, folder: str | Path) -> ModelFiles:
    """The logged model's files in `folder`, with their digest and MLflow model info."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from landcover.reachable import check_tracking_server

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    check_tracking_server(mlflow.get_tracking_uri())  # seconds, not MLflow's minutes of retries
    try:
        info = mlflow.models.get_model_info(uri)
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(folder)))
    except (MlflowException, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelReferenceError(
            f"model reference {uri!r} cannot be loaded from {mlflow.get_tracking_uri()}: "
            f"{first_line}"
        ) from err
    from landcover.artifacts.mlmodel_guard import check_mlmodel

    check_mlmodel(path)
    return ModelFiles(path, files_digest(path), info)


def fetch_model_files(
    reference: str, tracking_uri: str | None, folder: str | Path
) -> ModelFiles | None:
    """The model files `reference` names with their digest (a logged model is downloaded into
    `folder`, a file is read where it is); None for an ONNX file or a reference naming no file
    (loading it then says what is wrong)."""
    path = Path(reference)
    if reference.endswith(".onnx"):
        return None
    if path.is_file():
        return ModelFiles(path, files_digest(path))
    if is_model_folder(path):
        return _local_model_folder(path)
    uri = model_uri(reference)
    return _download(uri, tracking_uri, folder) if uri else None


def is_model_folder(path: Path) -> bool:
    """A logged model downloaded or copied to a folder (its MLmodel file inside)."""
    return path.is_dir() and (path / "MLmodel").is_file()


def _local_model_folder(path: Path) -> ModelFiles:
    """A model folder on disk read as MLflow would read it, guarded the same way."""
    from mlflow.models import Model

    from landcover.artifacts.mlmodel_guard import check_mlmodel

    check_mlmodel(path)  # before MLflow parses anything it could run
    return ModelFiles(path, files_digest(path), Model.load(str(path / "MLmodel")))


def _from_mlflow(
    uri: str,
    tracking_uri: str | None,
    device: torch.device,
    channels_last: bool,
    fetched: ModelFiles | None = None,
) -> LoadedModel:
    import tempfile

    from landcover.artifacts.files import UnsafeModelError, convert_hint
    from landcover.artifacts.flavour import load_module

    with tempfile.TemporaryDirectory() as tmp:
        files = fetched or _download(uri, tracking_uri, tmp)
        try:
            module = load_module(files.path)
        except UnsafeModelError as err:
            raise ModelReferenceError(convert_hint(uri)) from err
        except OSError as err:
            raise ModelReferenceError(f"model reference {uri!r} cannot be loaded: {err}") from err
    info = files.info
    metadata = dict(info.metadata or {})
    if "schema" not in metadata:
        raise ModelReferenceError(
            f"model {uri!r} was not logged by landcover (no class schema in its metadata)"
        )
    return LoadedModel(
        torch_forward(module, device, channels_last),
        metadata,
        uri,
        "mlflow",
        info.run_id,
        module,
        model_id=getattr(info, "model_id", None),
        source_digest=files.digest,
    )


def model_uri(reference: str) -> str | None:
    """The MLflow URI a reference names (a bare run id is its run's model), None for a file."""
    if RUN_ID.match(reference) and not Path(reference).is_file():
        return f"runs:/{reference}/model"
    return reference if reference.startswith(("runs:/", "models:/")) else None


def load(
    reference: str,
    *,
    tracking_uri: str | None = None,
    device: str = "auto",
    channels_last: bool = True,
    fetched: ModelFiles | None = None,
) -> LoadedModel:
    """Resolve and load; every failure is a ModelReferenceError naming the reference.

    `fetched`: what `fetch_model_files` already read for this reference (not read again)."""
    reference = str(reference)
    path = Path(reference)
    if reference.endswith(".onnx"):  # run by ONNX Runtime: no torch needed
        if not path.is_file():
            raise ModelReferenceError(f"{reference}: ONNX file does not exist")
        return _from_onnx(path)
    from landcover.runtime import select_device

    torch_device = select_device(device)
    channels_last = channels_last and torch_device.type == "cuda"
    digest = fetched.digest if fetched else None
    if path.is_file() and path.suffix == ".model":
        return _from_cntk(path, torch_device, channels_last, digest)
    if path.is_file():
        return _from_checkpoint(path, torch_device, channels_last, digest)
    if is_model_folder(path):
        files = fetched or _local_model_folder(path)
        return _from_mlflow(str(path), None, torch_device, channels_last, files)
    uri = model_uri(reference)
    if uri is not None:
        return _from_mlflow(uri, tracking_uri, torch_device, channels_last, fetched)
    raise ModelReferenceError(
        f"model reference {reference!r} does not exist: it is not a file, a model folder, an "
        "MLflow run id, a runs:/ URI or a models:/ URI"
    )


def from_module(
    module: torch.nn.Module,
    metadata: dict[str, Any],
    reference: str = "in-memory",
    device: str = "cpu",
) -> LoadedModel:
    """Wrap a model already in memory (tests, benchmarks, a training process)."""
    import torch

    return LoadedModel(
        torch_forward(module, torch.device(device), False),
        metadata,
        reference,
        "module",
        None,
        module,
    )
