"""Compiled backends: exported once, checked, cached, reused; a failure falls back to PyTorch."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from landcover import artifacts
from landcover.artifacts.reference import from_module
from landcover.errors import ConfigError
from landcover.predict import backends
from tests.conftest import write_raster

MODEL = Path(__file__).parent / "fixtures" / "pre_refactor" / "checkpoint.pt"
BIN = Path(sys.executable).parent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LANDCOVER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compiled"


def pixels(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(0, 255, (1, 4, size, size)).astype(np.float32)


def test_onnxruntime_is_compiled_once_checked_and_reused(cache, monkeypatch):
    eager = artifacts.load(str(MODEL), device="cpu")
    compiled = backends.with_backend(eager, "onnxruntime", torch.device("cpu"))
    assert compiled.kind == "onnxruntime" and eager.kind == "checkpoint"
    (cached,) = cache.glob("*.onnx")
    with torch.inference_mode():
        expected = eager.forward(pixels())
    assert np.abs(compiled.forward(pixels()) - expected).max() < 1e-3
    stamp = cached.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("landcover.interop.onnx.export_onnx", no_export)
    again = backends.with_backend(
        artifacts.load(str(MODEL), device="cpu"), "onnxruntime", torch.device("cpu")
    )
    assert again.kind == "onnxruntime" and cached.stat().st_mtime_ns == stamp


def test_a_failed_export_falls_back_to_pytorch_with_one_warning(cache, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nsecond line")

    monkeypatch.setattr("landcover.interop.onnx.export_onnx", broken)
    eager = artifacts.load(str(MODEL), device="cpu")
    with caplog.at_level(logging.WARNING, logger="landcover.predict.backends"):
        model = backends.with_backend(eager, "onnxruntime", torch.device("cpu"))
    assert model is eager
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "unsupported operator" in record.getMessage() and "\n" not in record.getMessage()
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_auto_compiles_networks_on_cpu_and_leaves_the_gbm_alone(cache):
    eager = artifacts.load(str(MODEL), device="cpu")
    assert backends.resolve("auto", eager, torch.device("cpu")) == "onnxruntime"
    assert backends.resolve("auto", eager, torch.device("cuda")) == "torch"
    from landcover.models import build_model

    gbm = build_model(
        {
            "arch": "pixel_gbm",
            "max_iter": 2,
            "learning_rate": 0.1,
            "max_leaf_nodes": 4,
            "l2_regularization": 0.0,
            "samples": 10,
        },
        in_channels=4,
        num_classes=2,
        mean=[0.0] * 4,
        std=[1.0] * 4,
    )
    loaded = from_module(gbm, {"bands": 4})
    assert backends.resolve("auto", loaded, torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="predict.backend='tensorrt'"):
        backends.resolve("tensorrt", eager, torch.device("cpu"))


def test_predict_maps_alike_on_onnxruntime_and_torch(tmp_path):
    rng = np.random.default_rng(0)
    scene = write_raster(
        tmp_path / "scene.tif", rng.integers(0, 255, (4, 300, 260), dtype=np.uint8)
    )
    maps = {}
    for backend in ("torch", "onnxruntime"):
        output = tmp_path / f"{backend}.tif"
        done = subprocess.run(
            [
                str(BIN / "landcover-predict"),
                f"model={MODEL}",
                f"input={scene}",
                f"output={output}",
                f"predict.backend={backend}",
                "predict.tile_size=128",
                "predict.overlap=32",
                "predict.progress=false",
                "log_to_mlflow=false",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={"LANDCOVER_CACHE_DIR": str(tmp_path / "cache"), "PATH": str(BIN)},
        )
        assert done.returncode == 0, done.stderr
        with rasterio.open(output) as src:
            maps[backend] = src.read(1)
    assert (maps["torch"] == maps["onnxruntime"]).mean() >= 0.999
    assert list((tmp_path / "cache" / "compiled").glob("*.onnx"))


def test_precision_is_an_explicit_choice(cache):
    cpu = torch.device("cpu")
    eager = artifacts.load(str(MODEL), device="cpu")
    assert backends.with_backend(eager, "torch", cpu) is eager  # auto: fp32 on CPU, untouched
    reduced = backends.with_backend(eager, "torch", cpu, precision="bf16")
    with torch.inference_mode():
        full, half = eager.forward(pixels()), reduced.forward(pixels())
    assert half.dtype == np.float32 and half.shape == full.shape
    assert not np.array_equal(full, half)  # computed in bf16: not the fp32 logits
    assert (full.argmax(1) == half.argmax(1)).mean() > 0.5
    with pytest.raises(ConfigError, match="onnxruntime backend"):
        backends.with_backend(eager, "onnxruntime", cpu, precision="bf16")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        backends.with_backend(eager, "torch", cpu, precision="fp16")
    with pytest.raises(ConfigError, match="int8 is not supported"):
        backends.with_backend(eager, "torch", cpu, precision="int8")


def test_auto_is_the_default_and_a_compiled_graph_runs_a_tile_per_thread(cache, monkeypatch):
    from landcover.config import PredictSettings

    assert PredictSettings.defaults().backend == "auto"
    assert PredictSettings.defaults().batch_size == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert backends.parallel_tiles(0) == (2, 1)  # two tiles at once, one thread each
    assert backends.parallel_tiles(1) == (1, 2)  # an explicit single tile gets both threads
    assert backends.parallel_tiles(8) == (2, 1)
    eager = artifacts.load(str(MODEL), device="cpu")
    assert eager.preferred_batch == 1
    compiled = backends.with_backend(eager, "auto", torch.device("cpu"))
    assert compiled.kind == "onnxruntime" and compiled.preferred_batch == 2
    batch = np.concatenate([pixels(), pixels() * 0.5, pixels()[..., ::-1]])  # 3 tiles: 2 + 1
    together = compiled.forward(batch)
    alone = np.concatenate([compiled.forward(batch[i : i + 1]) for i in range(3)])
    assert together.shape == (3, *alone.shape[1:])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_a_negative_batch_size_is_a_config_error():
    from landcover.config import PredictSettings
    from landcover.errors import ConfigValueError
    from landcover.predict.predictor import tiles_per_batch

    eager = artifacts.load(str(MODEL), device="cpu")
    assert tiles_per_batch(eager, PredictSettings.defaults(batch_size=0)) == 1
    assert tiles_per_batch(eager, PredictSettings.defaults(batch_size=3)) == 3
    with pytest.raises(ConfigValueError, match="predict.batch_size=-1"):
        tiles_per_batch(eager, PredictSettings.defaults(batch_size=-1))


def test_openvino_compiles_the_cached_graph_checked_against_torch(cache, monkeypatch):
    pytest.importorskip("openvino", reason="openvino is an optional extra (landcover[openvino])")
    eager = artifacts.load(str(MODEL), device="cpu")
    compiled = backends.with_backend(eager, "openvino", torch.device("cpu"))
    assert compiled.kind == "openvino"
    with torch.inference_mode():
        expected = eager.forward(pixels(96))
    assert np.abs(compiled.forward(pixels(96)) - expected).max() < 1e-3
    assert len(list(cache.glob("*.onnx"))) == 1  # the same cached graph ONNX Runtime reads

    def wrong(*args, **kwargs):  # a compiled graph that disagrees with PyTorch is not used
        raise ValueError("|OpenVINO - PyTorch| = 3.00e+00 above 0.001")

    monkeypatch.setattr(backends, "_check_against_torch", wrong)
    assert backends.with_backend(eager, "openvino", torch.device("cpu")) is eager


def test_openvino_reduced_precision_only_where_the_cpu_has_it(cache):
    pytest.importorskip("openvino", reason="openvino is an optional extra (landcover[openvino])")
    eager = artifacts.load(str(MODEL), device="cpu")
    cpu = torch.device("cpu")
    if "BF16" not in backends.openvino_capabilities():
        with pytest.raises(ConfigError, match="this CPU offers OpenVINO"):
            backends.with_backend(eager, "openvino", cpu, precision="bf16")
        return
    reduced = backends.with_backend(eager, "openvino", cpu, precision="bf16")
    with torch.inference_mode():
        full, half = eager.forward(pixels(96)), reduced.forward(pixels(96))
    assert not np.allclose(full, half, atol=1e-4)  # computed in bf16, really
    assert (full.argmax(1) == half.argmax(1)).mean() > 0.5


def test_an_uninstalled_backend_is_named_with_its_extra(monkeypatch):
    eager = artifacts.load(str(MODEL), device="cpu")
    monkeypatch.setattr(backends, "installed", lambda name: name != "openvino")
    with pytest.raises(ConfigError, match=r"landcover\[openvino\]"):
        backends.resolve("openvino", eager, torch.device("cpu"))
    assert backends.resolve("auto", eager, torch.device("cpu")) == "onnxruntime"
