"""A model compiled once maps later without PyTorch: the same map, torch never imported;
anything the cache cannot vouch for loads through PyTorch as before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from landcover.config import PredictSettings
from landcover.predict import compile_cache
from landcover.predict.predictor import predict_raster
from landcover.predict.runnable import runnable_model, source_digest
from tests.conftest import write_raster

MODEL = Path(__file__).parent / "fixtures" / "pre_refactor" / "checkpoint.pt"
SETTINGS = {"tile_size": 64, "overlap": 16, "progress": False}

MAP_IN_A_FRESH_PROCESS = """
import sys
from landcover.config import PredictSettings
from landcover.predict.runnable import runnable_model
from landcover.predict.predictor import predict_raster
model = runnable_model(sys.argv[1], device="cpu")
predict_raster(model, sys.argv[2], sys.argv[3], PredictSettings.defaults(**{settings}))
loaded = [name in sys.modules for name in ("torch", "segmentation_models_pytorch")]
print(model.kind, model.torch_module is None, *loaded)
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LANDCOVER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compiled"


@pytest.fixture
def scene(tmp_path) -> Path:
    pixels = np.random.default_rng(3).integers(0, 255, (4, 150, 130), dtype=np.uint8)
    return write_raster(tmp_path / "scene.tif", pixels)


def test_a_compiled_model_maps_again_without_importing_torch(cache, scene, tmp_path):
    first = runnable_model(str(MODEL), device="cpu")  # loads with torch, compiles
    assert first.kind == "onnxruntime" and first.source_digest
    predict_raster(first, scene, tmp_path / "first.tif", PredictSettings.defaults(**SETTINGS))
    (record,) = (cache / "sources").glob("*.json")
    assert json.loads(record.read_text())["metadata"]["schema"] == first.metadata["schema"]

    (graph,) = cache.glob("*.onnx")
    # the checkpoint (its cached graph found by the file's digest), then the ONNX file itself
    for name, reference in (("again", MODEL), ("exported", graph)):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                MAP_IN_A_FRESH_PROCESS.format(settings=SETTINGS),
                str(reference),
                str(scene),
                str(tmp_path / f"{name}.tif"),
            ],
            capture_output=True,
            text=True,
            env={"LANDCOVER_CACHE_DIR": str(cache.parent), "PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        # run by ONNX Runtime, no network built, no torch, no architectures
        assert out.stdout.split() == ["onnxruntime", "True", "False", "False"]
        with (
            rasterio.open(tmp_path / "first.tif") as a,
            rasterio.open(tmp_path / f"{name}.tif") as b,
        ):
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.crs == b.crs and a.transform == b.transform


def lean(model) -> bool:
    """Mapped from the cached graph alone (no network loaded)."""
    return model.kind == "onnxruntime" and model.torch_module is None


def test_what_the_cache_cannot_vouch_for_loads_through_torch(cache, tmp_path):
    assert not lean(runnable_model(str(MODEL), device="cpu"))
    assert lean(runnable_model(str(MODEL), device="cpu"))
    # another precision, backend or device: the network itself is needed
    assert runnable_model(str(MODEL), device="cpu", backend="torch").kind == "checkpoint"
    # a copy of the file is the same model: its digest finds the same graph
    copy = tmp_path / "copy.pt"
    copy.write_bytes(MODEL.read_bytes())
    assert source_digest(str(copy), None) == source_digest(str(MODEL), None)
    assert lean(runnable_model(str(copy), device="cpu"))
    # a graph that disappeared, or a record that is not JSON: compiled again, no error
    (record,) = (cache / "sources").glob("*.json")
    for graph in cache.glob("*.onnx"):
        graph.unlink()
    assert not lean(runnable_model(str(MODEL), device="cpu"))
    record.write_text("{not json")
    assert not lean(runnable_model(str(MODEL), device="cpu"))
    assert json.loads(record.read_text())["graph"].endswith(".onnx")  # written again, whole
    # a record naming a file outside the cache is refused
    record.write_text(json.dumps({"graph": "../../elsewhere.onnx", "metadata": {"schema": {}}}))
    assert compile_cache.cached_graph(source_digest(str(MODEL), None), "x") is None


def test_an_mlflow_model_has_one_digest_and_maps_from_its_cached_graph(
    cache, tmp_path, monkeypatch
):
    import mlflow

    from landcover import artifacts
    from landcover.artifacts import reference as references
    from landcover.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    eager = artifacts.load(str(MODEL), device="cpu")
    assert eager.torch_module is not None
    with tracking.start_run(uri, "lean") as run:
        tracking.log_landcover_model(eager.torch_module, metadata=eager.metadata)
    mlflow.end_run()
    run_id = run.info.run_id
    loaded = artifacts.load(run_id, tracking_uri=uri, device="cpu")
    assert loaded.source_digest == source_digest(run_id, uri)
    assert loaded.source_digest != eager.source_digest  # another file, another record
    downloads: list[str] = []
    download = references._download
    monkeypatch.setattr(references, "_download", lambda *a: downloads.append(a[0]) or download(*a))
    compiled = runnable_model(run_id, tracking_uri=uri, device="cpu")
    assert not lean(compiled) and compiled.source_run_id == run_id
    assert downloads == [f"runs:/{run_id}/model"]  # a miss fetches the model once, not twice
    assert compiled.source_digest == loaded.source_digest
    again = runnable_model(run_id, tracking_uri=uri, device="cpu")
    assert lean(again) and again.source_run_id == run_id
    assert again.model_id == loaded.model_id and again.reference == run_id
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(again.forward(pixels), loaded.forward(pixels), atol=1e-3)
