"""landcover-studio as a person uses it: the page in headless Chromium (Debian's, driven by
Playwright), and the server killed mid-session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from mlflow.tracking import MlflowClient
from rasterio.features import rasterize, shapes
from shapely.geometry import shape

from landcover import artifacts
from landcover.data.schema import hex_to_rgb
from landcover.data.synthetic import SyntheticSpec, generate
from landcover.studio.edits import EditLog
from tests.servers import BIN, HOST, basic_auth_server, free_port, http, http_json, running
from tests.test_faults import tiny_model_checkpoint

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("studio-page")
    generate(root, SyntheticSpec(scenes={"train": 0, "val": 1}, size=128, seed=11))
    return next((root / "val").glob("*_naip.tif")), tiny_model_checkpoint(root)


def studio_command(scene, port: int, session: Path, tracking_uri: str, *extra: str) -> list[str]:
    """`landcover-studio` on the generated scene with the tiny model."""
    image, model = scene
    return [
        str(BIN / "landcover-studio"), str(image), "--model", str(model), "--port", str(port),
        "--session", str(session), "--tracking-uri", tracking_uri, *extra,
    ]  # fmt: skip


@dataclass
class Studio:
    """A running studio: its address, the address it printed (with the token), its process."""

    url: str
    printed: str
    token: str
    process: subprocess.Popen
    session: Path
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Landcover-Token": self.token}

    def get(self, path: str) -> Any:
        return http_json(f"{self.url}{path}", headers=self.headers)

    def post(self, path: str, payload: Any) -> Any:
        return http_json(f"{self.url}{path}", payload, headers=self.headers)


def studio_info(session: Path) -> dict[str, Any]:
    """What a running studio wrote for tools on this machine: its printed URL and token."""
    return json.loads((session / ".studio.json").read_text())


@contextlib.contextmanager
def studio(scene, folder: Path, port: int, *extra: str) -> Iterator[Studio]:
    session = folder / "session"
    command = studio_command(scene, port, session, f"sqlite:///{folder}/mlflow.db", *extra)
    url = f"http://{HOST}:{port}"
    log = folder / f"studio-{port}.log"
    with running(command, f"{url}/health", log, {}, wait_s=120) as p:
        # written before the server starts listening (a studio before issue 33 wrote none)
        info = studio_info(session) if (session / ".studio.json").exists() else {}
        yield Studio(url, info.get("url", url), info.get("token", ""), p, session, log)


def largest_pond(image: Path) -> tuple[list[tuple[float, float]], np.ndarray]:
    """The outline (about a dozen corners, pixel coordinates) a person would click around the
    scene's largest water body, and the pixels well inside it (where the map is checked)."""
    with rasterio.open(str(image).replace("_naip", "_lc")) as src:
        water = src.read(1) == 1
    pond = max(
        (shape(g) for g, _ in shapes(water.astype(np.uint8), mask=water)), key=lambda g: g.area
    )
    corners = list(pond.exterior.simplify(1.5).coords)[:-1]
    inside = rasterize([(pond.buffer(-2), 1)], out_shape=water.shape, fill=0).astype(bool)
    return corners, np.argwhere(inside & water)


def share_in_colour(shot: Path, points: list[dict], colour: str) -> float:
    """Share of the screen points whose colour in the screenshot is the class colour."""
    from PIL import Image

    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    rgb = np.array(hex_to_rgb(colour))
    seen = [picture[int(p["y"]), int(p["x"])] for p in points]
    return float(np.mean([np.abs(c - rgb).sum() < 40 for c in seen]))


@pytest.mark.slow
def test_paint_a_region_retrain_and_see_the_map_change_in_chromium(scene, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: apt-get install chromium (Debian's package; .ci/run does)")
    with studio(scene, tmp_path, free_port()) as app, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(app.printed)  # as a person does: the address the studio printed
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert "token" not in page.url  # it became a cookie, out of the address bar
        scene_info = app.get("/api/scene")
        water = scene_info["classes"][0]  # the untrained network all but never says water
        corners, inside = largest_pond(scene[0])
        page.evaluate(  # the map fully opaque, so its colours are the class colours
            "() => { const o = document.getElementById('opacity'); o.value = 100;"
            " o.dispatchEvent(new Event('input')); }"
        )
        page.wait_for_load_state("networkidle")
        screen = page.evaluate(
            "(pixels) => pixels.map(([c, r]) => studio.screenPoint(c + 0.5, r + 0.5))",
            [[int(c), int(r)] for r, c in inside],
        )
        before = tmp_path / "before.png"
        page.screenshot(path=str(before))

        page.keyboard.press(water["key"])  # the class by its shortcut
        page.keyboard.press("b")  # one brush stroke across the pond's middle
        r, c = inside[len(inside) // 2]
        start = page.evaluate(f"() => studio.screenPoint({c - 3}, {r})")
        end = page.evaluate(f"() => studio.screenPoint({c + 3}, {r})")
        page.mouse.move(start["x"], start["y"])
        page.mouse.down()
        page.mouse.move(end["x"], end["y"], steps=6)
        page.mouse.up()
        page.wait_for_selector("body[data-edits='1']", timeout=15_000)
        page.keyboard.press("p")  # and the pond's outline as a polygon
        for x, y in corners:
            point = page.evaluate(f"() => studio.screenPoint({x}, {y})")
            page.mouse.click(point["x"], point["y"])
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-edits='2']", timeout=15_000)
        page.wait_for_load_state("networkidle")
        time.sleep(0.8)  # the stroke's sketch goes, the corrections' new tiles fade in
        painted = tmp_path / "painted.png"
        page.screenshot(path=str(painted))

        page.keyboard.press("r")
        page.wait_for_selector("body:not([data-version='base'])", timeout=90_000)
        page.get_by_label("corrections").uncheck()  # the map alone, not the painted overlay
        page.wait_for_load_state("networkidle")
        time.sleep(0.8)  # tiles fade in
        after = tmp_path / "after.png"
        page.screenshot(path=str(after))
        status = page.inner_text("#status")
        page.click("#undo-retrain")  # back to the model the session started from
        page.wait_for_selector("body[data-version='base']", timeout=30_000)
        assert app.get("/api/scene")["current"] == 0
        browser.close()

    for shot in (before, painted, after):  # kept for the docs / a person to look at
        if os.environ.get("LANDCOVER_STUDIO_SHOTS"):
            shutil.copy(shot, Path(os.environ["LANDCOVER_STUDIO_SHOTS"]) / shot.name)
    assert not errors, errors
    assert "retrained" in status, status
    share_before = share_in_colour(before, screen, water["color"])
    share_painted = share_in_colour(painted, screen, water["color"])
    share_after = share_in_colour(after, screen, water["color"])
    print(f"water inside the pond: {share_before:.2f} before, {share_after:.2f} after")
    assert share_painted > 0.95  # the corrections overlay shows the painted class
    assert share_before < 0.3 and share_after > 0.7  # the redrawn map took it


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
    with studio(scene, tmp_path, port) as app:
        process = app.process
        for i, points in enumerate(strokes):
            answer = app.post(
                "/api/edits",
                {"kind": "paint", "points": points, "radius": 3, "class_index": i % 4, "tab": "t"},
            )
            assert answer["edits"] == i + 1
        threading.Thread(
            target=http,
            args=(f"{app.url}/api/retrain", {}),
            kwargs={"headers": app.headers},
            daemon=True,
        ).start()
        deadline = time.monotonic() + 60
        while not running_retrain_runs(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_during = running_retrain_runs(tmp_path)
        os.killpg(process.pid, signal.SIGKILL)  # a power cut, mid-retrain
        process.wait(30)
    assert killed_during, "the retrain's run was never seen RUNNING"

    with studio(scene, tmp_path, free_port()) as app:
        state = app.get("/api/scene")
    assert state["edits"] == len(strokes)  # every acknowledged edit is there
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run_id in killed_during:
        run = client.get_run(run_id)
        assert run.info.status in ("FINISHED", "FAILED")
        if run.info.status == "FAILED":
            assert "stopped during" in run.data.tags["landcover.error"]
    assert running_retrain_runs(tmp_path) == []


def ask(url: str, user: str | None = None, password: str = "", payload: dict | None = None):
    """(status, JSON or None) of a request with basic credentials."""
    import base64
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"} if payload is not None else {}
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    data = None if payload is None else json.dumps(payload).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, None


def ask_raw(url: str, user: str, password: str) -> tuple[int, str]:
    """(status, body text) of a GET with basic credentials."""
    import base64
    import urllib.error
    import urllib.request

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.slow
def test_a_shared_studio_lets_in_team_members_only_and_records_who_edited(
    scene, tmp_path, monkeypatch
):
    image, model = scene
    refused = subprocess.run(
        [str(BIN / "landcover-studio"), str(image), "--model", str(model), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert refused.returncode != 0 and "--allow-remote" in refused.stderr
    assert "Traceback" not in refused.stderr

    members = {"ann": "ann-password-1", "operator": "operator-password-1"}
    (tmp_path / "team").mkdir()
    with contextlib.ExitStack() as team, contextlib.ExitStack() as shared:
        server, _ = team.enter_context(basic_auth_server(tmp_path / "team", members))
        port = free_port()
        command = studio_command(
            scene, port, tmp_path / "session", server, "--host", "0.0.0.0", "--allow-remote"
        )
        operator = {
            "MLFLOW_TRACKING_USERNAME": "operator",
            "MLFLOW_TRACKING_PASSWORD": members["operator"],
        }
        url = f"http://{HOST}:{port}"
        shared.enter_context(
            running(command, f"{url}/health", tmp_path / "studio.log", operator, wait_s=120)
        )
        assert ask(f"{url}/api/scene")[0] == 401  # the browser then asks for credentials
        assert ask(f"{url}/api/scene", "ann", "guess")[0] == 401
        status, state = ask(f"{url}/api/scene", "ann", members["ann"])
        assert status == 200 and state["author"] == "ann"
        stroke = {
            "kind": "paint",
            "points": [[20, 20], [60, 20]],
            "radius": 3,
            "class_index": 0,
            "tab": "t",
        }
        assert ask(f"{url}/api/edits", "ann", members["ann"], stroke)[0] == 200
        status, answer = ask(f"{url}/api/retrain", "ann", members["ann"], {})
        assert status == 200, (tmp_path / "studio.log").read_text()[-3000:]

        # ten wrong logins as the admin (whose password hash is the server's costly default)
        # while ann works: before, each check blocked the event loop and she waited 9.7 s
        guesses = [
            threading.Thread(target=ask, args=(f"{url}/api/scene", "admin", f"guess-{i}"))
            for i in range(10)
        ]
        for guess in guesses:
            guess.start()
        time.sleep(0.3)
        began = time.perf_counter()
        assert ask(f"{url}/api/scene", "ann", members["ann"])[0] == 200
        ann_waited = time.perf_counter() - began
        for guess in guesses:
            guess.join(120)
        for key, value in operator.items():  # read the record back as the operator
            monkeypatch.setenv(key, value)
        run = MlflowClient(server).get_run(answer["version"]["run_id"])

        team.close()  # the team server goes down while the studio runs
        began = time.perf_counter()
        status, refusal = ask_raw(f"{url}/api/scene", "newcomer", "pw")
        down_after = time.perf_counter() - began
    print(f"ann waited {ann_waited:.2f} s during 10 wrong logins; down: {down_after:.1f} s")
    assert ann_waited < 1.0
    assert status == 503 and "does not answer" in refusal and down_after < 15
    assert "Traceback" not in (tmp_path / "studio.log").read_text()
    assert run.info.status == "FINISHED" and run.info.user_id == "operator"
    assert run.data.tags["landcover.studio.author"] == "ann"  # the member who asked for it
    rows = EditLog(tmp_path / "session", image, artifacts.load(str(model)).schema).rows()
    assert [row.author for row in rows] == ["ann"]


def screen_colours(shot: Path, points: list[dict]) -> np.ndarray:
    from PIL import Image

    picture = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    return np.array([picture[int(p["y"]), int(p["x"])] for p in points])


@pytest.mark.slow
@pytest.mark.shared
def test_real_naip_shows_in_true_and_false_colour_in_chromium(scene, shared, tmp_path):
    """A real patch (band 4 tagged alpha, as the USDA tags NAIP): the page's imagery is the
    GeoTIFF's bands after the scene's stretch, in true colour and NIR false colour."""
    from landcover.studio.tiles import Display

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: apt-get install chromium (Debian's package; .ci/run does)")
    image = shared / "data" / "chesapeake-sample" / "val" / "m_3708035_ne_17_1-2_naip-old.tif"
    display = Display.of(image)
    with rasterio.open(image) as src:
        pixels = src.read()
    rng = np.random.default_rng(0)
    sample = rng.integers(8, 248, (300, 2))  # (row, col), away from the edge
    real = (image, scene[1])
    with studio(real, tmp_path, free_port()) as app, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(app.printed)
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.get_by_label("model's map").uncheck()
        page.get_by_label("corrections").uncheck()
        points = page.evaluate(
            "(pixels) => pixels.map(([c, r]) => studio.screenPoint(c + 0.5, r + 0.5))",
            [[int(c), int(r)] for r, c in sample],
        )
        shots = {}
        for kind, label in (
            ("rgb", "imagery (true colour)"),
            ("nir", "imagery (NIR false colour)"),
        ):
            page.get_by_label(label).check()
            page.wait_for_load_state("networkidle")
            time.sleep(0.8)  # tiles fade in
            shots[kind] = tmp_path / f"{kind}.png"
            page.screenshot(path=str(shots[kind]))
        # where to label next: dashed circles on the page, N goes to the first
        page.get_by_label("imagery (true colour)").check()
        page.get_by_label("model's map").check()
        suggested = app.get("/api/suggestions")["suggestions"]
        assert page.get_attribute("body", "data-suggestions") == str(len(suggested)) != "0"
        page.evaluate("() => document.activeElement.blur()")  # keys go to the map, not a box
        page.keyboard.press("n")
        page.wait_for_selector("body[data-suggestion-at='0']", timeout=5_000)
        first = suggested[0]
        centre = page.evaluate(f"() => studio.screenPoint({first['col']}, {first['row']})")
        box = page.evaluate(
            "() => { const b = document.getElementById('map').getBoundingClientRect();"
            " return {x: b.left + b.width / 2, y: b.top + b.height / 2}; }"
        )
        assert abs(centre["x"] - box["x"]) < 40 and abs(centre["y"] - box["y"]) < 40
        assert "1 of" in page.inner_text("#suggestion")
        page.screenshot(path=str(tmp_path / "suggestions.png"))
        browser.close()
    if os.environ.get("LANDCOVER_STUDIO_SHOTS"):
        shutil.copy(tmp_path / "suggestions.png", os.environ["LANDCOVER_STUDIO_SHOTS"])
    for kind, shot in shots.items():
        seen = screen_colours(shot, points)
        bands = np.array(display.bands(kind)) - 1
        chosen = pixels[bands][:, sample[:, 0], sample[:, 1]]  # (3, points)
        expected = np.round(display.stretched(chosen[:, :, None], kind)[:, :, 0] * 255).T
        difference = np.abs(seen - expected)
        print(f"{kind}: mean |screen - GeoTIFF after stretch| {difference.mean():.1f}")
        assert seen.std() > 20, kind  # a picture, not a grey ghost
        assert np.median(difference) <= 12, kind  # the page's zoom resamples the tiles
