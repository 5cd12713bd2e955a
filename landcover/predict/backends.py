"""The engine a loaded model runs on: eager PyTorch, or the same network compiled to ONNX and
run by ONNX Runtime (about twice as fast on CPU, measured in issue 15).

A PyTorch model is exported once per identity (its weights, its metadata, the export
settings, the torch version) into a cache folder, checked against PyTorch before it is kept
(the file appears only after the check passes), and reused by every later job. A failed export
or check falls back to PyTorch with one warning line: the map is made either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from landcover.errors import ConfigError
from landcover.predict.reference import LoadedModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPSET = 17
TOLERANCE = 1e-3  # max |ONNX - PyTorch| logit difference accepted, as landcover-export


def cache_dir() -> Path:
    """`LANDCOVER_CACHE_DIR`, or ~/.cache/landcover: compiled models outlive a job."""
    root = os.environ.get("LANDCOVER_CACHE_DIR") or Path.home() / ".cache" / "landcover"
    return Path(root) / "compiled"


def model_key(model: LoadedModel) -> str:
    """What makes two compiled graphs the same: the weights, the metadata that shapes the
    graph, the export settings and the torch version that traced it."""
    assert model.torch_module is not None
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.torch_module.state_dict().items()):
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    shaping = {k: model.metadata.get(k) for k in ("model", "bands", "normalize", "output_margin")}
    digest.update(json.dumps([shaping, OPSET, torch.__version__], sort_keys=True).encode())
    return digest.hexdigest()


def resolve(name: str, model: LoadedModel, device: torch.device) -> str:
    """The backend `name` means for this model: `auto` is ONNX Runtime for a PyTorch network
    on CPU, PyTorch otherwise (on CUDA it already runs bf16 autocast and channels-last)."""
    if name not in BACKENDS:
        raise ConfigError(f"config value predict.backend={name!r} is not one of {list(BACKENDS)}")
    if model.torch_module is None or getattr(model.torch_module, "fitted_once", False):
        return "onnxruntime" if model.kind == "onnx" else "torch"
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" else "torch"
    return name


def with_backend(
    model: LoadedModel, name: str, device: torch.device, precision: str = "auto"
) -> LoadedModel:
    """`model` running on the chosen backend and precision (itself when that is what it
    already runs on). `auto` precision: bf16 autocast for PyTorch on CUDA, float32 elsewhere;
    anything lower than float32 on CPU only when asked for by name."""
    chosen = resolve(name, model, device)
    if precision != "auto":
        check_precision(precision, chosen, device)
    if chosen == "torch" or model.kind == "onnx":
        if precision == "auto" or model.torch_module is None:
            return model
        from landcover.predict.reference import _torch_forward

        forward = _torch_forward(
            model.torch_module, device, device.type == "cuda", PRECISIONS[precision]
        )
        return LoadedModel(
            forward,
            model.metadata,
            model.reference,
            model.kind,
            model.source_run_id,
            model.torch_module,
        )
    try:
        path = compiled_onnx(model)
    except Exception as err:  # export and check failures come in many types
        first = (str(err).splitlines() or [type(err).__name__])[0]
        log.warning("ONNX export of %s failed (%s): mapping with PyTorch", model.reference, first)
        return model
    return onnx_model(model, path)


def check_precision(precision: str, backend: str, device: torch.device) -> None:
    """A precision the backend and device support, or a ConfigError saying which do."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"config value predict.precision={precision!r} is not one of "
            f"{['auto', *PRECISIONS]} (int8 is not supported yet)"
        )
    if backend == "onnxruntime" and precision != "fp32":
        raise ConfigError(
            f"config value predict.precision={precision} is not supported by the onnxruntime "
            "backend (fp32 only): use predict.backend=torch for reduced precision"
        )
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config value predict.precision=fp16 needs CUDA; on CPU use bf16")


def compiled_onnx(model: LoadedModel) -> Path:
    """The cached ONNX file of `model`, exported and checked on first use."""
    from landcover.atomic import atomic_target
    from landcover.interop.onnx import export_onnx, max_abs_difference

    assert model.torch_module is not None
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_key(model)}.onnx"
    if path.is_file():
        return path
    module = model.torch_module.cpu().eval()
    with atomic_target(path) as tmp:  # the file appears only once exported and checked
        export_onnx(module, dict(model.metadata), tmp, opset=OPSET)
        difference = max_abs_difference(module, tmp)
        if difference > TOLERANCE:
            raise ValueError(f"|ONNX - PyTorch| = {difference:.2e} above {TOLERANCE:g}")
    log.info(
        "compiled %s to ONNX (max |ONNX - PyTorch| %.1e): %s", model.reference, difference, path
    )
    return path


def onnx_model(model: LoadedModel, path: Path) -> LoadedModel:
    """The model as an ONNX Runtime session with as many threads as torch would use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # no busy-waiting between runs: the reader and writer threads need those cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def forward(batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.cpu().numpy().astype(np.float32, copy=False)
        (logits,) = session.run(None, {input_name: pixels})
        return torch.from_numpy(logits)

    return LoadedModel(
        forward,
        model.metadata,
        model.reference,
        "onnxruntime",
        model.source_run_id,
        model.torch_module,
    )
