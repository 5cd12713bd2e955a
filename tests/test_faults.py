"""Hostile files and faults: no code runs from a model file, servers protect themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from landcover import artifacts
from landcover.artifacts.checkpoint import load_checkpoint
from landcover.artifacts.reference import ModelReferenceError
from landcover.errors import ConfigError
from landcover.models import build_model
from landcover.models.pixel_gbm import PixelGBM
from landcover.serving.pyfunc import ClassMapModel

BIN = Path(sys.executable).parent


class Payload:
    """Unpickling this creates a marker file: what a hostile model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(tmp: Path) -> tuple[Path, Path]:
    marker = tmp / "pwned"
    path = tmp / "crafted.pt"
    torch.save({"model": Payload(marker), "metadata": {}, "config": ""}, path)
    return path, marker


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(ModelReferenceError, match="landcover-convert-model"):
        artifacts.load(str(path))
    with pytest.raises(ConfigError, match="--trust"):
        load_checkpoint(path)  # trainer.resume_from
    assert not marker.exists()
    # the one-time converter refuses without --trust, and names why
    out = subprocess.run(
        [str(BIN / "landcover-convert-model"), str(path)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "--trust" in out.stderr and not marker.exists()


def test_a_crafted_mlflow_model_runs_no_code(tmp_path):
    """An MLflow model in the pickled PyTorch flavour (what older versions logged) is refused."""
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    (model_dir / "data").mkdir(parents=True)
    torch.save(Payload(marker), model_dir / "data" / "model.pth")
    (model_dir / "MLmodel").write_text(
        "flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.0\n"
        "metadata:\n  schema: {name: x, classes: []}\n  bands: 4\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from landcover.tracking import runs as tracking

    with tracking.start_run(uri, "crafted") as run:
        mlflow.log_artifacts(str(model_dir), "model")
    with pytest.raises(ModelReferenceError, match="landcover-convert-model"):
        artifacts.load(run.info.run_id, tracking_uri=uri)
    assert not marker.exists()


GBM = {  # a complete pixel_gbm config, as training stores it
    "arch": "pixel_gbm",
    "max_iter": 5,
    "learning_rate": 0.1,
    "max_leaf_nodes": 31,
    "l2_regularization": 0.0,
    "samples": 1000,
}


def test_pixel_gbm_state_travels_without_pickle(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(
        GBM,
        in_channels=4,
        num_classes=3,
        mean=[0.0] * 4,
        std=[1.0] * 4,
    )
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (600, 4)).astype(np.float32)
    model.net.fit_pixels(pixels, (pixels[:, 3] > 128).astype(int) + (pixels[:, 0] > 200))
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = build_model(GBM, in_channels=4, num_classes=3, mean=[0.0] * 4, std=[1.0] * 4)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    x = torch.from_numpy(rng.uniform(0, 255, (1, 4, 8, 8)).astype(np.float32))
    assert torch.equal(model(x), again(x))
    # the old pickled state is refused with the way out
    with pytest.raises(Exception, match="convert"):
        PixelGBM(4, 3, **{k: v for k, v in GBM.items() if k != "arch"}).set_extra_state(
            b"\x80\x04N."
        )


def test_old_checkpoint_converts_with_trust(tmp_path):
    """A checkpoint as the previous format wrote it (pickled GBM estimator bytes inside)."""
    import pickle

    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(1)
    pixels = rng.uniform(0, 255, (300, 5))
    estimator = HistGradientBoostingClassifier(max_iter=3).fit(pixels, (pixels[:, 3] > 100) * 1)
    model = build_model(GBM, in_channels=4, num_classes=2, mean=[0.0] * 4, std=[1.0] * 4)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    state["net._extra_state"] = pickle.dumps(estimator)
    metadata = {
        "arch": "pixel_gbm",
        "schema": {
            "name": "two",
            "classes": [{"name": "a", "codes": [1]}, {"name": "b", "codes": [2]}],
            "ignore_codes": [],
        },
        "bands": 4,
        "normalize": {"mean": [0.0] * 4, "std": [1.0] * 4},
    }
    old = tmp_path / "old.pt"
    config = yaml.safe_dump({"model": GBM})
    torch.save({"model": state, "metadata": metadata, "config": config}, old)
    with pytest.raises(ModelReferenceError, match="--trust"):
        artifacts.load(str(old))
    out = subprocess.run(
        [str(BIN / "landcover-convert-model"), str(old), "--trust"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    loaded = artifacts.load(str(tmp_path / "old.safe.pt"))
    x = torch.from_numpy(rng.uniform(0, 255, (1, 4, 6, 6)).astype(np.float32))
    probabilities = np.exp(loaded.forward(x.numpy()))[0, 1].flatten()
    features = loaded.torch_module.net.features(x[0].permute(1, 2, 0).reshape(-1, 4).numpy())
    assert np.allclose(probabilities, estimator.predict_proba(features)[:, 1], atol=1e-5)


def test_serving_refuses_oversized_and_non_finite_requests(monkeypatch):
    model = ClassMapModel(torch.nn.Conv2d(4, 2, 1), class_codes=[1, 2], output_margin=0)
    monkeypatch.setenv("LANDCOVER_SERVE_MAX_PIXELS", str(64 * 64))
    assert model.predict(np.zeros((1, 4, 64, 64), np.float32)).shape == (1, 64, 64)
    with pytest.raises(MlflowException, match="budget") as too_big:
        model.predict(np.zeros((2, 4, 64, 64), np.float32))
    assert too_big.value.get_http_status_code() == 400
    bad = np.zeros((1, 4, 8, 8), np.float32)
    bad[0, 2, 3, 3] = np.nan
    with pytest.raises(MlflowException, match="NaN") as not_finite:
        model.predict(bad)
    assert not_finite.value.get_http_status_code() == 400


def test_artifacts_live_beside_a_sqlite_store(tmp_path, monkeypatch):
    from landcover.tracking import runs as tracking

    store = tmp_path / "store"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    store.mkdir()
    with tracking.start_run(uri, "odd/name: x") as run:
        mlflow.log_text("hello", "note.txt")
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifact_dir.is_relative_to(store / "mlartifacts")
    assert (artifact_dir / "note.txt").read_text() == "hello"
    assert not (elsewhere / "mlruns").exists()


# -- unusable data and bad values: one line naming the file or key, before any epoch -----------


def scene_pair(folder: Path, image: np.ndarray, label: np.ndarray, name: str = "s") -> None:
    from tests.conftest import write_raster

    folder.mkdir(parents=True, exist_ok=True)
    write_raster(folder / f"{name}_image.tif", image)
    write_raster(folder / f"{name}_label.tif", label)


def geotiff_overrides(root: Path, tmp: Path, *extra: str) -> list[str]:
    from tests.test_train_e2e import TINY_UNET

    return [
        "data=geotiff",
        f"data.root={root}",
        "data.patch_size=64",
        "data.patches_per_epoch=16",
        "data.batch_size=8",
        "data.val_tile=64",
        "data.num_workers=0",
        *TINY_UNET,
        "trainer.max_epochs=1",
        "trainer.progress=false",
        "trainer.num_panels=0",
        f"trainer.checkpoint_dir={tmp / 'checkpoints'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        *extra,
    ]


def usable_scenes(root: Path, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        image = rng.integers(1, 255, (4, size, size), dtype=np.uint8)
        label = rng.integers(1, 4, (size, size), dtype=np.uint8)
        scene_pair(root / split, image, label)


def train_fails(root: Path, tmp: Path, *extra: str):
    from landcover.errors import LandcoverError
    from landcover.training.train import train
    from tests.conftest import compose_train

    with pytest.raises(LandcoverError) as failure:
        train(compose_train(*geotiff_overrides(root, tmp, *extra)))
    message = str(failure.value)
    assert "\n" not in message  # one line
    assert not (tmp / "checkpoints").exists()  # nothing ran
    return message


def test_labels_that_are_all_ignored_are_refused(tmp_path):
    root = tmp_path / "data"
    usable_scenes(root)
    (root / "train" / "s_label.tif").unlink()
    from tests.conftest import write_raster

    write_raster(root / "train" / "s_label.tif", np.full((96, 96), 15, np.uint8))  # 15: no data
    message = train_fails(root, tmp_path)
    assert "no labelled pixel" in message and "s_label.tif" in message


def test_an_all_nodata_image_is_refused(tmp_path):
    root = tmp_path / "data"
    usable_scenes(root)
    scene_pair(
        root / "train", np.zeros((4, 96, 96), np.uint8), np.ones((96, 96), np.uint8), name="e"
    )
    message = train_fails(root, tmp_path)
    assert "e_image.tif" in message and "nodata" in message


def corrupt_middle_block(path: Path) -> None:
    """Overwrite the compressed bytes of one inner tile with garbage."""
    import rasterio

    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(range(256)) * (size // 256 + 1))


def tiled_image(path: Path, size: int = 128) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(2)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=4,
        dtype="uint8",
        tiled=True,
        blockxsize=32,
        blockysize=32,
        compress="deflate",
        crs="EPSG:26918",
        transform=from_origin(400000, 4300000, 1, 1),
    ) as dst:
        dst.write(rng.integers(0, 255, (4, size, size), dtype=np.uint8))


def test_a_corrupt_block_in_the_middle_is_found_before_training(tmp_path):
    root = tmp_path / "data"
    usable_scenes(root)
    tiled_image(root / "train" / "c_image.tif")
    from tests.conftest import write_raster

    write_raster(root / "train" / "c_label.tif", np.ones((128, 128), np.uint8))
    corrupt_middle_block(root / "train" / "c_image.tif")
    message = train_fails(root, tmp_path)
    assert "c_image.tif" in message and "corrupt" in message


def test_a_corrupt_block_met_mid_epoch_names_file_and_window(tmp_path):
    from landcover.data.reader import SceneReader
    from landcover.data.scenes import Scene
    from landcover.errors import SceneError

    image = tmp_path / "big_image.tif"
    tiled_image(image)
    corrupt_middle_block(image)
    label = tmp_path / "big_label.tif"
    from tests.conftest import write_raster

    write_raster(label, np.ones((128, 128), np.uint8))
    scene = Scene(str(image), str(label), 128, 128, None, (1, 0, 0, 0, -1, 0))
    reader = SceneReader([scene], np.arange(256, dtype=np.uint8), cache_max_pixels=0)
    reader.read_image(0, 0, 0, 32, 32)  # a sound block
    with pytest.raises(SceneError, match=r"big_image.tif: reading window col 32, row 32"):
        reader.read_image(0, 32, 32, 32, 32)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=nan", "optimizer.lr=nan must be a finite"),
        ("data.patch_size=512", "data.patch_size=512"),
        ("trainer.monitor=val/miou", "trainer.monitor='val/miou' is never logged"),
    ],
)
def test_bad_values_fail_before_any_epoch(tmp_path, override, expected):
    root = tmp_path / "data"
    usable_scenes(root)
    assert expected in train_fails(root, tmp_path, override)


# -- signals, staging, full disks -----------------------------------------------------------------


def tiny_model_checkpoint(tmp: Path) -> Path:
    """A model file in the checkpoint format (tiny U-Net, 4 classes), made without training."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_train

    cfg = compose_train(
        "model.encoder_depth=3", "model.decoder_channels=[32,16,8]", "data.root=unused"
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    schema = OmegaConf.to_container(cfg.data.schema, resolve=True)
    normalize = OmegaConf.to_container(cfg.data.normalize, resolve=True)
    torch.manual_seed(0)
    model = build_model(model_cfg, in_channels=4, num_classes=len(schema["classes"]), **normalize)
    metadata = {
        "model": model_cfg,
        "arch": "unet",
        "schema": schema,
        "bands": 4,
        "normalize": normalize,
        "output_margin": 0,
        "size_divisor": 8,
    }
    path = tmp / "model.pt"
    torch.save(
        {"model": model.state_dict(), "metadata": metadata, "config": OmegaConf.to_yaml(cfg)}, path
    )
    return path


def random_raster(path: Path, size: int) -> Path:
    from tests.conftest import write_raster

    rng = np.random.default_rng(5)
    return write_raster(path, rng.integers(0, 255, (4, size, size), dtype=np.uint8))


def start_and_stop(command: list[str], cwd: Path, ready, sig: int) -> subprocess.CompletedProcess:
    """Run `command`, send `sig` once `ready()` is true, return how it ended."""
    import time

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not ready():
        assert process.poll() is None, process.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.1)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_training_killed_with_one_line(tmp_path, tiny_synthetic, sig):
    from mlflow.tracking import MlflowClient

    from tests.test_train_e2e import tiny_overrides

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        str(BIN / "landcover-train"),
        *tiny_overrides(tiny_synthetic, tmp_path, "trainer.max_epochs=200", "trainer.num_panels=0"),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]

    def training() -> bool:  # an epoch has ended: the run is open and mid-training
        return (tmp_path / "checkpoints" / "last.pt").exists()

    out = start_and_stop(command, tmp_path, training, sig)
    assert out.returncode == 128 + sig, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: stopped by {sig.name}")
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("e2e").experiment_id]
    )
    assert run.info.status == "KILLED"
    assert sig.name in run.data.tags["landcover.stopped"]


@pytest.mark.slow
def test_sigterm_on_predict_leaves_no_staging_and_no_output(tmp_path):
    model = tiny_model_checkpoint(tmp_path)
    scene = random_raster(tmp_path / "scene.tif", 4096)
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    command = [
        str(BIN / "landcover-predict"),
        f"model={model}",
        f"input={scene}",
        f"output={out_dir / 'map.tif'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "predict.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]

    def mapping() -> bool:
        return any(out_dir.glob(".landcover-*/*.staging.tif"))

    out = start_and_stop(command, tmp_path, mapping, signal.SIGTERM)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert list(out_dir.iterdir()) == []  # no staging folder, no half map, no area table


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    import socket

    from landcover.atomic import staging_dir

    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".landcover-{host}-{dead.pid}-abc"
    live = tmp_path / f".landcover-{host}-{os.getpid()}-def"
    other_host = tmp_path / ".landcover-elsewhere-1-ghi"
    for folder in (stale, live, other_host):
        (folder / "x.staging.tif").parent.mkdir()
        (folder / "x.staging.tif").write_bytes(b"partial")
    mine = staging_dir(tmp_path)
    assert not stale.exists() and live.exists() and other_host.exists() and mine.exists()


def test_a_full_disk_is_named_and_earlier_files_survive(small_disk, tmp_path):
    from landcover import artifacts
    from landcover.artifacts.checkpoint import save_checkpoint
    from landcover.errors import DiskFullError
    from landcover.predict.predictor import PredictSettings, predict_raster

    earlier = small_disk / "last.pt"
    save_checkpoint({"w": torch.zeros(200_000)}, earlier)  # 0.8 MB
    before = earlier.read_bytes()
    with pytest.raises(DiskFullError, match=f"no space left on the device of {small_disk}"):
        save_checkpoint({"w": torch.zeros(1_000_000)}, earlier)  # 4 MB does not fit
    assert earlier.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.pt"]

    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\1" * (free.f_bavail * free.f_frsize - 150_000))
    model = artifacts.load(str(tiny_model_checkpoint(tmp_path)))
    scene = random_raster(tmp_path / "scene.tif", 1024)
    settings = PredictSettings.defaults(progress=False, confidence=True)
    with pytest.raises(DiskFullError, match="no space left"):
        predict_raster(model, scene, small_disk / "map.tif", settings)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.pt"]
    assert earlier.read_bytes() == before


def test_an_input_truncated_under_prediction_is_one_error(tmp_path):
    from landcover import artifacts
    from landcover.errors import SceneError
    from landcover.predict.predictor import PredictSettings, predict_raster

    scene = tmp_path / "scene.tif"
    tiled_image(scene, size=256)
    data = scene.read_bytes()
    scene.write_bytes(data[: len(data) // 2])  # the header survives, the tiles do not
    model = artifacts.load(str(tiny_model_checkpoint(tmp_path)))
    out = tmp_path / "maps"
    out.mkdir()
    with pytest.raises(SceneError, match=r"scene.tif: .*(truncated|corrupt)") as failure:
        predict_raster(model, scene, out / "map.tif", PredictSettings.defaults(progress=False))
    assert "\n" not in str(failure.value)
    assert list(out.iterdir()) == []


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path):
    name = os.fsdecode(b"input=" + bytes(tmp_path) + b"/\xffscene.tif")
    out = subprocess.run(
        [str(BIN / "landcover-predict"), "model=x.pt", name, "output=o.tif"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "not valid UTF-8" in out.stderr


def test_an_old_logged_model_is_refused_then_converted_with_trust(tmp_path, monkeypatch):
    """A run whose model was logged in MLflow's pickled PyTorch flavour (what older versions
    did): refused, then `landcover-convert-model <run> --trust` logs it safely in its run."""
    from landcover.artifacts.files import rebuild
    from landcover.interop.convert import main as convert
    from landcover.tracking import runs as tracking

    monkeypatch.chdir(tmp_path)
    state = torch.load(tiny_model_checkpoint(tmp_path), weights_only=True)
    model = rebuild(state["metadata"])
    model.load_state_dict(state["model"])
    old_metadata = {k: v for k, v in state["metadata"].items() if k != "model"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.start_run(uri, "old") as run:
        mlflow.log_text(state["config"], "config/resolved.yaml")
        mlflow.pytorch.log_model(
            model, name="model", serialization_format="pickle", metadata=old_metadata
        )
    with pytest.raises(ModelReferenceError, match="--trust"):
        artifacts.load(run.info.run_id, tracking_uri=uri)
    convert([run.info.run_id, "--trust", "--tracking-uri", uri])
    loaded = artifacts.load(run.info.run_id, tracking_uri=uri)
    x = torch.rand(1, 4, 64, 64) * 255
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(loaded.forward(x.numpy()), expected, atol=1e-5)
