"""End to end: compose, train a few steps on tiny generated scenes, check the MLflow record."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from landcover.serving import load_model
from landcover.train import train
from tests.conftest import compose_train

pytestmark = pytest.mark.slow


TINY_UNET = ("model=unet", "model.encoder_depth=3", "model.decoder_channels=[32,16,8]")


def tiny_overrides(root: Path, tmp: Path, *extra: str, model=TINY_UNET) -> list[str]:
    return [
        "data=synthetic",
        f"data.root={root}",
        "data.synthetic.scenes={train: 2, val: 1}",
        "data.synthetic.size=160",
        "data.synthetic.seed=3",
        "data.patch_size=64",
        "data.patches_per_epoch=16",
        "data.batch_size=8",
        "data.val_tile=96",
        *model,
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "trainer.num_panels=2",
        f"trainer.checkpoint_dir={tmp / 'checkpoints'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=e2e",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = compose_train(*tiny_overrides(tiny_synthetic, tmp))
    result = train(cfg)
    return result, tmp


def test_run_records_params_metrics_and_tags(trained):
    result, tmp = trained
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.arch"] == "unet"
    assert params["data.patch_size"] == "64"
    assert params["trainer.max_epochs"] == "2"
    assert int(params["model.parameters"]) > 0
    for name in (
        "train/loss",
        "val/loss",
        "val/overall_accuracy",
        "val/mIoU",
        "val/iou_water",
        "val/f1_low_vegetation",
    ):
        history = client.get_metric_history(result.run_id, name)
        assert [m.step for m in history] == [0, 1], name
        assert all(np.isfinite(m.value) for m in history)
    tags = run.data.tags
    assert len(tags["dataset_fingerprint"]) == 16
    assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__
    assert tags["git.commit"] and tags["git.dirty"] in ("true", "false", "unknown")


def test_run_records_figures_confusion_matrix_and_config(trained):
    result, tmp = trained
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    names = {
        a.path
        for folder in ("confusion_matrix", "panels", "config")
        for a in client.list_artifacts(result.run_id, folder)
    }
    assert {
        "confusion_matrix/confusion_matrix.png",
        "confusion_matrix/confusion_matrix.csv",
        "confusion_matrix/confusion_matrix.json",
        "panels/val_panels.png",
        "config/resolved.yaml",
    } <= names
    local = Path(
        client.download_artifacts(result.run_id, "confusion_matrix/confusion_matrix.json", str(tmp))
    )
    matrix = np.array(json.loads(local.read_text())["matrix"])
    assert matrix.shape == (4, 4)
    assert matrix.sum() == 160 * 160  # every labelled val pixel, once


def test_logged_model_reloads_and_runs_on_unseen_size(trained):
    result, tmp = trained
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    model = load_model(result.model_uri)
    with torch.inference_mode():
        logits = model(torch.rand(1, 4, 320, 320) * 255)
    assert logits.shape == (1, 4, 320, 320)
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.metadata["schema"]["classes"][0]["name"] == "water"
    assert info.metadata["normalize"]["mean"][0] == pytest.approx(100.0)


def test_checkpoints_and_resume_continue_the_same_run(trained, tiny_synthetic):
    result, tmp = trained
    checkpoints = tmp / "checkpoints"
    assert (checkpoints / "best.pt").exists() and (checkpoints / "last.pt").exists()
    # by default no per-epoch copies, and best.pt shares last.pt's file while they coincide
    assert not list(checkpoints.glob("epoch_*.pt"))
    best, last = (checkpoints / "best.pt").stat(), (checkpoints / "last.pt").stat()
    assert result.best_epoch != 1 or best.st_ino == last.st_ino
    cfg = compose_train(
        *tiny_overrides(
            tiny_synthetic,
            tmp,
            "trainer.max_epochs=3",
            f"trainer.resume_from={checkpoints / 'last.pt'}",
        )
    )
    resumed = train(cfg)
    assert resumed.run_id == result.run_id
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(result.run_id, "val/mIoU")]
    assert steps == [0, 1, 2]


def test_cpu_training_is_deterministic(tiny_synthetic, tmp_path):
    losses = []
    for attempt in ("a", "b"):
        cfg = compose_train(
            *tiny_overrides(
                tiny_synthetic,
                tmp_path / attempt,
                "trainer.max_epochs=1",
                "tracking.log_model=false",
                "trainer.num_panels=0",
            )
        )
        losses.append(train(cfg).last_metrics)
    assert losses[0]["train/loss"] == losses[1]["train/loss"]
    assert losses[0]["val/mIoU"] == losses[1]["val/mIoU"]


def test_crashing_run_ends_failed(tiny_synthetic, tmp_path):
    def explode(epoch, metrics):
        raise RuntimeError("boom")

    cfg = compose_train(*tiny_overrides(tiny_synthetic, tmp_path, "trainer.max_epochs=1"))
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, epoch_callback=explode)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_seed_network_trains_on_centre_targets(tiny_synthetic, tmp_path):
    cfg = compose_train(
        *tiny_overrides(
            tiny_synthetic,
            tmp_path,
            "data.patch_size=160",
            "trainer.max_epochs=1",
            "tracking.log_model=false",
            "data/schema=tutorial_5label",
            model=("model=seed",),
        )
    )
    result = train(cfg)
    assert np.isfinite(result.last_metrics["val/loss"])
    assert "val/iou_no_data" not in result.last_metrics  # ignored class is not scored


def test_early_stopping_stops_the_run(tiny_synthetic, tmp_path):
    """A min_delta no epoch can beat: the run stops `patience` epochs after the first."""
    cfg = compose_train(
        *tiny_overrides(
            tiny_synthetic,
            tmp_path,
            "trainer.max_epochs=6",
            "trainer.early_stopping.patience=1",
            "trainer.early_stopping.min_delta=1e9",
            "tracking.log_model=false",
            "trainer.num_panels=0",
        )
    )
    result = train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(result.run_id, "val/mIoU")] == [0, 1]
    assert result.best_epoch == 0


def test_pixel_gbm_baseline_is_a_run_like_any_other(tiny_synthetic, tmp_path):
    from landcover.interop.export import run_export
    from landcover.predict.reference import load_model_reference
    from tests.conftest import compose_config

    cfg = compose_train(
        *tiny_overrides(
            tiny_synthetic,
            tmp_path,
            "model.max_iter=20",
            "model.samples=20000",
            "trainer.max_epochs=3",
            model=("model=pixel_gbm",),
        )
    )
    result = train(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/pixels"] == 20000  # fitted once, on a sample of pixels
    assert run.data.metrics["val/overall_accuracy"] > 0.7  # spectra separate synthetic classes
    assert result.best_epoch == 0  # one epoch whatever trainer.max_epochs says
    model = load_model_reference(result.run_id, tracking_uri=uri, device="cpu")
    pixels = torch.rand(1, 4, 40, 40) * 255
    again = load_model_reference(str(result.checkpoint_dir / "best.pt"), device="cpu")
    assert torch.equal(model.forward(pixels), again.forward(pixels))  # estimator travels
    with pytest.raises(Exception, match="scikit-learn model"):
        run_export(
            compose_config(
                "export",
                f"model={result.run_id}",
                f"output={tmp_path / 'x.onnx'}",
                f"tracking.uri={uri}",
            )
        )
