"""The champion where maps are made (issue 34): a package for QGIS's Deepness plugin and one for
ArcGIS Pro, each run by the tool's own code from ../shared/clients (Deepness in headless QGIS,
Esri's ImageClassifier.py driven as ArcGIS Pro drives a raster function), compared with
landcover-predict on the same scene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from landcover.data.synthetic import SyntheticSpec, generate
from tests.arcgis_client import classify_with_arcgis
from tests.conftest import shared_dir

BIN = Path(sys.executable).parent
QGIS_PYTHON = "/usr/bin/python3"
DEEPNESS_DEPS = Path(os.environ.get("LANDCOVER_DEEPNESS_DEPS", "/tmp/deepness-deps"))


def clients() -> Path:
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared is absent: the real GIS clients live in ../shared/clients")
    folder = shared / "clients"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent: the real GIS clients live in ../shared/clients")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str, Path, np.ndarray]:
    """A U-Net trained here for two epochs (tracking URI, run id), a 960 px scene and the
    classes landcover-predict gives it (with its default settings)."""
    from landcover.training.train import train
    from tests.conftest import compose_train

    root = tmp_path_factory.mktemp("gis")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_train(
        "data=synthetic",
        f"data.root={root / 'train'}",
        "data.synthetic.scenes={train: 3, val: 1}",
        "data.synthetic.size=192",
        "data.patch_size=128",
        "data.patches_per_epoch=32",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.progress=false",
        f"trainer.checkpoint_dir={root / 'checkpoints'}",
        f"tracking.uri={uri}",
    )
    result = train(cfg)
    generate(root / "scene", SyntheticSpec(scenes={"train": 0, "val": 1}, size=704, seed=3))
    scene = next((root / "scene" / "val").glob("*_naip.tif"))
    return uri, result.run_id, scene, predicted(result.run_id, scene, root / "map.tif", uri)


def predicted(model: str, scene: Path, target: Path, uri: str) -> np.ndarray:
    done = subprocess.run(
        [str(BIN / "landcover-predict"), f"model={model}", f"input={scene}", f"output={target}",
         f"tracking.uri={uri}", "log_to_mlflow=false", "predict.progress=false"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with rasterio.open(target) as src:
        return src.read(1)


def packaged(model: str, folder: Path, uri: str) -> dict[str, Path]:
    done = subprocess.run(
        [str(BIN / "landcover-package"), f"model={model}", f"output={folder}",
         f"tracking.uri={uri}", "name=model"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        "onnx": folder / "qgis" / "model.onnx",
        "qml": folder / "qgis" / "model.qml",
        "dlpk": folder / "arcgis" / "model.dlpk",
    }


@pytest.fixture(scope="module")
def package(trained, tmp_path_factory) -> dict[str, Path]:
    """The trained U-Net packaged by `landcover-package` (once for the module)."""
    uri, run_id, _, _ = trained
    return packaged(run_id, tmp_path_factory.mktemp("package"), uri)


@pytest.mark.slow
def test_arcgis_image_classifier_maps_as_landcover_predict(trained, package, tmp_path):
    functions = clients() / "esri-raster-deep-learning" / "python_raster_functions"
    _, _, scene, expected = trained
    files = package
    with rasterio.open(scene) as src:
        pixels = src.read()
    codes, table = classify_with_arcgis(files["dlpk"], pixels, functions, tmp_path)
    agreement = float(np.mean(codes == expected))
    print(f"ArcGIS ImageClassifier vs landcover-predict: {agreement:.5f}")
    assert agreement >= 0.999
    rows = [(f["attributes"]["Value"], f["attributes"]["Class"]) for f in table["features"]]
    colours = [
        (f["attributes"]["Red"], f["attributes"]["Green"], f["attributes"]["Blue"])
        for f in table["features"]
    ]
    assert rows == [(1, "water"), (2, "tree_canopy"), (3, "low_vegetation"),
                    (4, "barren_impervious")]  # fmt: skip
    assert colours[0] == (0, 0, 255)  # water in its schema colour


def deepness(onnx: Path, scene: Path, result: Path) -> dict:
    """The plugin's MapProcessorSegmentation in headless QGIS (tests/qgis_deepness.py)."""
    if (
        not Path(QGIS_PYTHON).exists()
        or subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"], capture_output=True).returncode
    ):
        pytest.skip("no PyQGIS: apt-get install python3-qgis qgis-providers (.ci/run does)")
    if not (DEEPNESS_DEPS / "onnxruntime").is_dir():
        pytest.skip(
            f"Deepness's dependencies are not in {DEEPNESS_DEPS}: /usr/bin/python3 -m pip install "
            "--target /tmp/deepness-deps onnxruntime==1.17.3 opencv-python-headless==4.9.0.80 "
            "(.ci/run does)"
        )
    plugin = clients() / "qgis-deepness"
    env = {
        **os.environ,
        "PYTHONPATH": f"{plugin / 'src'}:{plugin}:{DEEPNESS_DEPS}",
        "QT_QPA_PLATFORM": "offscreen",
    }
    done = subprocess.run(
        [QGIS_PYTHON, str(Path(__file__).parent / "qgis_deepness.py"), str(onnx), str(scene),
         str(result)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_deepness_in_qgis_maps_with_the_models_names_and_scaling(trained, package, tmp_path):
    _, _, scene, expected = trained
    files = package
    read = deepness(files["onnx"], scene, tmp_path / "deepness.npy")
    assert read["class_names"] == ["water", "tree_canopy", "low_vegetation", "barren_impervious"]
    assert read["tile"] == 512 and read["overlap_px"] >= 64 and read["resolution_cm"] == 100
    numbers = np.load(tmp_path / "deepness.npy")[0]  # Deepness: class number + 1
    assert (numbers > 0).all()  # every pixel classified (before: 67 % "no class")
    codes = np.array([0, 1, 2, 3, 4])[numbers]
    agreement = float(np.mean(codes == expected))
    inner = float(np.mean((codes == expected)[64:-64, 64:-64]))
    print(f"Deepness vs landcover-predict: {agreement:.5f} (inside a 64 px border {inner:.5f})")
    assert agreement >= 0.98
    style = files["qml"].read_text()
    assert 'label="water"' in style and 'value="1"' in style


@pytest.mark.slow
def test_a_unet_trained_two_epochs_exports_with_the_defaults(trained, tmp_path):
    """Before: |onnx - torch| = 1.09e-3 on raw logits against an absolute tolerance of 1e-3
    refused a newcomer's first export. Now the difference is judged against the logits'
    scale, and the classes a user sees must agree."""
    uri, run_id, _, _ = trained
    done = subprocess.run(
        [str(BIN / "landcover-export"), f"model={run_id}", f"output={tmp_path / 'm.onnx'}",
         f"tracking.uri={uri}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    print({k: v for k, v in metrics.items() if k.startswith("onnx/")})
    assert metrics["onnx/class_agreement"] >= 0.999 and metrics["onnx/relative_diff"] <= 1e-4
