"""The champion as users meet it outside Python: `mlflow models serve` answering REST requests
with class maps, and `mlflow server` showing the experiment, run, artifacts and registry."""

from __future__ import annotations

import os
import urllib.parse

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from landcover.predict.writer import class_codes
from landcover.registry.promotion import find_best_run, promote
from landcover.training.train import train
from tests.conftest import compose_train
from tests.local_server import mlflow_server_command
from tests.servers import BIN, HOST, free_port, http, http_json, running
from tests.test_train_e2e import tiny_overrides, train_with_nlcd_prior

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champion(tiny_synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    train(
        compose_train(
            *tiny_overrides(tiny_synthetic, tmp, "trainer.max_epochs=1", "tracking.experiment=srv")
        )
    )
    client = MlflowClient(uri)
    candidate = find_best_run(client, experiment="srv", metric="val/mIoU")
    promote(client, candidate, name="landcover", experiment="srv")
    return uri, candidate.run_id, tmp


def patches(size: int = 48) -> np.ndarray:
    return np.random.default_rng(7).uniform(0, 255, (2, 4, size, size + 8)).astype(np.float32)


def expected_codes(uri: str, run_id: str, pixels: np.ndarray) -> np.ndarray:
    """The class codes the PyTorch face gives, decoded with the logged schema."""
    from landcover import artifacts

    model = artifacts.load(run_id, tracking_uri=uri, device="cpu")
    logits = model.forward(pixels)
    return class_codes(model.schema)[logits.argmax(1)]


def test_pyfunc_face_returns_class_codes(champion):
    uri, run_id, _ = champion
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/landcover@champion")
    pixels = patches()
    codes = pyfunc.predict(pixels)
    assert codes.shape == (2, 48, 56) and codes.dtype == np.uint8
    assert np.array_equal(codes, expected_codes(uri, run_id, pixels))
    with pytest.raises(Exception, match="does not match expected shape"):
        pyfunc.predict(pixels[0])  # the signature asks for a batch axis


def test_rest_serving_answers_with_class_maps(champion):
    uri, run_id, tmp = champion
    port = free_port()
    # the README's command, with a PATH that does not hold the venv (a user's shell)
    command = [str(BIN / "landcover-serve"), "models:/landcover@champion", "--port", str(port)]
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(BIN))
    base = f"http://{HOST}:{port}"
    pixels = patches()
    env = {"MLFLOW_TRACKING_URI": uri, "PATH": path, "LANDCOVER_SERVE_MAX_PIXELS": "20000"}
    with running(command, f"{base}/ping", tmp / "serve.log", env, venv_on_path=False):
        answer = http_json(f"{base}/invocations", {"inputs": pixels.tolist()})
        status, body = http(f"{base}/invocations", {"inputs": [[1, 2, 3]]})
        big_status, big_body = http(
            f"{base}/invocations", {"inputs": np.zeros((1, 4, 160, 160)).tolist()}
        )
        nan = pixels.copy()
        nan[0, 0, 0, 0] = np.nan
        nan_status, _ = http(f"{base}/invocations", {"inputs": nan.tolist()})
    codes = np.array(answer["predictions"], dtype=np.uint8)
    assert codes.shape == (2, 48, 56)
    assert np.array_equal(codes, expected_codes(uri, run_id, pixels))
    assert status >= 400 and b"error" in body.lower()  # a malformed patch is refused
    assert big_status == 400 and b"budget" in big_body  # 25,600 px > the 20,000 px budget
    assert nan_status == 400
    assert "POST /invocations" in (tmp / "serve.log").read_text()


def test_tracking_server_shows_runs_artifacts_and_registry(champion):
    uri, run_id, tmp = champion
    port = free_port()
    command = mlflow_server_command(uri, port)
    base = f"http://{HOST}:{port}"
    with running(command, f"{base}/health", tmp / "server.log", {}):
        api = f"{base}/api/2.0/mlflow"
        experiment = http_json(f"{api}/experiments/get-by-name?experiment_name=srv")["experiment"]
        runs = http_json(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})
        (run,) = runs["runs"]
        assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert 0.0 <= metrics["val/mIoU"] <= 1.0 and "val/overall_accuracy" in metrics
        history = http_json(f"{api}/metrics/get-history?run_id={run_id}&metric_key=train/loss")
        assert len(history["metrics"]) == 1
        listed = http_json(f"{api}/artifacts/list?run_id={run_id}&path=confusion_matrix")
        names = {item["path"] for item in listed["files"]}
        assert "confusion_matrix/confusion_matrix.png" in names
        query = urllib.parse.urlencode(
            {"path": "confusion_matrix/confusion_matrix.json", "run_uuid": run_id}
        )
        status, body = http(f"{base}/get-artifact?{query}")
        assert status == 200 and b'"rows": "label"' in body
        model = http_json(f"{api}/registered-models/get?name=landcover")["registered_model"]
        aliases = {a["alias"]: a["version"] for a in model["aliases"]}
        assert aliases == {"champion": "1"}
        version = http_json(f"{api}/model-versions/get?name=landcover&version=1")
        assert version["model_version"]["run_id"] == run_id
        status, page = http(f"{base}/")
        assert status == 200 and b"<html" in page.lower()


def test_a_model_with_a_prior_layer_is_served_with_the_layer_as_one_more_band(
    tiny_synthetic, tmp_path
):
    result, uri = train_with_nlcd_prior(tiny_synthetic, tmp_path)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    pixels = patches()
    with pytest.raises(Exception, match="does not match expected shape"):
        pyfunc.predict(pixels)  # the layer's band is missing

    def with_layer(code: float) -> np.ndarray:
        return np.concatenate([pixels, np.full((2, 1, 48, 56), code, np.float32)], axis=1)

    barren = 4  # Chesapeake code of barren + impervious
    developed = (pyfunc.predict(with_layer(24)) == barren).mean()
    forest = (pyfunc.predict(with_layer(41)) == barren).mean()
    assert developed > forest + 0.05  # NLCD "high intensity" makes barren + impervious win
    forest_codes = pyfunc.predict(with_layer(41))
    assert np.array_equal(forest_codes, expected_codes(uri, result.run_id, pixels))  # no say
    with pytest.raises(Exception, match="whole numbers 0-255"):
        pyfunc.predict(with_layer(22.5))
