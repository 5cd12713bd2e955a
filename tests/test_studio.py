"""landcover-studio without a browser: the edit log, the head a retrain adapts, the records a
retrain leaves, corrections as training data, and who may connect."""

from __future__ import annotations

import base64
import http.server
import multiprocessing
import os
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
import rasterio
import shapely
import torch
from mlflow.tracking import MlflowClient
from rasterio.features import shapes
from shapely.geometry import shape

from landcover import artifacts
from landcover.artifacts.reference import files_digest
from landcover.data.scenes import find_pairs, load_scenes
from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.data.synthetic import SyntheticSpec, generate
from landcover.errors import LandcoverError
from landcover.models import build_model
from landcover.registry.promotion import PromotionError, candidate_of_run, promote
from landcover.studio.access import AccessError, TeamCredentials, check_bind
from landcover.studio.adapt import fit_head
from landcover.studio.app import hold_session
from landcover.studio.edits import EditError, EditLog
from landcover.studio.head import MIN_CONTEXT, HeadError, find_head_conv, scene_features
from landcover.studio.retrain import close_orphaned_runs, retrain
from landcover.studio.session import Session, StudioError
from landcover.studio.strokes import Area, stroke_area
from tests.conftest import compose_config
from tests.test_faults import tiny_model_checkpoint

EXPERIMENT = "studio-tests"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A generated scene, its labels and an (untrained) tiny U-Net checkpoint."""
    root = tmp_path_factory.mktemp("studio")
    generate(root, SyntheticSpec(scenes={"train": 0, "val": 1}, size=96, seed=5))
    image = next((root / "val").glob("*_naip.tif"))
    labels = image.with_name(image.name.replace("_naip", "_lc"))
    return image, labels, tiny_model_checkpoint(root)


@pytest.fixture
def session(scene, tmp_path) -> Session:
    image, labels, model = scene
    return Session.open(image, str(model), tmp_path / "session", tracking(tmp_path), labels=labels)


def tracking(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def drawn(log: EditLog, kind: str, points: list, radius: float) -> Area:
    """The pixels a stroke drawn on the page covers on the log's image."""
    return stroke_area(kind, points, radius, log.grid.width, log.grid.height)


def schema_of(model: Path) -> ClassSchema:
    return artifacts.load(str(model), device="cpu").schema


# -- the edit log ---------------------------------------------------------------------------


def test_the_label_raster_is_the_log_replayed_and_survives_a_crash_between_them(scene, tmp_path):
    image, _, model = scene
    log = EditLog(tmp_path, image, schema_of(model))
    water, road = log.schema.classes[0].codes[0], log.schema.classes[3].codes[0]
    log.add(drawn(log, "paint", [[5, 5], [40, 8]], 3), 0, author="ann", tab="a")
    log.add(drawn(log, "polygon", [[50, 50], [80, 50], [80, 80]], 0), 3, author="bo", tab="b")
    labels = log.labels()
    assert set(np.unique(labels)) == {water, road, log.nodata}
    assert labels[6, 20] == water and labels[70, 75] == road and labels[90, 5] == log.nodata
    with rasterio.open(log.raster) as src, rasterio.open(image) as img:
        assert src.crs == img.crs and src.transform == img.transform  # the image's grid
        assert src.nodata == log.nodata and src.colormap(1)[water][:3] == (0, 0, 255)

    # a process killed after the log took a stroke but before the raster was replaced
    log._append(
        [
            log.rows()[0].__class__(
                "crashed0001",
                "t",
                "ann",
                "a",
                "paint",
                "water",
                water,
                "",
                log.grid.to_map(drawn(log, "paint", [[60, 10]], 4).outline).wkb,
            )
        ]
    )
    assert log.labels()[10, 60] != water  # the raster does not have it yet
    reopened = EditLog(tmp_path, image, log.schema)
    assert reopened.labels()[10, 60] == water  # replayed from the log on open
    assert len(reopened.active()) == 3


def test_undo_takes_back_only_this_tabs_latest_stroke(scene, tmp_path):
    image, _, model = scene
    log = EditLog(tmp_path, image, schema_of(model))
    mine, _ = log.add(drawn(log, "paint", [[10, 10]], 4), 1, author="ann", tab="a")
    theirs, _ = log.add(drawn(log, "paint", [[30, 30]], 4), 2, author="bo", tab="b")
    assert log.undo(author="ann", tab="a") == mine  # not bo's, though it is newer
    assert log.undo(author="ann", tab="a") is None
    assert [row.stroke for row in log.active()] == [theirs]
    assert log.labels()[10, 10] == log.nodata and log.labels()[30, 30] != log.nodata
    kinds = [row.kind for row in log.rows()]
    assert kinds == ["paint", "paint", "undo"]  # appended, nothing rewritten


def test_accepting_the_map_in_a_region_keeps_each_pixels_class(scene, tmp_path):
    image, _, model = scene
    log = EditLog(tmp_path, image, schema_of(model))
    classes = np.zeros((96, 96), np.uint8)
    classes[:, 48:] = 3
    stroke, pixels = log.accept(
        drawn(log, "accept", [[40, 0], [60, 0], [60, 20], [40, 20]], 0),
        classes,
        author="ann",
        tab="a",
    )
    assert pixels == 400
    codes = log.labels()
    assert codes[10, 45] == log.schema.classes[0].codes[0]
    assert codes[10, 55] == log.schema.classes[3].codes[0]
    assert {row.stroke for row in log.active()} == {stroke}  # one undo takes it all back


@pytest.mark.parametrize(
    ("kind", "points", "radius", "klass", "expected"),
    [
        ("paint", [[1, 1]], 0, 0, "brush radius"),
        ("paint", [[1, 1]], 3, 7, "not one of the model's"),
        ("polygon", [[1, 1], [2, 2]], 0, 0, "at least 3 points"),
        ("paint", [], 3, 0, "1 to"),
        ("paint", [[500, 500]], 3, 0, "covers no pixel"),
    ],
)
def test_a_bad_edit_is_one_error_and_writes_nothing(
    scene, tmp_path, kind, points, radius, klass, expected
):
    image, _, model = scene
    log = EditLog(tmp_path, image, schema_of(model))
    with pytest.raises(EditError, match=expected):
        log.add(drawn(log, kind, points, radius), klass, author="a", tab="a")
    assert log.rows() == []


def _paint_many(folder: str, image: str, model: str, tab: str, row: int) -> None:
    log = EditLog(Path(folder), Path(image), schema_of(Path(model)))
    for step in range(15):
        log.add(drawn(log, "paint", [[3 + step * 6, row]], 2), 1, author=tab, tab=tab)


def test_two_writers_at_once_lose_no_stroke(scene, tmp_path):
    image, _, model = scene
    args = [
        (str(tmp_path), str(image), str(model), tab, row) for tab, row in (("a", 20), ("b", 70))
    ]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_paint_many, args=a) for a in args]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    log = EditLog(tmp_path, image, schema_of(model))
    assert len(log.rows()) == 30 and {r.tab for r in log.rows()} == {"a", "b"}
    painted = log.labels() != log.nodata
    for row in (20, 70):  # every stroke of both writers is in the raster
        assert all(painted[row, 3 + step * 6] for step in range(15))


def test_a_full_disk_refuses_the_stroke_whole_and_keeps_every_earlier_one(scene, tmp_path):
    """Before: the log took the stroke, then the raster could not be written, so the page was
    told it failed and the stroke came back at the next start."""
    import subprocess

    from landcover.errors import DiskFullError
    from tests.conftest import mount_tmpfs

    image, _, model = scene
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=2m")
    try:
        log = EditLog(disk / "session", image, schema_of(model))
        kept, _ = log.add(drawn(log, "paint", [[10, 10]], 4), 1, author="ann", tab="a")
        before = log.labels()
        free = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(b"\1" * (free.f_bavail * free.f_frsize))
        with pytest.raises(DiskFullError, match="no space left"):
            log.add(drawn(log, "paint", [[60, 60]], 4), 2, author="ann", tab="a")
        with pytest.raises(DiskFullError, match="no space left"):
            log.undo(author="ann", tab="a")
        assert [r.stroke for r in log.rows()] == [kept]  # refused whole: not in the log
        assert np.array_equal(log.labels(), before)  # the raster as it was, and readable
        assert not [p.name for p in (disk / "session").iterdir() if "stag" in p.name]

        filler.unlink()  # space again: the next stroke is taken, the refused one never comes
        added, _ = log.add(drawn(log, "paint", [[80, 20]], 4), 2, author="ann", tab="a")
        reopened = EditLog(disk / "session", image, log.schema)
        assert [r.stroke for r in reopened.active()] == [kept, added]
        assert reopened.labels()[60, 60] == reopened.nodata
        assert reopened.labels()[20, 80] == reopened.schema.classes[2].codes[0]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- the head and its fit -------------------------------------------------------------------


def test_kept_features_give_the_models_own_map_and_a_fit_learns_the_corrections(scene):
    image, _, model = scene
    loaded = artifacts.load(str(model), device="cpu")
    with rasterio.open(image) as src:
        pixels = src.read().astype(np.float32)
    features = scene_features(loaded.torch_module, pixels, 4, loaded.output_margin)
    classes, confidence = features.classes_and_confidence()
    context = MIN_CONTEXT + 1  # what the studio reads around a window (3 x 3 head: + 1)
    padded = np.pad(pixels, ((0, 0), (context, context), (context, context)), mode="reflect")
    with torch.no_grad():
        direct = loaded.torch_module(torch.from_numpy(padded)[None])[0].argmax(0).numpy()
    inner = direct[context:-context, context:-context]
    assert (classes == inner).mean() > 0.999  # the model's own map: logits = head(features)
    assert confidence.min() >= 0.25 and confidence.max() <= 1.0

    # the untrained network all but never says water: a person paints the scene's water
    water = labels_of(image) == 1
    target = np.full(classes.shape, IGNORE_INDEX, np.uint8)
    target[water] = 0
    before = (classes[water] == 0).mean()
    fitted = fit_head(features, features.head, classes, target, IGNORE_INDEX)
    after, report = fitted.classes, fitted.report
    assert (after == features.classes_and_confidence(fitted.head)[0]).all()  # the head's map
    assert before < 0.3 and (after[water] == 0).mean() > 0.7
    assert (after[~water] != classes[~water]).mean() < 0.15  # the anchors hold the rest
    assert report.corrected_pixels == int(water.sum())


def test_a_scene_of_many_blocks_keeps_its_features_on_disk_and_learns_every_corner(
    scene, tmp_path, monkeypatch
):
    """A scene larger than one block: its features, read window by window from the file and
    kept on disk, are the ones of the whole scene in memory; a stroke at each corner is kept and
    learnt; a reopened session reads the features back; a store a crash left unfinished is
    computed anew."""
    from landcover.studio import head as heads
    from landcover.studio.head import RasterPixels

    monkeypatch.setattr(heads, "WINDOW", 64)  # the 96 px test scene: 2 x 2 blocks
    monkeypatch.setattr(heads, "CACHE_BYTES", 1)  # one block in memory at a time
    image, labels, model = scene
    loaded = artifacts.load(str(model), device="cpu")
    with rasterio.open(image) as src:
        pixels = src.read().astype(np.float32)
    whole = scene_features(loaded.torch_module, pixels, 4, loaded.output_margin)
    store = tmp_path / "store"
    on_disk = scene_features(
        loaded.torch_module, RasterPixels(image), 4, loaded.output_margin, store=store
    )
    assert sorted(p.name for p in store.glob("*.npy")) == [
        "0_0.npy",
        "0_1.npy",
        "1_0.npy",
        "1_1.npy",
    ]
    for key in whole.block_keys():
        assert np.array_equal(whole.block(key), on_disk.block(key)), key
    rows, cols = np.array([0, 63, 64, 95, 40]), np.array([95, 64, 63, 0, 40])
    assert np.array_equal(whole.neighbourhoods(rows, cols), on_disk.neighbourhoods(rows, cols))
    assert len(on_disk._blocks) == 1  # the cache held no more than its budget

    session = Session.open(image, str(model), tmp_path / "session", tracking(tmp_path))
    classes = session.class_indices()
    truth = session.schema.lookup_table()[labels_of(image)]
    painted = [
        corner_mistake(truth, classes, radius=5, rows=rows, cols=cols)
        for rows in (slice(0, 32), slice(64, 96))
        for cols in (slice(0, 32), slice(64, 96))
    ]
    for row, col, target in painted:  # a person fixes a mistake of the map near each corner
        session.edits.add(shapely.Point(col, row).buffer(5), target, author="t", tab="t")
    _, report, _ = retrain(session, tracking(tmp_path), EXPERIMENT, "t")
    corrections, after = session.corrections_as_indices(), session.class_indices()
    for row, col, target in painted:
        area = (slice(row - 3, row + 4), slice(col - 3, col + 4))
        assert (corrections[area] == target).all()  # kept
    assert report.corrected_accuracy_after > report.corrected_accuracy_before  # (an untrained net)
    # and learnt exactly as the scene in one block in memory learns it
    fitted = fit_head(whole, whole.head, classes, corrections, IGNORE_INDEX)
    assert np.array_equal(fitted.classes, after)

    (kept,) = (tmp_path / "session" / "features").iterdir()
    written = {p.name: p.stat().st_mtime_ns for p in kept.glob("*.npy")}
    again = Session.open(image, str(model), tmp_path / "session", tracking(tmp_path))
    assert {p.name: p.stat().st_mtime_ns for p in kept.glob("*.npy")} == written  # read back
    assert np.array_equal(again.class_indices(), after)
    (kept / "complete.json").unlink()  # a crash before the store was finished
    (kept / "1_1.npy").unlink()
    Session.open(image, str(model), tmp_path / "session", tracking(tmp_path))
    assert (kept / "complete.json").exists() and (kept / "1_1.npy").exists()


def test_features_on_a_full_disk_stop_in_one_line_and_leave_no_half_block(
    scene, small_disk, monkeypatch
):
    """The disk fills while a session's features are written: a DiskFullError naming the
    block, no partial file and no `complete.json` left; with room again the store is computed
    whole and equals the features in memory."""
    from landcover.errors import DiskFullError
    from landcover.studio import head as heads
    from landcover.studio.head import RasterPixels

    monkeypatch.setattr(heads, "WINDOW", 64)  # 4 blocks of about 70 KB
    image, _, model = scene
    loaded = artifacts.load(str(model), device="cpu")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 2**20 - 120 * 2**10))  # room for about one block
    store = small_disk / "features"
    with pytest.raises(DiskFullError, match=r"features/\d_\d\.npy"):
        scene_features(loaded.torch_module, RasterPixels(image), 4, 0, store=store)
    assert not (store / "complete.json").exists()
    assert all(p.suffix == ".npy" and not p.name.startswith(".") for p in store.iterdir())
    filler.unlink()
    again = scene_features(loaded.torch_module, RasterPixels(image), 4, 0, store=store)
    assert (store / "complete.json").exists() and not again.read_back
    with rasterio.open(image) as src:
        whole = scene_features(loaded.torch_module, src.read().astype(np.float32), 4, 0)
    for key in whole.block_keys():
        assert np.array_equal(whole.block(key), again.block(key))


def test_anchors_are_drawn_without_listing_every_pixel_as_before():
    """The anchors of a tile are found by counting rows, not by listing its 45 M free pixels
    (720 MB): the draws are the ones np.nonzero would give."""
    from landcover.studio.adapt import anchor_pixels, nth_true

    rng = np.random.default_rng(3)
    classes = rng.integers(0, 5, (180, 230)).astype(np.uint8)
    corrected = rng.random(classes.shape) < 0.2
    rows, cols = np.nonzero(~corrected)
    picks = rng.choice(len(rows), 400, replace=False)
    found_rows, found_cols = nth_true(~corrected, picks)
    assert np.array_equal(found_rows, rows[picks]) and np.array_equal(found_cols, cols[picks])
    found = anchor_pixels(classes, corrected, seed=0)
    reference = np.random.default_rng(0)  # the draws of the listing version, step by step
    pick = reference.choice(len(rows), size=min(len(rows), 6000), replace=False)
    expected_rows, expected_cols = [rows[pick]], [cols[pick]]
    for value in np.unique(classes[~corrected]):
        r, c = np.nonzero(~corrected & (classes == value))
        few = reference.choice(len(r), size=min(len(r), 300), replace=False)
        expected_rows.append(r[few])
        expected_cols.append(c[few])
    assert np.array_equal(found[0], np.concatenate(expected_rows))
    assert np.array_equal(found[1], np.concatenate(expected_cols))
    assert not corrected[found[0], found[1]].any()


def corner_mistake(
    truth: np.ndarray, classes: np.ndarray, radius: int, rows: slice, cols: slice
) -> tuple[int, int, int]:
    """(row, col, true class) of the disk in the given area where the map is most wrong and the
    truth is one class: where a person would paint."""
    best: tuple[int, tuple[int, int, int]] | None = None
    for row in range(rows.start + radius, rows.stop - radius):
        for col in range(cols.start + radius, cols.stop - radius):
            disk = (slice(row - radius, row + radius + 1), slice(col - radius, col + radius + 1))
            values = np.unique(truth[disk])
            if len(values) == 1 and values[0] != IGNORE_INDEX:
                middle = (slice(row - 3, row + 4), slice(col - 3, col + 4))
                wrong = int((classes[middle] != values[0]).sum())
                if best is None or wrong > best[0]:
                    best = (wrong, (row, col, int(values[0])))
    assert best is not None and best[0] > 0, "no mistake of the map to correct there"
    return best[1]


def labels_of(image: Path) -> np.ndarray:
    with rasterio.open(str(image).replace("_naip", "_lc")) as src:
        return src.read(1)


def water_outline(image: Path) -> shapely.Geometry:
    """The scene's water (label code 1) as polygons in pixel coordinates: what a person
    outlines when the map misses a pond."""
    water = labels_of(image) == 1
    return shapely.union_all([shape(g) for g, _ in shapes(water.astype(np.uint8), mask=water)])


def test_a_head_that_upsamples_is_refused_in_one_line():
    net = build_model(
        {
            "arch": "deeplabv3plus",
            "encoder_name": "resnet18",
            "encoder_depth": 5,
            "encoder_weights": None,
        },
        in_channels=4,
        num_classes=4,
        mean=[0.0] * 4,
        std=[1.0] * 4,
    )
    with pytest.raises(HeadError, match="full resolution"):
        scene_features(net, np.zeros((4, 64, 64), np.float32), 4, 0)


# -- a retrain's records --------------------------------------------------------------------


def test_a_retrain_is_a_run_with_its_start_its_data_and_a_promotable_model(session, tmp_path):
    uri = tracking(tmp_path)
    with pytest.raises(StudioError, match="no corrections yet"):
        retrain(session, uri, EXPERIMENT, "ann")
    session.edits.add(water_outline(session.image), 0, author="ann", tab="a", kind="polygon")
    version, report, seconds = retrain(session, uri, EXPERIMENT, "ann")
    run = MlflowClient(uri).get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["init.model"] == session.versions[0].model
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "corrections"
    assert dataset.dataset.digest == session.edits.digest()
    artifacts_logged = {
        a.path for a in MlflowClient(uri).list_artifacts(version.run_id, "corrections")
    }
    assert {"corrections/edits.gpkg"} <= artifacts_logged

    adapted = artifacts.load(version.model, tracking_uri=uri, device="cpu")
    with rasterio.open(session.image) as src:
        pixels = torch.from_numpy(src.read().astype(np.float32))[None]
    with torch.no_grad():
        mapped = adapted.torch_module(pixels)[0].argmax(0).numpy()
    logged_head = find_head_conv(adapted.torch_module, 4)
    assert torch.equal(logged_head.weight, session.heads[version.id].weight)  # what was fitted
    water = labels_of(session.image) == 1
    assert (mapped[water] == 0).mean() > 0.6  # whole-image forward: no context at the borders
    assert session.current == 1 and report.corrected_pixels > 0 and seconds < 30
    # named after the scene and the version it makes, described; scored before and after
    assert run.info.run_name == f"studio {session.image.stem} v1"
    assert "corrected pixels in 1 stroke(s) by ann" in run.data.tags["mlflow.note.content"]
    assert report.scores["before"]["mIoU"] == pytest.approx(
        run.data.metrics["start/val/mIoU"], abs=1e-4
    )
    assert report.scores["after"]["mIoU"] == pytest.approx(run.data.metrics["val/mIoU"], abs=1e-4)
    assert "labels" in report.scores["scored_on"]
    with pytest.raises(StudioError, match="nothing new since the last retrain"):
        retrain(session, uri, EXPERIMENT, "ann")  # R again with the same corrections

    classes_path, confidence_path = session.map_paths(version)
    with rasterio.open(classes_path) as src, rasterio.open(session.image) as img:
        assert src.crs == img.crs and src.transform == img.transform and src.colormap(1)
    with rasterio.open(confidence_path) as src:  # the fitted head's confidence, as bytes
        expected = np.round(session.map_of(version)[1] * 255).astype(np.uint8)
        np.testing.assert_array_equal(src.read(1), expected)

    # scored on the scene's labels (the session has them): promotable like any run
    metrics = run.data.metrics
    assert {"val/mIoU", "start/val/mIoU", "val/overall_accuracy"} <= set(metrics)
    assert run.data.tags["dataset_fingerprint"] == files_digest(session.edits.base_labels)
    client = MlflowClient(uri)
    candidate = candidate_of_run(client, version.run_id, "val/mIoU")
    with pytest.raises(PromotionError, match="scored on one scene.*force=true"):
        promote(client, candidate, name="studio", experiment=EXPERIMENT)  # before: silently
    promoted = promote(client, candidate, name="studio", experiment=EXPERIMENT, force=True)
    assert "champion" in promoted.aliases
    champion = artifacts.load("models:/studio@champion", tracking_uri=uri, device="cpu")
    assert torch.equal(find_head_conv(champion.torch_module, 4).weight, logged_head.weight)

    undone = session.step_back()
    assert undone == version and session.version.id == "base"
    reopened = Session.open(session.image, "ignored", session.folder, uri)
    assert reopened.current == 0 and len(reopened.versions) == 2  # state.json kept both


def test_a_run_left_running_by_a_killed_studio_is_closed_failed(session, tmp_path):
    uri = tracking(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    tags = {**session.owner_tags(), "landcover.studio.pid": "999999999"}  # no such process
    run = mlflow.start_run(run_name="studio retrain", tags=tags)
    mlflow.end_run("RUNNING")  # leaves it RUNNING, as a SIGKILL would
    alive = mlflow.start_run(run_name="studio retrain", tags=session.owner_tags())  # this pid
    try:
        assert close_orphaned_runs(session, uri, EXPERIMENT) == 1
        client = MlflowClient(uri)
        assert client.get_run(run.info.run_id).info.status == "FAILED"
        assert "stopped during" in client.get_run(run.info.run_id).data.tags["landcover.error"]
        assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # a live studio's
    finally:
        mlflow.end_run()


# -- corrections as training data -----------------------------------------------------------


def test_corrections_are_a_data_source_alone_and_over_the_labels(session):
    session.edits.add(
        drawn(session.edits, "paint", [[20, 20], [60, 20]], 3), 3, author="a", tab="a"
    )
    corrected = int((session.corrections_as_indices() != IGNORE_INDEX).sum())
    for name, csv_name in (("corrections", "scenes.csv"), ("corrections_mixed", "mixed.csv")):
        cfg = compose_config("train", f"data={name}", f"data.root={session.folder}")
        assert cfg.data.splits.train.manifest.endswith(csv_name)
        pairs = find_pairs(
            pattern=cfg.data.splits.train.pattern,
            manifest=cfg.data.splits.train.manifest,
            image_suffix=cfg.data.image_suffix,
            label_suffix=cfg.data.label_suffix,
        )
        (scene,) = load_scenes(pairs, bands=4, schema=session.schema)
        if name == "corrections":
            assert scene.labelled_pixels == corrected
        else:  # every labelled pixel of the original labels, the corrected ones changed
            with rasterio.open(scene.label_path) as mixed:
                codes = mixed.read(1)
            assert scene.labelled_pixels > corrected
            assert (codes[20, 20:60] == session.schema.classes[3].codes[0]).all()


# -- who may connect ------------------------------------------------------------------------


def test_only_loopback_unless_asked_and_then_only_with_a_team_server():
    check_bind("127.0.0.1", False, "sqlite:///x.db")
    check_bind("::1", False, "sqlite:///x.db")
    with pytest.raises(AccessError, match="--allow-remote"):
        check_bind("0.0.0.0", False, "sqlite:///x.db")
    with pytest.raises(AccessError, match="team's MLflow server"):
        check_bind("0.0.0.0", True, "sqlite:///x.db")
    check_bind("0.0.0.0", True, "http://mlflow.example:5000")


def test_members_are_checked_against_the_team_server_and_remembered():
    asked = []

    class TeamServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            asked.append(self.headers.get("Authorization"))
            good = "Basic " + base64.b64encode(b"ann:secret").decode()
            self.send_response(200 if self.headers.get("Authorization") == good else 401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), TeamServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        team = TeamCredentials(f"http://127.0.0.1:{server.server_port}")
        good = "Basic " + base64.b64encode(b"ann:secret").decode()
        bad = "Basic " + base64.b64encode(b"ann:guess").decode()
        assert team.member(None) is None and team.member("Bearer x") is None
        assert team.member(bad) is None
        assert team.member(good) == "ann" and team.member(good) == "ann"
        assert asked.count(good) == 1  # the second answer came from memory
    finally:
        server.shutdown()


def test_one_studio_server_per_session_folder(tmp_path):
    held = hold_session(tmp_path, 8765)
    try:
        with pytest.raises(LandcoverError, match=r"open in another landcover-studio \(pid"):
            hold_session(tmp_path, 8766)
    finally:
        os.close(held)
    os.close(hold_session(tmp_path, 8767))  # free again once the first is gone


def test_a_large_scene_is_corrected_one_window_at_a_time_on_its_own_grid(
    scene, tmp_path, monkeypatch
):
    """A scene over the studio's size was refused with a gdal_translate hint; --window cuts
    the area into the session folder, and what is corrected there lies over the source."""
    from landcover.studio import session as sessions
    from landcover.studio.app import parse_args
    from landcover.studio.window import WindowError, cut_scene, cut_window

    image, labels, model = scene
    monkeypatch.setattr(sessions, "MAX_PIXELS", 90 * 90)  # the 96 px scene is "too large"
    with pytest.raises(StudioError, match="--window COL ROW WIDTH HEIGHT"):
        Session.open(image, str(model), tmp_path / "whole", tracking(tmp_path))

    args = parse_args([str(image), "--model", str(model), "--window", "10", "20", "50", "40"])
    assert args.session == Path("studio") / f"{image.stem}_10_20_50x40"
    folder = tmp_path / "window"
    cut = cut_window(image, (10, 20, 50, 40), folder)
    cut_labels = cut_window(labels, (10, 20, 50, 40), folder)
    with rasterio.open(image) as src, rasterio.open(cut) as part:
        area = rasterio.windows.Window(10, 20, 50, 40)
        assert np.array_equal(part.read(), src.read(window=area))
        assert part.crs == src.crs and part.transform == src.window_transform(area)
    with rasterio.open(labels) as src, rasterio.open(cut_labels) as part:
        assert part.colormap(1) == src.colormap(1)  # a GIS shows the labels as before
    written = cut.stat().st_mtime_ns
    assert cut_window(image, (10, 20, 50, 40), folder) == cut  # a reopened session reuses it
    assert cut.stat().st_mtime_ns == written
    with pytest.raises(WindowError, match="a session folder is one window"):
        cut_window(image, (0, 0, 50, 40), folder)
    with pytest.raises(WindowError, match=r"reaches past .* \(96 x 96 px\)"):
        cut_window(image, (60, 0, 50, 40), tmp_path / "past")
    with pytest.raises(WindowError, match="sizes more than 0"):
        cut_window(image, (0, 0, 0, 40), tmp_path / "empty")
    named_alike = []  # an image and its labels of one name, in two folders
    for sub, source in (("a", image), ("b", labels)):
        (tmp_path / sub).mkdir()
        named_alike.append(tmp_path / sub / "scene.tif")
        named_alike[-1].write_bytes(source.read_bytes())
    both = cut_scene(*named_alike, (0, 0, 8, 8), tmp_path / "same")
    assert [p.name for p in both if p] == ["scene_window.tif", "scene_labels_window.tif"]

    session = Session.open(cut, str(model), folder, tracking(tmp_path), labels=cut_labels)
    session.edits.add(
        drawn(session.edits, "polygon", [[5, 5], [6, 5], [6, 6], [5, 6]], 0),
        1,
        author="ann",
        tab="a",
    )
    with rasterio.open(session.edits.raster) as corrections, rasterio.open(image) as src:
        painted = np.argwhere(corrections.read(1) != session.edits.nodata)
        assert painted.tolist() == [[5, 5]]  # the one pixel the square covers
        ground = corrections.xy(5, 5)
        assert src.index(*ground) == (25, 15)  # the window's (5, 5) is the scene's (25, 15)
    assert f"{cut}," in (folder / "scenes.csv").read_text()  # data=corrections trains on it


def test_correcting_the_2018_networks_missed_road_on_a_real_patch(shared, tmp_path):
    """The study of experiments/studio_corrections.py, small: 300 road pixels the 2018 map
    misses on val patch 1-2, painted and retrained; the road appears, the other val patches
    keep their OA."""
    from landcover.artifacts.tutorial_model import load_schema

    val = shared / "data/chesapeake-sample/val"
    four = load_schema("chesapeake_4class").lookup_table()
    image = val / "m_3708035_ne_17_1-2_naip-old.tif"
    session = Session.open(
        image, str(shared / "models/seed-cntk/250epochs.model"), tmp_path / "s", tracking(tmp_path)
    )
    to_four = np.array([four[c.codes[0]] for c in session.schema.classes], np.uint8)
    truth = four[labels_of_patch(image)]

    def road_iou(mapped: np.ndarray) -> float:
        valid = truth != 255
        both = ((mapped == 3) & (truth == 3) & valid).sum()
        return float(both / (((mapped == 3) | (truth == 3)) & valid).sum())

    before = to_four[session.class_indices()]
    missed = np.argwhere((truth == 3) & (before != 3))
    chosen = missed[np.random.default_rng(0).choice(len(missed), 300, replace=False)]
    barren = int(np.flatnonzero(to_four == 3)[0])
    dots = shapely.union_all([shapely.Point(c + 0.5, r + 0.5).buffer(0.5) for r, c in chosen])
    session.edits.add(dots, barren, author="t", tab="t")  # one stroke of 300 one-pixel dots
    assert (session.corrections_as_indices() != IGNORE_INDEX).sum() == 300
    version, report, seconds = retrain(session, tracking(tmp_path), EXPERIMENT, "t")
    after = to_four[session.class_indices()]
    print(f"road IoU {road_iou(before):.3f} -> {road_iou(after):.3f}, fit {seconds:.1f} s")
    assert road_iou(before) < 0.1 and road_iou(after) > 0.4
    for other in sorted(val.glob("*_naip-old.tif")):
        if other == image:
            continue
        with rasterio.open(other) as src:
            pixels = src.read().astype(np.float32)
        features = scene_features(session.module, pixels, 5, int(session.metadata["output_margin"]))
        target = four[labels_of_patch(other)]
        valid = target != 255
        oa = [
            (to_four[features.classes_and_confidence(h)[0]] == target)[valid].mean()
            for h in (session.heads["base"], session.heads[version.id])
        ]
        assert oa[1] > oa[0] - 0.03, (other.name, oa)  # the rest is not broken


def labels_of_patch(image: Path) -> np.ndarray:
    with rasterio.open(str(image).replace("_naip-old", "_lc")) as src:
        return src.read(1)


def _append_then_die(folder: str, image: str, model: str, acknowledged: str) -> None:
    """Append strokes, say each one is saved, then die mid-transaction as kill -9 leaves
    it: the database file already changed, its rollback journal (hot) beside it."""
    import os
    import signal
    import sqlite3

    log = EditLog(Path(folder), Path(image), schema_of(Path(model)))
    for step in range(5):
        log.add(drawn(log, "paint", [[5 + 9 * step, 30]], 3), 1, author="a", tab="a")
        with open(acknowledged, "a") as out:
            out.write(f"{step}\n")
    db = sqlite3.connect(log.gpkg, isolation_level=None)
    db.execute("PRAGMA cache_size = 1")  # spill to the file before the commit
    db.execute("BEGIN")
    db.execute("CREATE TABLE torn (junk BLOB)")
    for _ in range(200):
        db.execute("INSERT INTO torn VALUES (randomblob(4096))")
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_studio_killed_mid_append_reopens_with_every_acknowledged_stroke(scene, tmp_path):
    """Before: a kill -9 during an edit left edits.gpkg-journal, and every restart failed
    with "attempt to write a readonly database" (the log was read read-only)."""
    import multiprocessing

    image, _, model = scene
    acknowledged = tmp_path / "acknowledged.txt"
    child = multiprocessing.get_context("spawn").Process(
        target=_append_then_die, args=(str(tmp_path), str(image), str(model), str(acknowledged))
    )
    child.start()
    child.join(120)
    assert child.exitcode == -9
    assert (tmp_path / "edits.gpkg-journal").exists()  # the hot journal a kill leaves
    log = EditLog(tmp_path, image, schema_of(model))
    assert len(log.active()) == len(acknowledged.read_text().split()) == 5
    assert not (tmp_path / "edits.gpkg-journal").exists()
    log.add(drawn(log, "paint", [[80, 80]], 3), 2, author="a", tab="a")  # and it writes again
    assert len(log.active()) == 6


def test_the_gate_lets_in_the_studios_own_page_only():
    """The rules behind the attack tests (tests/test_studio_attacks.py), case by case."""
    from landcover.studio.gate import Gate

    local = Gate("127.0.0.1", 8765, team=False)
    assert local.url().endswith(f"/?token={local.token}")
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        assert local.host_refusal(host) is None
    for host in ("evil.example:8765", "127.0.0.1:9999", "", "127.0.0.1"):
        assert local.host_refusal(host)
    post = "POST"
    mine = {"origin": "http://127.0.0.1:8765", "host": "127.0.0.1:8765"}
    assert local.origin_refusal(post, mine) is None
    assert local.origin_refusal(post, {}) is None  # curl: judged by its token
    for origin in (
        "http://127.0.0.2:8000",
        "null",
        "http://localhost:8766",
        "https://127.0.0.1:8765",
    ):
        assert local.origin_refusal(post, {**mine, "origin": origin}), origin
    assert local.origin_refusal(post, {**mine, "sec-fetch-site": "cross-site"})
    assert local.origin_refusal("GET", {"origin": "http://evil.example"}) is None
    json_body = {"content-type": "application/json; charset=utf-8", "content-length": "20"}
    assert local.body_refusal(post, json_body) is None
    assert local.body_refusal(post, {"content-type": "text/plain"})[0] == 415
    assert local.body_refusal(post, {**json_body, "content-length": str(10**9)})[0] == 413
    assert local.token_matches({"x-landcover-token": local.token}, {})
    assert local.token_matches({}, {local.cookie: local.token})
    assert not local.token_matches({"x-landcover-token": "guess"}, {})
    assert not local.token_matches({}, {})

    team = Gate("0.0.0.0", 8765, team=True)
    assert team.host_refusal("studio.lab.example") is None  # signed in instead
    proxied = {"origin": "https://studio.lab.example", "host": "studio.lab.example"}
    assert team.origin_refusal(post, proxied) is None  # behind a TLS proxy
    assert team.origin_refusal(post, {**proxied, "origin": "https://evil.example"})


def test_the_pages_training_command_runs_as_written(session, tmp_path):
    """Before: `landcover-train ... ` without the venv's path, the tracking store or the
    model's patch size (the 2018 network's 64 px margin left no output at 128 px)."""
    import shlex
    import subprocess

    from landcover.studio.app import train_command

    uri = tracking(tmp_path)
    session.edits.add(water_outline(session.image), 0, author="ann", tab="a", kind="polygon")
    command = train_command(session, uri)
    words = shlex.split(command)
    assert Path(words[0]).is_file() and f"tracking.uri={uri}" in words
    # fine-tuning keeps what the studio model knew (experiments/studio_finetune.py)
    assert {"init.freeze=[all_but_head]", "optimizer.lr=1e-4", "trainer.keep_start=true"} <= set(
        words
    )
    extra = "trainer.max_epochs=1 data.patches_per_epoch=8 data.batch_size=4 trainer.progress=false"
    done = subprocess.run(f"{command} {extra}", shell=True, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    runs = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()]
    )
    trained = [r for r in runs if r.data.params.get("init.model") == session.version.model]
    assert trained and trained[0].info.status == "FINISHED"

    cntk = {**session.metadata, "output_margin": 64, "patch_size": 128, "arch": "seed"}
    session.metadata = cntk
    assert "data.patch_size=256" in train_command(session, uri)  # 64 px margin: 256 patches


QGIS_VECTOR_CHECK = """
import json, os, sys
from qgis.core import QgsApplication, QgsVectorLayer
app = QgsApplication([], False); app.initQgis()
layer = QgsVectorLayer(sys.argv[1] + "|layername=corrections", "corrections", "ogr")
message, loaded = layer.loadDefaultStyle()
renderer = layer.renderer()
print(json.dumps({"valid": layer.isValid(), "features": layer.featureCount(), "style": loaded,
                  "renderer": renderer.type(),
                  "labels": [c.label() for c in getattr(renderer, "categories", lambda: [])()]}))
sys.stdout.flush(); os._exit(0)
"""


def test_the_export_holds_the_edits_in_force_styled_for_qgis_and_the_session_zipped(
    scene, tmp_path
):
    """The log keeps undone strokes and undo rows; the export only what is in force, in the
    image's CRS, one feature per stroke, opened by QGIS with the classes' colours and names."""
    import json
    import subprocess
    import zipfile

    import pyogrio

    from landcover.studio.export import export_session

    image, _, model = scene
    log = EditLog(tmp_path / "session", image, schema_of(model))
    kept, _ = log.add(drawn(log, "paint", [[10, 10], [20, 12]], 4), 1, author="ann", tab="a")
    log.add(drawn(log, "paint", [[60, 60]], 4), 2, author="ann", tab="a")
    log.undo(author="ann", tab="a")  # the second stroke taken back
    done = export_session(log, tmp_path / "session" / "export")
    from pyogrio.raw import read

    meta, _, _, values = read(done.layer, layer="corrections")
    fields = dict(zip(meta["fields"], values, strict=True))
    assert list(fields["stroke"]) == [kept] and done.features == 1
    with rasterio.open(image) as src:
        assert (
            pyogrio.read_info(done.layer, layer="corrections")["crs"] == f"EPSG:{src.crs.to_epsg()}"
        )
    assert done.raster.is_file() and done.raster.read_bytes() == log.raster.read_bytes()
    names = zipfile.ZipFile(done.archive).namelist()
    assert "session/edits.gpkg" in names and not any("export" in n for n in names)
    assert not any(n.endswith(".edits.lock") for n in names)

    if (
        not Path("/usr/bin/python3").exists()
        or subprocess.run(
            ["/usr/bin/python3", "-c", "import qgis.core"], capture_output=True
        ).returncode
    ):
        pytest.skip("no PyQGIS to open the export with: apt-get install python3-qgis")
    opened = subprocess.run(
        ["/usr/bin/python3", "-c", QGIS_VECTOR_CHECK, str(done.layer)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr[-2000:]
    read = json.loads(opened.stdout.strip().splitlines()[-1])
    assert read["valid"] and read["features"] == 1 and read["style"]
    assert read["renderer"] == "categorizedSymbol"
    assert read["labels"] == [c.name for c in schema_of(model).classes if not c.ignore]
