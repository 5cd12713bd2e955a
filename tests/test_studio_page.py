"""landcover-studio as a person uses it: the page in headless Chromium (Debian's, driven by
Playwright), and the server killed mid-session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from mlflow.tracking import MlflowClient

from landcover.data.schema import hex_to_rgb
from landcover.data.synthetic import SyntheticSpec, generate
from tests.servers import BIN, HOST, free_port, http, http_json, running
from tests.test_faults import tiny_model_checkpoint

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REGION = (40, 40, 88, 88)  # col0, row0, col1, row1 of the painted square


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("studio-page")
    generate(root, SyntheticSpec(scenes={"train": 0, "val": 1}, size=128, seed=11))
    return next((root / "val").glob("*_naip.tif")), tiny_model_checkpoint(root)


@contextlib.contextmanager
def studio(scene, folder: Path, port: int) -> Iterator[tuple[str, object]]:
    image, model = scene
    command = [
        str(BIN / "landcover-studio"),
        str(image),
        "--model",
        str(model),
        "--port",
        str(port),
        "--session",
        str(folder / "session"),
        "--tracking-uri",
        f"sqlite:///{folder}/mlflow.db",
    ]
    url = f"http://{HOST}:{port}"
    with running(command, f"{url}/api/scene", folder / f"studio-{port}.log", {}, wait_s=120) as p:
        yield url, p


def rarest_class_in_region(folder: Path, classes: list[dict]) -> dict:
    with rasterio.open(folder / "session/maps/base_classes.tif") as src:
        codes = src.read(1)[REGION[1] : REGION[3], REGION[0] : REGION[2]]
    counts = {c["index"]: int((codes == c["index"] + 1).sum()) for c in classes if c["trainable"]}
    return classes[min(counts, key=counts.get)]  # chesapeake_4class: code = index + 1


def share_in_colour(shot: Path, box: tuple[float, float, float, float], colour: str) -> float:
    from PIL import Image

    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    left, top, right, bottom = (int(round(v)) for v in box)
    patch = picture[top + 3 : bottom - 3, left + 3 : right - 3]
    return float((np.abs(patch - np.array(hex_to_rgb(colour))).sum(-1) < 40).mean())


@pytest.mark.slow
def test_paint_a_region_retrain_and_see_the_map_change_in_chromium(scene, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: apt-get install chromium (Debian's package; .ci/run does)")
    with studio(scene, tmp_path, free_port()) as (url, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        scene_info = http_json(f"{url}/api/scene")
        wanted = rarest_class_in_region(tmp_path, scene_info["classes"])
        page.evaluate(  # the map fully opaque, so its colours are the class colours
            "() => { const o = document.getElementById('opacity'); o.value = 100;"
            " o.dispatchEvent(new Event('input')); }"
        )
        page.wait_for_load_state("networkidle")
        corner = page.evaluate(f"() => studio.screenPoint({REGION[0]}, {REGION[1]})")
        far = page.evaluate(f"() => studio.screenPoint({REGION[2]}, {REGION[3]})")
        box = (corner["x"], corner["y"], far["x"], far["y"])
        before = tmp_path / "before.png"
        page.screenshot(path=str(before))

        page.keyboard.press(wanted["key"])  # the class by its shortcut
        page.keyboard.press("b")  # one brush stroke across the region's top
        page.mouse.move(corner["x"] + 4, corner["y"] + 6)
        page.mouse.down()
        page.mouse.move(far["x"] - 4, corner["y"] + 6, steps=8)
        page.mouse.up()
        page.wait_for_selector("body[data-edits='1']", timeout=15_000)
        page.keyboard.press("p")  # and the whole region as a polygon
        for x, y in ((box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])):
            page.mouse.click(x, y)
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-edits='2']", timeout=15_000)
        page.wait_for_load_state("networkidle")
        time.sleep(0.8)  # the stroke's sketch goes, the corrections' new tiles fade in
        painted = tmp_path / "painted.png"
        page.screenshot(path=str(painted))

        page.keyboard.press("r")
        page.wait_for_function("document.body.dataset.version !== 'base'", timeout=90_000)
        page.get_by_label("corrections").uncheck()  # the map alone, not the painted overlay
        page.wait_for_load_state("networkidle")
        time.sleep(0.5)  # tiles fade in
        after = tmp_path / "after.png"
        page.screenshot(path=str(after))
        status = page.inner_text("#status")
        browser.close()

    for shot in (before, painted, after):  # kept for the docs / a person to look at
        if os.environ.get("LANDCOVER_STUDIO_SHOTS"):
            shutil.copy(shot, Path(os.environ["LANDCOVER_STUDIO_SHOTS"]) / shot.name)
    assert not errors, errors
    assert "retrained" in status, status
    share_before = share_in_colour(before, box, wanted["color"])
    share_painted = share_in_colour(painted, box, wanted["color"])
    share_after = share_in_colour(after, box, wanted["color"])
    print(f"{wanted['name']} in the region: {share_before:.2f} before, {share_after:.2f} after")
    assert share_painted > 0.9  # the corrections overlay shows the painted class
    # an untrained tiny network: its features hold little, yet the region turns
    assert share_before < 0.3 and share_after > 0.6


def running_retrain_runs(folder: Path) -> list[str]:
    with (
        contextlib.suppress(sqlite3.OperationalError),
        sqlite3.connect(folder / "mlflow.db", timeout=1) as db,
    ):
        return [r[0] for r in db.execute("select run_uuid from runs where status = 'RUNNING'")]
    return []


@pytest.mark.slow
def test_killing_the_server_keeps_every_saved_edit_and_leaves_no_run_running(scene, tmp_path):
    port = free_port()
    strokes = [[[10 + 12 * i, 20], [10 + 12 * i, 60]] for i in range(6)]
    with studio(scene, tmp_path, port) as (url, process):
        for i, points in enumerate(strokes):
            answer = http_json(
                f"{url}/api/edits",
                {"kind": "paint", "points": points, "radius": 3, "class_index": i % 4, "tab": "t"},
            )
            assert answer["edits"] == i + 1
        threading.Thread(target=http, args=(f"{url}/api/retrain", {}), daemon=True).start()
        deadline = time.monotonic() + 60
        while not running_retrain_runs(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_during = running_retrain_runs(tmp_path)
        os.killpg(process.pid, signal.SIGKILL)  # a power cut, mid-retrain
        process.wait(30)
    assert killed_during, "the retrain's run was never seen RUNNING"

    with studio(scene, tmp_path, free_port()) as (url, _):
        state = http_json(f"{url}/api/scene")
    assert state["edits"] == len(strokes)  # every acknowledged edit is there
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run_id in killed_during:
        run = client.get_run(run_id)
        assert run.info.status in ("FINISHED", "FAILED")
        if run.info.status == "FAILED":
            assert "stopped during" in run.data.tags["landcover.error"]
    assert running_retrain_runs(tmp_path) == []
