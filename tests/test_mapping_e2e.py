"""Predict, evaluate and export with a model trained by the spine, by every kind of reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from mlflow.tracking import MlflowClient

from landcover.evaluate import run_evaluation
from landcover.interop.export import run_export
from landcover.mapping.job import run_predictions
from landcover.training.train import train
from tests.conftest import compose_config, compose_train
from tests.test_train_e2e import tiny_overrides, train_with_nlcd_prior

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_run(tiny_synthetic, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mapping")
    result = train(
        compose_train(
            *tiny_overrides(tiny_synthetic, tmp, "trainer.max_epochs=1", "trainer.num_panels=0")
        )
    )
    return result, tmp, f"sqlite:///{tmp / 'mlflow.db'}"


def predict(reference, scene, output, uri, *extra):
    cfg = compose_config(
        "predict",
        f"model={reference}",
        f"input={scene}",
        f"output={output}",
        f"tracking.uri={uri}",
        "predict.tile_size=96",
        "predict.overlap=32",
        "predict.progress=false",
        "quicklook_size=64",
        *extra,
    )
    summary = run_predictions(cfg)
    return [Path(row.output) for row in summary.mapped]


def evaluate(reference, root, uri, out, *extra):
    """`landcover-evaluate` on the tiny generated scenes."""
    cfg = compose_config(
        "evaluate",
        f"model={reference}",
        "data=synthetic",
        f"data.root={root}",
        "data.synthetic.scenes={train: 2, val: 1}",
        "data.synthetic.size=160",
        "data.synthetic.seed=3",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        "predict.tile_size=96",
        "predict.overlap=32",
        "predict.progress=false",
        *extra,
    )
    return run_evaluation(cfg)


def test_predict_by_run_id_records_a_linked_run(model_run, tiny_synthetic):
    result, tmp, uri = model_run
    scene = tiny_synthetic / "val" / "synth_000_naip.tif"
    (classes,) = predict(result.run_id, scene, f"{tmp}/maps/", uri, "predict.confidence=true")
    assert classes == tmp / "maps" / "synth_000_naip_landcover.tif"
    assert classes.with_suffix(".areas.csv").read_text().startswith("class,code,pixels")
    with rasterio.open(classes) as out, rasterio.open(scene) as src:
        assert out.crs == src.crs and out.transform == src.transform
        assert set(np.unique(out.read(1))) <= {1, 2, 3, 4}
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("predictions").experiment_id])
    assert runs[0].data.tags["landcover.source_run_id"] == result.run_id
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "region")}
    assert {"region/mosaic_overview.tif", "region/mosaic.png", "region/manifest.csv"} <= artifacts


def test_checkpoint_and_run_give_the_same_map(model_run, tiny_synthetic):
    result, tmp, uri = model_run
    scene = tiny_synthetic / "val" / "synth_000_naip.tif"
    (by_run,) = predict(result.run_id, scene, tmp / "a.tif", uri, "log_to_mlflow=false")
    (by_ckpt,) = predict(
        result.checkpoint_dir / "best.pt", scene, tmp / "b.tif", uri, "log_to_mlflow=false"
    )
    with (
        rasterio.open(by_run) as a,
        rasterio.open(by_ckpt) as b,
    ):
        np.testing.assert_array_equal(a.read(), b.read())


def test_export_onnx_logs_to_training_run_and_predicts_alike(model_run, tiny_synthetic):
    result, tmp, uri = model_run
    cfg = compose_config(
        "export", f"model={result.run_id}", f"output={tmp / 'model.onnx'}", f"tracking.uri={uri}"
    )
    path, difference = run_export(cfg)
    assert difference < 1e-3
    client = MlflowClient(uri)
    assert "onnx/model.onnx" in {a.path for a in client.list_artifacts(result.run_id, "onnx")}
    assert client.get_run(result.run_id).data.metrics["onnx/max_abs_diff"] == pytest.approx(
        difference
    )
    scene = tiny_synthetic / "val" / "synth_000_naip.tif"
    (by_onnx,) = predict(path, scene, tmp / "onnx.tif", uri, "log_to_mlflow=false")
    (by_torch,) = predict(result.run_id, scene, tmp / "torch.tif", uri, "log_to_mlflow=false")
    with (
        rasterio.open(by_onnx) as a,
        rasterio.open(by_torch) as b,
    ):
        assert (a.read() == b.read()).mean() > 0.999


def test_evaluate_writes_disagreement_and_links_the_training_run(model_run, tiny_synthetic):
    result, tmp, uri = model_run
    out = tmp / "evaluation"
    metrics = evaluate(result.run_id, tiny_synthetic, uri, out, "evaluate.confidence_threshold=0.5")
    assert 0 <= metrics["eval/overall_accuracy"] <= 1
    assert (out / "synth_000_naip_disagreement.tif").exists()
    assert (out / "per_scene_metrics.csv").read_text().startswith("scene,labelled_pixels")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.data.tags["landcover.source_run_id"] == result.run_id
    artifacts = {
        a.path
        for folder in ("confusion_matrix", "panels", "disagreement")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "confusion_matrix/confusion_matrix.png",
        "panels/scene_panels.png",
        "disagreement/synth_000_naip_disagreement.tif",
    } <= artifacts


def test_comparison_table_reads_mlflow_alone(model_run, tmp_path):
    from analysis.compare_runs import main as compare

    result, _, uri = model_run
    compare(["--experiment", "e2e", "--tracking-uri", uri, "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp.md").read_text()
    assert result.run_id in table and "best val/mIoU" in table
    assert (tmp_path / "cmp.csv").read_text().count("\n") >= 2
    assert (tmp_path / "cmp_epochs.png").stat().st_size > 0
    assert (tmp_path / "cmp_architecture.png").stat().st_size > 0


def test_a_model_with_a_prior_layer_reads_it_in_evaluate_and_predict(tiny_synthetic, tmp_path):
    """NLCD "high intensity" everywhere: the legend makes barren + impervious win wherever the
    network hesitates, in landcover-evaluate (layer found by data.prior_suffix) and in
    landcover-predict (predict.prior_layer template) alike, and neither maps without it."""
    result, uri = train_with_nlcd_prior(tiny_synthetic, tmp_path)
    scene = tiny_synthetic / "val" / "synth_000_naip.tif"
    with rasterio.open(scene) as src:
        profile = {**src.profile, "count": 1}
    with rasterio.open(tiny_synthetic / "val" / "synth_000_nlcd.tif", "w", **profile) as dst:
        dst.write(np.full((1, profile["height"], profile["width"]), 24, np.uint8))
    with pytest.raises(Exception, match="predict.prior_layer"):
        evaluate(result.run_id, tiny_synthetic, uri, tmp_path / "none")
    plain = evaluate(
        result.run_id, tiny_synthetic, uri, tmp_path / "plain", "predict.use_prior=false"
    )
    fused = evaluate(
        result.run_id, tiny_synthetic, uri, tmp_path / "fused", "data.prior_suffix=_nlcd.tif"
    )
    assert fused["eval/overall_accuracy"] != plain["eval/overall_accuracy"]
    (classes,) = predict(
        result.run_id,
        scene,
        f"{tmp_path}/maps/",
        uri,
        "predict.prior_layer='{dir}/synth_000_nlcd.tif'",
    )
    (unfused,) = predict(result.run_id, scene, f"{tmp_path}/plain/", uri, "predict.use_prior=false")
    with rasterio.open(classes) as a, rasterio.open(unfused) as b:
        barren_code = 4
        assert (a.read(1) == barren_code).mean() > (b.read(1) == barren_code).mean() + 0.05
