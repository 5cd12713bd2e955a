"""Promotion to the MLflow registry: choosing the best run, the champion guard, `previous`,
idempotency, lineage, and `models:/` references in the commands that take a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import rasterio
from mlflow.tracking import MlflowClient

from landcover import artifacts
from landcover.data.synthetic import SyntheticSpec, generate
from landcover.interop.export import run_export
from landcover.registry.promote import run_promotion
from landcover.registry.promotion import (
    PromotionError,
    candidate_of_run,
    find_best_run,
    metric_of,
    promote,
)
from landcover.training.train import train
from tests.conftest import compose_config, compose_train
from tests.test_mapping_e2e import evaluate, predict
from tests.test_train_e2e import tiny_overrides

pytestmark = pytest.mark.slow
METRIC = "val/mIoU"


@pytest.fixture(scope="module")
def store(tiny_synthetic, tmp_path_factory):
    """Three runs on the same data (different seeds and lengths), one on other data, one
    FAILED, in experiment `reg`; a fresh registry per test comes from `client` below."""
    tmp = tmp_path_factory.mktemp("registry")
    other_data = tmp / "other_data"
    generate(other_data, SyntheticSpec(scenes={"train": 2, "val": 1}, size=160, seed=11))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def run(root, *extra, epoch_callback=None):
        return train(
            compose_train(
                *tiny_overrides(
                    root, tmp, "trainer.num_panels=0", "tracking.experiment=reg", *extra
                )
            ),
            epoch_callback=epoch_callback,
        )

    def explode(epoch, metrics):
        raise RuntimeError("boom")

    same = [
        run(tiny_synthetic, "trainer.max_epochs=1", "seed=1"),
        run(tiny_synthetic, "trainer.max_epochs=2", "seed=2"),
        run(tiny_synthetic, "trainer.max_epochs=3", "seed=3"),
    ]
    other = run(other_data, "data.synthetic.seed=11", "trainer.max_epochs=1")
    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_synthetic, "trainer.max_epochs=1", epoch_callback=explode)
    client = MlflowClient(uri)
    values = {r.run_id: metric_of(client, client.get_run(r.run_id), METRIC) for r in same}
    ranked = sorted(values, key=values.get)  # worst first
    assert len(set(values.values())) == 3, f"the three runs need distinct scores: {values}"
    return uri, ranked, values, other.run_id, tmp


@pytest.fixture
def client(store):
    """The same runs, an empty registry: every test promotes from scratch."""
    uri = store[0]
    client = MlflowClient(uri)
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    mlflow.set_tracking_uri(uri)
    return client


def promote_run(client, run_id, **kwargs):
    candidate = find_best_run(
        client, experiment="reg", metric=METRIC, where=f"attributes.run_id = '{run_id}'"
    )
    return promote(client, candidate, name="landcover", experiment="reg", **kwargs)


def test_best_run_wins_and_ties_go_to_the_earlier_run(store, client):
    uri, ranked, values, other, _ = store
    best = find_best_run(client, experiment="reg", metric=METRIC, tags={"data": "synthetic"})
    overall = max([*values.values(), metric_of(client, client.get_run(other), METRIC)])
    assert best.value == overall
    fingerprint = client.get_run(ranked[0]).data.tags["dataset_fingerprint"]
    same_data = find_best_run(
        client, experiment="reg", metric=METRIC, where=f"tags.dataset_fingerprint = '{fingerprint}'"
    )
    assert same_data.run_id == ranked[-1] and same_data.value == values[ranked[-1]]
    worst = find_best_run(client, experiment="reg", metric="val/loss")  # auto: minimised
    losses = {
        r.info.run_id: metric_of(client, r, "val/loss")
        for r in client.search_runs([client.get_experiment_by_name("reg").experiment_id])
        if r.info.status == "FINISHED"
    }
    assert worst.value == min(losses.values())

    # a tie on a metric of their own: the earlier of the two runs is chosen
    first, second = ranked[0], ranked[1]
    for run_id in (second, first):
        client.log_metric(run_id, "tie/score", 0.5)
    tied = find_best_run(client, experiment="reg", metric="tie/score")
    starts = {r: client.get_run(r).info.start_time for r in (first, second)}
    assert tied.run_id == min(starts, key=starts.get)


def test_choice_failures_say_what_is_missing(store, client):
    with pytest.raises(PromotionError, match="experiment 'nope' does not exist"):
        find_best_run(client, experiment="nope", metric=METRIC)
    with pytest.raises(PromotionError, match="has metric 'val/nothing'.*metrics present"):
        find_best_run(client, experiment="reg", metric="val/nothing")
    with pytest.raises(PromotionError, match="no FINISHED run"):
        find_best_run(client, experiment="reg", metric=METRIC, study="no-such-sweep")
    failed = client.search_runs(
        [client.get_experiment_by_name("reg").experiment_id], "attributes.status = 'FAILED'"
    )
    assert failed, "the fixture's crashing run should have ended FAILED"
    with pytest.raises(PromotionError, match="no FINISHED run"):
        find_best_run(
            client,
            experiment="reg",
            metric=METRIC,
            where=f"attributes.run_id = '{failed[0].info.run_id}'",
        )
    with pytest.raises(PromotionError, match="over at least 99 epochs"):
        find_best_run(client, experiment="reg", metric=METRIC, min_epochs=99)
    assert find_best_run(client, experiment="reg", metric=METRIC, min_epochs=3).run_id == (
        client.search_runs(
            [client.get_experiment_by_name("reg").experiment_id],
            "params.`trainer.max_epochs` = '3'",
        )[0].info.run_id
    )


def test_guard_previous_alias_lineage_and_idempotency(store, client):
    uri, ranked, values, _, _ = store
    worst, middle, best = ranked

    first = promote_run(client, worst)
    assert first.created and first.champion and first.aliases == {"champion": "1"}

    again = promote_run(client, worst)  # same run twice: no second version
    assert not again.created and again.version == "1"
    assert len(client.search_model_versions("name = 'landcover'")) == 1

    better = promote_run(client, best)
    assert better.champion and better.version == "2"
    assert better.aliases == {"champion": "2", "previous": "1"}

    worse = promote_run(client, middle)  # registered, but does not take the title
    assert worse.created and not worse.champion and "does not beat" in worse.reason
    assert str(client.get_model_version_by_alias("landcover", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("landcover", "previous").version) == "1"

    version = client.get_model_version("landcover", "2")
    run = client.get_run(best)
    assert version.run_id == best
    assert version.tags["landcover.source_run_id"] == best
    from landcover.registry.promotion import logged_model_id

    model_id = logged_model_id(run)
    assert version.tags["landcover.model_id"] == model_id  # the SQL store keeps no model_id
    assert version.source == f"models:/{model_id}"
    assert version.tags["landcover.experiment"] == "reg"
    assert version.tags["landcover.metric"] == METRIC
    assert float(version.tags["landcover.metric_value"]) == values[best]
    assert version.tags["dataset_fingerprint"] == run.data.tags["dataset_fingerprint"]
    assert version.tags["git.commit"] == run.data.tags["git.commit"]
    assert best in version.description and "fingerprint" in version.description
    # run -> logged model -> registered version, both ways (what MLflow 3's UI shows)
    from landcover.registry.promotion import logged_model_id

    model_id = logged_model_id(run)
    # (MLflow's SQL registry keeps the logged model as the version's source, not as model_id)
    assert model_id and version.source == f"models:/{model_id}"
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked] == [("landcover", "2")]
    # what the registry serves is the run's model
    loaded = artifacts.load("models:/landcover@champion", device="cpu").torch_module
    original = artifacts.load(f"runs:/{best}/model", device="cpu").torch_module
    x = np.random.default_rng(0).uniform(0, 255, (1, 4, 64, 64)).astype(np.float32)
    import torch

    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(x)), original(torch.from_numpy(x)))


def test_run_on_other_data_is_refused_unless_forced(store, client):
    uri, ranked, _, other, _ = store
    promote_run(client, ranked[0])
    candidate = find_best_run(
        client, experiment="reg", metric=METRIC, where=f"attributes.run_id = '{other}'"
    )
    with pytest.raises(PromotionError, match="other data.*fingerprint.*force=true"):
        promote(client, candidate, name="landcover", experiment="reg")
    assert len(client.search_model_versions("name = 'landcover'")) == 1  # nothing registered
    forced = promote(client, candidate, name="landcover", experiment="reg", force=True)
    assert forced.champion and forced.aliases == {"champion": "2", "previous": "1"}


def test_cli_config_promotes_and_commands_take_models_uris(store, client, tiny_synthetic):
    uri, ranked, values, _, tmp = store
    fingerprint = client.get_run(ranked[0]).data.tags["dataset_fingerprint"]
    result = run_promotion(
        compose_config(
            "promote",
            "experiment=reg",
            f"tracking.uri={uri}",
            f"+filters.tags.dataset_fingerprint={fingerprint}",
        )
    )
    assert result.champion and result.candidate.value == max(values.values())
    # a second promotion, compared against an explicit version (`against=models:/name/1`)
    second = run_promotion(
        compose_config(
            "promote", f"run={ranked[0]}", f"tracking.uri={uri}", "against=models:/landcover/1"
        )
    )
    assert not second.champion and second.version == "2"

    scene = tiny_synthetic / "val" / "synth_000_naip.tif"
    by_alias = predict("models:/landcover@champion", scene, tmp / "alias.tif", uri)
    by_version = predict("models:/landcover/1", scene, tmp / "version.tif", uri)
    by_run = predict(result.candidate.run_id, scene, tmp / "run.tif", uri)
    maps = []
    for outcome in (*by_alias, *by_version, *by_run):
        with rasterio.open(outcome) as src:
            maps.append(src.read(1))
    assert np.array_equal(maps[0], maps[2]) and np.array_equal(maps[1], maps[2])
    metrics = evaluate("models:/landcover@champion", tiny_synthetic, uri, tmp / "evaluation")
    assert 0 <= metrics["eval/overall_accuracy"] <= 1
    evaluation = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert evaluation[0].data.tags["landcover.source_run_id"] == result.candidate.run_id
    # the evaluation lists the scenes it read, and its scores are the champion model's too
    (read,) = evaluation[0].inputs.dataset_inputs
    assert read.dataset.name.endswith("/val") and len(read.dataset.digest) == 16
    champion = client.get_logged_model(result.candidate.model_id)
    scored = {m.key: m for m in champion.metrics if m.run_id == evaluation[0].info.run_id}
    assert scored["eval/overall_accuracy"].value == pytest.approx(metrics["eval/overall_accuracy"])
    assert scored["eval/overall_accuracy"].dataset_digest == read.dataset.digest
    path, difference = run_export(
        compose_config(
            "export",
            "model=models:/landcover@champion",
            f"output={tmp / 'champion.onnx'}",
            f"tracking.uri={uri}",
        )
    )
    assert path.is_file() and difference < 1e-3


def test_promote_cli_reports_a_missing_experiment_in_one_line(tmp_path):
    script = f"{sys.prefix}/bin/landcover-promote"
    out = subprocess.run(
        [script, "experiment=absent", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "experiment 'absent' does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def _promote_in_child(uri: str, run_id: str, name: str, barrier, results) -> None:
    client = MlflowClient(uri)
    barrier.wait()
    result = promote(client, candidate_of_run(client, run_id, METRIC), name=name, experiment="reg")
    results.put((run_id, result.version, result.champion))


def test_concurrent_promotions_stay_consistent(store, client):
    """10 rounds of two promotions at the same moment (the worse and the better run, then
    one run twice): never a second version for one run, the champion always the better."""
    import multiprocessing

    uri, ranked, values, _, _ = store
    worse, better = ranked[0], ranked[-1]
    context = multiprocessing.get_context("fork")
    for round_ in range(10):
        name = f"race{round_}"
        pair = (worse, better) if round_ % 3 else (better, better)
        barrier, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(target=_promote_in_child, args=(uri, run, name, barrier, results))
            for run in pair
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
            assert worker.exitcode == 0, f"round {round_}: a promotion failed"
        versions = client.search_model_versions(f"name = '{name}'")
        per_run = [v.run_id for v in versions]
        assert sorted(per_run) == sorted(set(per_run)), f"round {round_}: {per_run}"
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.run_id == better, f"round {round_}: champion is {champion.run_id}"


def test_champion_history_records_every_decision_and_restore_puts_a_version_back(store, client):
    """Three promotions (one refused, one forced) and a restore through `landcover-champion`:
    four entries in order with who, when, versions and both values; the restored version is
    the champion every models:/...@champion reference loads, and it carries its GIS package."""
    from landcover.interop.stac_model_item import validate_item
    from landcover.registry.history import current_user, entries

    uri, ranked, values, other, tmp = store
    name = "history_model"  # its own registered model: the history outlives `client`'s cleanup
    middle, worst = ranked[1], ranked[0]

    def promote_one(run_id, **kwargs):
        candidate = candidate_of_run(client, run_id, METRIC)
        return promote(client, candidate, name=name, experiment="reg", **kwargs)

    first = promote_one(middle, reason="first good model")
    refused = promote_one(worst)
    forced = promote_one(other, force=True, reason="new imagery")
    assert (first.champion, refused.champion, forced.champion) == (True, False, True)
    script = f"{sys.prefix}/bin/landcover-champion"
    done = subprocess.run(
        [script, "action=restore", "to=previous", f"registry.name={name}", f"tracking.uri={uri}",
         "reason=forced model misses roads", "force=true"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    found = entries(client, name)
    assert [e.action for e in found] == ["promoted", "refused", "forced", "restored"]
    assert [(e.from_version, e.to_version) for e in found] == [
        (None, "1"), ("1", "2"), ("1", "3"), ("3", "1"),
    ]  # fmt: skip
    assert [e.moved for e in found] == [True, False, True, True]
    other_value = metric_of(client, client.get_run(other), METRIC)
    assert found[1].from_value == values[middle] and found[1].to_value == values[worst]
    assert found[3].from_value == other_value and found[3].to_value == values[middle]
    assert found[3].reason == "forced model misses roads" and found[2].reason == "new imagery"
    assert all(e.who == current_user() for e in found)
    assert [e.when for e in found] == sorted(e.when for e in found)

    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"champion": "1", "previous": "3"}
    loaded = artifacts.load(f"models:/{name}@champion", tracking_uri=uri, device="cpu")
    assert loaded.source_run_id == middle
    listed = subprocess.run(
        [script, f"registry.name={name}", f"tracking.uri={uri}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    print(listed.stdout)
    lines = [line for line in listed.stdout.splitlines() if line.strip()]
    assert len(lines) == 4 and "restored" in lines[3] and "v3 -> v1" in lines[3]

    # the restored champion carries its package: QGIS, ArcGIS Pro and an MLM Item
    version = client.get_model_version(name, "1")
    assert version.tags["landcover.package"] == f"runs:/{middle}/gis"
    kept = {f.path for f in client.list_artifacts(middle, "gis")}
    assert {"gis/qgis", "gis/arcgis", f"gis/{name}.stac.json"} <= kept
    item = json.loads(
        (Path(client.download_artifacts(middle, f"gis/{name}.stac.json", str(tmp)))).read_text()
    )
    validate_item(item)
    assert item["properties"]["landcover:model_version"] == "1"
    # a mapping job with the champion links its catalog to that Item
    from landcover.mapping.job import model_link

    link = model_link(f"models:/{name}@champion", uri)
    assert link.item_href == f"runs:/{middle}/gis/{name}.stac.json"


def test_a_restore_has_a_promotions_guards(store, client):
    from landcover.registry.restore import restore

    uri, ranked, _, other, _ = store
    name = "restore_guards"
    promote(client, candidate_of_run(client, ranked[0], METRIC), name=name, experiment="reg")
    with pytest.raises(PromotionError, match="names no registered version"):
        restore(client, name=name, to="previous", metric=METRIC)
    with pytest.raises(PromotionError, match="already champion"):
        restore(client, name=name, to="1", metric=METRIC)
    promote(
        client, candidate_of_run(client, other, METRIC), name=name, experiment="reg", force=True
    )
    with pytest.raises(PromotionError, match="other data.*force=true"):
        restore(client, name=name, to="previous", metric=METRIC)
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"champion": "2", "previous": "1"}  # a refused restore moves nothing
