"""End to end: compose, train a few steps on tiny generated scenes, check the MLflow record."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from landcover import artifacts
from landcover.data.scenes import dataset_fingerprint
from landcover.training.train import train
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
        "tracking.system_metrics_interval=0.5",
        *extra,
    ]


def train_with_nlcd_prior(root: Path, tmp: Path):
    """One quick epoch on the tiny scenes with `prior=nlcd_legend` recorded in the model;
    returns the result and its tracking URI."""
    overrides = tiny_overrides(root, tmp, "trainer.max_epochs=1", "trainer.num_panels=0")
    return train(compose_train(*overrides, "prior=nlcd_legend")), f"sqlite:///{tmp / 'mlflow.db'}"


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


def test_run_lists_its_datasets_system_metrics_description_and_pictures(trained):

    result, tmp = trained
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "val"}
    profile = json.loads(inputs["val"].profile)
    assert profile["scenes"] == 1 and profile["pixels"] == 160 * 160
    assert sum(profile["class_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert inputs["train"].name.endswith("/train") and inputs["val"].name.endswith("/val")
    assert inputs["train"].digest != inputs["val"].digest
    # each digest is the fingerprint of its split's files (config/scenes.csv: train, then val)
    listed = Path(client.download_artifacts(result.run_id, "config/scenes.csv", str(tmp)))
    pairs = [line.split(",") for line in listed.read_text().splitlines()]
    scenes = [SimpleNamespace(image_path=image, label_path=label) for image, label in pairs]
    assert inputs["val"].digest == dataset_fingerprint(scenes[-1:])
    assert inputs["train"].digest == dataset_fingerprint(scenes[:-1])
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics)
    assert any(k.startswith("system/system_memory") for k in run.data.metrics)
    note = run.data.tags["mlflow.note.content"]
    assert "landcover-train" in note and "best epoch" in note and "val/mIoU" in note
    assert "0.98238840" not in note  # rounded, not every digit
    figures = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    assert figures == {"figures/learning_curves.png", "figures/per_class_scores.png"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]


def test_logged_model_holds_the_best_epochs_metrics(trained):
    result, tmp = trained
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    model_id = result.model_uri.removeprefix("models:/")
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics}
    best = result.summary
    for key in ("val/mIoU", "val/overall_accuracy", "val/loss", "train/loss"):
        assert linked[key].value == pytest.approx(best[key]), key
        assert linked[key].step == result.best_epoch and linked[key].run_id == result.run_id
    # each linked metric names the data it was computed on: the model page's "Datasets used"
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    for key, split in (("val/mIoU", "val"), ("train/loss", "train")):
        (name,) = [n for n in inputs if n.endswith(f"/{split}")]
        assert (linked[key].dataset_name, linked[key].dataset_digest) == (name, inputs[name]), key
    (output,) = run.outputs.model_outputs
    assert output.model_id == model_id and output.step == result.best_epoch
    described = client.get_logged_model(model_id).tags["mlflow.note.content"]
    assert described == run.data.tags["mlflow.note.content"]
    assert [p.step for p in client.get_metric_history(result.run_id, "val/mIoU")] == [0, 1]


def test_logged_model_reloads_and_runs_on_unseen_size(trained):
    result, tmp = trained
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    model = artifacts.load(result.model_uri, device="cpu").torch_module
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
    model = artifacts.load(result.run_id, tracking_uri=uri, device="cpu")
    pixels = torch.rand(1, 4, 40, 40) * 255
    again = artifacts.load(str(result.checkpoint_dir / "best.pt"), device="cpu")
    assert np.array_equal(model.forward(pixels.numpy()), again.forward(pixels.numpy()))
    with pytest.raises(Exception, match="scikit-learn model"):
        run_export(
            compose_config(
                "export",
                f"model={result.run_id}",
                f"output={tmp_path / 'x.onnx'}",
                f"tracking.uri={uri}",
            )
        )


def test_training_starts_from_another_model_with_its_encoder_frozen(
    trained, tiny_synthetic, tmp_path
):
    from landcover.artifacts.checkpoint import read_checkpoint

    result, tmp = trained
    source = tmp / "checkpoints" / "best.pt"
    cfg = compose_train(
        *tiny_overrides(tiny_synthetic, tmp_path),
        "trainer.max_epochs=1",
        f"init.model={source}",
        "init.freeze=[encoder]",
    )
    started = train(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(started.run_id)
    assert run.data.tags["landcover.init_from"] == str(source)
    assert run.data.tags["landcover.init_from_run"] == result.run_id
    report = json.loads(
        Path(
            client.download_artifacts(started.run_id, "init/transfer.json", str(tmp_path))
        ).read_text()
    )
    assert "net.encoder.conv1.weight" in report["loaded"] and not report["fresh"]
    before = read_checkpoint(source)["model"]
    after = read_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    encoder = [k for k in after if k.startswith("net.encoder.") and k.endswith("weight")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)  # held back
    decoder = [k for k in after if k.startswith("net.decoder.") and k.endswith("weight")]
    assert any(not torch.equal(after[k], before[k]) for k in decoder)  # trained


def test_keep_start_keeps_the_starting_weights_when_fine_tuning_only_hurts(
    trained, tiny_synthetic, tmp_path
):
    from landcover.artifacts.checkpoint import read_checkpoint

    result, tmp = trained
    source = tmp / "checkpoints" / "best.pt"
    cfg = compose_train(
        *tiny_overrides(tiny_synthetic, tmp_path),
        "trainer.max_epochs=1",
        "trainer.keep_start=true",
        f"init.model={source}",
        "optimizer.lr=100.0",  # one epoch at this rate wrecks the network
    )
    started = train(cfg)
    assert started.best_epoch == -1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(started.run_id)
    assert run.data.metrics["start/val/mIoU"] > run.data.metrics["val/mIoU"]
    assert run.data.metrics["best/epoch"] == -1
    before = read_checkpoint(source)["model"]
    kept = read_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    last = read_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    weights = [k for k in kept if k.endswith("weight")]
    assert all(torch.equal(kept[k], before[k]) for k in weights)
    assert any(not torch.equal(last[k], before[k]) for k in weights)  # the epoch did run

    pixels = torch.rand(1, 4, 64, 64) * 255
    start = artifacts.load(str(source), device="cpu")
    logged = artifacts.load(
        started.model_uri, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", device="cpu"
    )
    np.testing.assert_allclose(
        logged.forward(pixels.numpy()), start.forward(pixels.numpy()), atol=1e-5
    )


def test_a_run_killed_after_scoring_its_start_resumes_without_scoring_it_again(
    trained, tiny_synthetic, tmp_path
):
    """The start is checkpointed as epoch -1: resuming from there runs epoch 0 in the same
    MLflow run and keeps the start's score as the one to beat, scored once."""
    result, tmp = trained
    source = tmp / "checkpoints" / "best.pt"
    common = (
        *tiny_overrides(tiny_synthetic, tmp_path),
        "trainer.max_epochs=1",
        "trainer.keep_start=true",
        "trainer.keep_epoch_checkpoints=3",
        f"init.model={source}",
    )
    first = train(compose_train(*common))
    at_start = tmp_path / "checkpoints" / "epoch_-01.pt"
    assert at_start.is_file()
    resumed = train(compose_train(*common, f"trainer.resume_from={at_start}"))
    assert resumed.run_id == first.run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.get_metric_history(first.run_id, "start/val/mIoU")) == 1
    assert {m.step for m in client.get_metric_history(first.run_id, "val/mIoU")} == {0}
