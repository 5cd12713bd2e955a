"""The engine a loaded model runs on: eager PyTorch, or the same network compiled to ONNX and
run by ONNX Runtime or OpenVINO (1.8-2x eager PyTorch per tile at float32 on a 2-core CPU,
`experiments/bench_predict.py`).

A PyTorch model is compiled once into the cache (`landcover.predict.compile_cache`) and
reused by every later job. OpenVINO reads that same file and is checked against PyTorch again
each time it compiles it (its CPU plugin picks its own kernels and, unless told otherwise, bf16
on CPUs that have it). A failed export or check falls back to PyTorch with one warning line:
the map is made either way.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from landcover.artifacts.reference import LoadedModel
from landcover.errors import ConfigError
from landcover.predict.compile_cache import compiled_onnx

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
# auto's order of preference on CPU: at float32 both map a 4096 x 4096 scene in the same time
# (bench_predict), and ONNX Runtime holds 190 MiB less; OpenVINO adds bf16 on CPUs with it
COMPILED = ("onnxruntime", "openvino")
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
PROBE = (1, 96, 160)  # batch, height, width of the input a compiled graph is checked on


def installed(backend: str) -> bool:
    """Whether the backend's runtime can be imported (OpenVINO is an optional extra)."""
    return backend == "torch" or importlib.util.find_spec(backend) is not None


def resolve(name: str, model: LoadedModel, device: torch.device) -> str:
    """The backend `name` means for this model: `auto` is a compiled graph (ONNX Runtime) for
    a network on CPU, PyTorch on CUDA (where it already runs bf16 autocast and channels-last);
    an exported ONNX file runs compiled everywhere."""
    if name not in BACKENDS:
        raise ConfigError(f"config value predict.backend={name!r} is not one of {list(BACKENDS)}")
    if name != "auto" and not installed(name):
        raise ConfigError(
            f"config value predict.backend={name}: {name} is not installed "
            f"(pip install 'landcover[{name}]')"
        )
    fitted_once = model.torch_module is not None and getattr(
        model.torch_module, "fitted_once", False
    )
    if fitted_once or (model.torch_module is None and model.kind != "onnx"):
        return "torch"  # the GBM and other non-networks run as themselves
    if name != "auto":
        return name
    if device.type != "cpu" and model.kind != "onnx":
        return "torch"
    return next(backend for backend in COMPILED if installed(backend))


def with_backend(
    model: LoadedModel,
    name: str,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 0,
    threads: int | None = None,
) -> LoadedModel:
    """`model` running on the chosen backend and precision (itself when that is what it
    already runs on). `auto` precision: bf16 autocast for PyTorch on CUDA, float32 elsewhere;
    anything lower than float32 on CPU only when asked for by name. `batch_size` is
    `predict.batch_size` (0: the backend's own best, which the result's `preferred_batch`
    says); `threads` the CPU threads a compiled graph may use (None: torch's count)."""
    chosen = resolve(name, model, device)
    if precision != "auto":
        check_precision(precision, chosen, device)
    if chosen == "torch":
        if precision == "auto" or model.torch_module is None:
            return model
        import torch

        from landcover.artifacts.reference import torch_forward

        dtype = PRECISIONS[precision]
        forward = torch_forward(
            model.torch_module,
            device,
            device.type == "cuda",
            getattr(torch, dtype) if dtype else None,
        )
        return _running(model, forward, model.kind)
    if model.kind == "onnx":  # an exported file: run as it is
        path = Path(model.reference)
    else:
        try:
            path = compiled_onnx(model)
        except Exception as err:  # export and check failures come in many types
            _fall_back(model, "ONNX export", err)
            return model
    if chosen == "onnxruntime":
        return onnx_model(model, path, batch_size, threads)
    try:
        return openvino_model(model, path, precision, batch_size, threads)
    except Exception as err:  # OpenVINO's compile and check failures
        if model.torch_module is None:
            raise
        _fall_back(model, "OpenVINO", err)
        return model


def _fall_back(model: LoadedModel, step: str, err: Exception) -> None:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    log.warning("%s of %s failed (%s): mapping with PyTorch", step, model.reference, first)


def _running(
    model: LoadedModel, forward: Callable, kind: str, preferred_batch: int = 1
) -> LoadedModel:
    """The same model (metadata, reference, lineage) behind another forward function."""
    return dataclasses.replace(model, forward=forward, kind=kind, preferred_batch=preferred_batch)


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
            "backend (fp32 only): use predict.backend=openvino or torch for reduced precision"
        )
    if backend == "openvino":
        offered = openvino_capabilities() if precision != "fp32" else set()
        if precision != "fp32" and precision.upper() not in offered:
            raise ConfigError(
                f"config value predict.precision={precision}: this CPU offers OpenVINO "
                f"{sorted(offered)} only"
            )
        return
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "config value predict.precision=fp16 needs CUDA (torch) or a CPU with FP16 "
            "(openvino); on this CPU use bf16"
        )


def openvino_capabilities() -> set[str]:
    """The numeric formats OpenVINO's CPU plugin computes in on this machine (FP32, BF16...)."""
    import openvino as ov

    return set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def available_threads(threads: int | None = None) -> int:
    """CPU threads a compiled graph may use: `threads` if given, else torch's count where
    torch is loaded, else OMP_NUM_THREADS, else the cores this process may run on (torch's
    own default)."""
    if threads:
        return threads
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))


def parallel_tiles(batch_size: int, threads: int | None = None) -> tuple[int, int]:
    """(tiles run at once, threads each) for a compiled backend with `available_threads`
    threads. One thread per tile is about 13 % faster end to end than every thread on one tile
    at 2 threads (`experiments/bench_predict.py`): no barrier per operator, and a reader or
    writer thread that takes a core stalls one tile instead of all of them. `batch_size` 0 means
    as many tiles as threads; a smaller explicit batch gets more threads per tile."""
    total = available_threads(threads)
    workers = total if batch_size <= 0 else max(1, min(total, batch_size))
    return workers, max(1, total // workers)


def split_forward(run: Callable[[int, np.ndarray], np.ndarray], workers: int) -> Callable:
    """A forward that runs a batch as up to `workers` chunks at once (`run(worker, chunk)`;
    the runtimes release the GIL while they compute)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = (
        ThreadPoolExecutor(workers, thread_name_prefix="landcover-tiles") if workers > 1 else None
    )

    def forward(batch: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        chunks = np.array_split(pixels, min(workers, len(pixels)))
        if pool is None or len(chunks) == 1:
            return run(0, pixels)
        return np.concatenate(list(pool.map(run, range(len(chunks)), chunks)))

    return forward


def onnx_model(
    model: LoadedModel, path: Path, batch_size: int = 0, threads: int | None = None
) -> LoadedModel:
    """The model as one ONNX Runtime session that runs several tiles at once (their share of
    the threads each)."""
    import onnxruntime as ort

    workers, threads = parallel_tiles(batch_size, threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # no busy-waiting between runs: the reader and writer threads need those cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(worker: int, pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: pixels})[0]  # Run is thread-safe

    return _running(model, split_forward(run, workers), "onnxruntime", workers)


def openvino_model(
    model: LoadedModel,
    path: Path,
    precision: str = "auto",
    batch_size: int = 0,
    threads: int | None = None,
) -> LoadedModel:
    """The ONNX file compiled by OpenVINO for the CPU, at float32 unless `precision` names a
    reduced one (OpenVINO's own default there would be bf16), with one stream per tile run at
    once; checked against PyTorch at float32."""
    import openvino as ov

    workers, _ = parallel_tiles(batch_size, threads)
    core = ov.Core()
    inference_precision = OPENVINO_PRECISIONS["fp32" if precision == "auto" else precision]
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": available_threads(threads),
            "INFERENCE_PRECISION_HINT": inference_precision,
            "PERFORMANCE_HINT": "THROUGHPUT" if workers > 1 else "LATENCY",
            "NUM_STREAMS": workers,
            # the reader and writer threads share these cores: no thread pinned to one
            "ENABLE_CPU_PINNING": False,
        },
    )
    requests = [compiled.create_infer_request() for _ in range(workers)]

    def run(worker: int, pixels: np.ndarray) -> np.ndarray:
        return requests[worker].infer({0: pixels})[0].copy()  # the request reuses its buffer

    forward = split_forward(run, workers)
    if model.torch_module is not None and inference_precision == "f32":
        _check_against_torch(model.torch_module, forward, int(model.metadata["bands"]))
    return _running(model, forward, "openvino", workers)


def _check_against_torch(module: torch.nn.Module, forward: Callable, bands: int) -> None:
    from landcover.interop.onnx import forward_check

    refusal = forward_check(module, forward, bands, sizes=(PROBE,)).refusal()
    if refusal:
        raise ValueError(f"the OpenVINO model is refused: {refusal}")
