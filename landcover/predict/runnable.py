"""The model a mapping command runs, on its backend: fetch, cache, load, backend, in that order,
and without PyTorch where it can be.

Every command that maps (`landcover-predict`, the mapping job's workers, `landcover-evaluate`)
loads through `runnable_model`. When the model's files were compiled before (the cache in
`landcover.predict.compile_cache` records which graph each set of model files became) and the map
is made on a CPU at float32 by ONNX Runtime (what `predict.backend=auto` picks there), the
cached graph runs as it is: PyTorch, the architectures and their dependencies are never
imported, which keeps about 1 GiB out of each mapping process (the figures in
`experiments/bench_predict.py`). Anything else loads the network with PyTorch as before.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from landcover import artifacts
from landcover.artifacts.reference import (
    LoadedModel,
    fetch_model_files,
)
from landcover.predict.backends import COMPILED, installed, onnx_model, with_backend
from landcover.predict.compile_cache import cached_graph

log = logging.getLogger(__name__)

# present wherever a GPU driver is loaded; without them torch.cuda cannot be available
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def gpu_possible() -> bool:
    """Whether this machine might offer torch a GPU (so `device=auto` needs torch to decide)."""
    return any(os.path.exists(path) for path in GPU_DRIVER_FILES)


def runnable_model(
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
    `threads` caps the CPU threads (None: the runtime's default).

    The model's files are read once: a logged model downloaded to look up its cached graph is
    the one loaded on a miss (a model that never compiles, like the per-pixel GBM, misses on
    every job)."""
    reference = str(reference)
    lean = lean_possible(backend, precision, device)
    if lean and reference.endswith(".onnx"):  # an exported file is its own graph
        return onnx_model(artifacts.load(reference), Path(reference), batch_size, threads)
    with tempfile.TemporaryDirectory(prefix="landcover-model-") as folder:
        fetched = fetch_model_files(reference, tracking_uri, folder) if lean else None
        hit = cached_graph(fetched.digest, reference) if fetched else None
        if hit is not None:
            model, graph = hit
            log.info("%s: mapping with its cached ONNX graph %s (no PyTorch)", reference, graph)
            return onnx_model(model, graph, batch_size, threads)
        import torch

        from landcover.runtime import select_device

        if threads:
            torch.set_num_threads(threads)
        loaded = artifacts.load(
            reference, tracking_uri=tracking_uri, device=device, fetched=fetched
        )
    return with_backend(loaded, backend, select_device(device), precision, batch_size, threads)


def lean_possible(backend: str, precision: str, device: str) -> bool:
    """Whether these settings map with ONNX Runtime at float32 on the CPU, where a cached graph
    runs without PyTorch."""
    if backend not in ("auto", "onnxruntime") or precision not in ("auto", "fp32"):
        return False
    if device not in ("auto", "cpu") or (device == "auto" and gpu_possible()):
        return False
    chosen = backend if backend != "auto" else next(b for b in COMPILED if installed(b))
    # OpenVINO is checked against PyTorch each time it compiles
    return chosen == "onnxruntime" and installed(chosen)


def source_digest(reference: str, tracking_uri: str | None) -> str | None:
    """The digest of the files `reference` names (as `artifacts.load` computes it), or
    None for an ONNX file or anything that names no model files."""
    with tempfile.TemporaryDirectory(prefix="landcover-model-") as folder:
        fetched = fetch_model_files(reference, tracking_uri, folder)
    return fetched.digest if fetched else None
