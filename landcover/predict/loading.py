"""The model a mapping command runs: loaded from its reference onto its backend, and without
PyTorch where it can be.

Every command that maps (`landcover-predict`, the mapping job's workers, `landcover-evaluate`)
loads through `load_for_prediction`. When the model's files were compiled before (the cache in
`landcover.predict.backends` records which graph each set of model files became) and the map
is made on a CPU at float32 by ONNX Runtime (what `predict.backend=auto` picks there), the
cached graph runs as it is: PyTorch, the architectures and their dependencies are never
imported, which keeps about 1 GiB out of each mapping process (the figures in
`experiments/bench_predict.py`). Anything else loads the network with PyTorch as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from landcover.predict.backends import (
    COMPILED,
    compiled_for_source,
    installed,
    onnx_model,
    with_backend,
)
from landcover.predict.reference import (
    LoadedModel,
    files_digest,
    load_model_reference,
    mlflow_digest,
    model_uri,
)

log = logging.getLogger(__name__)

# present wherever a GPU driver is loaded; without them torch.cuda cannot be available
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def gpu_possible() -> bool:
    """Whether this machine might offer torch a GPU (so `device=auto` needs torch to decide)."""
    return any(os.path.exists(path) for path in GPU_DRIVER_FILES)


def load_for_prediction(
    reference: str,
    *,
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int = 0,
    tracking_uri: str | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> LoadedModel:
    """The model `reference` names, running on `predict.backend` at `predict.precision`;
    `threads` caps the CPU threads (None: the runtime's default)."""
    reference = str(reference)
    lean = _from_cached_graph(
        reference, backend, precision, batch_size, tracking_uri, device, threads
    )
    if lean is not None:
        return lean
    import torch

    from landcover.runtime import select_device

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model_reference(reference, tracking_uri=tracking_uri, device=device)
    return with_backend(loaded, backend, select_device(device), precision, batch_size, threads)


def _from_cached_graph(
    reference: str,
    backend: str,
    precision: str,
    batch_size: int,
    tracking_uri: str | None,
    device: str,
    threads: int | None,
) -> LoadedModel | None:
    """The model as its cached ONNX graph (or as the ONNX file it is) on ONNX Runtime, or None
    where that is not what the settings ask for or no graph of these model files is cached."""
    if backend not in ("auto", "onnxruntime") or precision not in ("auto", "fp32"):
        return None
    if device not in ("auto", "cpu") or (device == "auto" and gpu_possible()):
        return None
    chosen = backend if backend != "auto" else next(b for b in COMPILED if installed(b))
    if chosen != "onnxruntime" or not installed(chosen):
        return None  # OpenVINO is checked against PyTorch each time it compiles
    if reference.endswith(".onnx"):  # an exported file is its own graph
        return onnx_model(load_model_reference(reference), Path(reference), batch_size, threads)
    digest = source_digest(reference, tracking_uri)
    hit = compiled_for_source(digest, reference) if digest else None
    if hit is None:
        return None
    model, graph = hit
    log.info("%s: mapping with its cached ONNX graph %s (PyTorch not loaded)", reference, graph)
    return onnx_model(model, graph, batch_size, threads)


def source_digest(reference: str, tracking_uri: str | None) -> str | None:
    """The digest of the files `reference` names (as `load_model_reference` computes it), or
    None for an ONNX file or anything that names no model files."""
    path = Path(reference)
    if reference.endswith(".onnx"):
        return None
    if path.is_file():
        return files_digest(path)
    uri = model_uri(reference)
    return mlflow_digest(uri, tracking_uri) if uri else None
