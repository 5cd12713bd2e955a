"""Files, settings and servers that are not what a command expects (issue "No other page,
model file or request can drive, script or stall the studio and the commands"): each is one
line, quickly, and nothing is deleted or left behind. Each failed on the code before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.local_server import free_port
from tests.test_faults import random_raster, tiny_model_checkpoint
from tests.test_faults_silent import logged_tiny_model

BIN = Path(sys.executable).parent

BILLION_LAUGHS = """flavors:
  landcover: {format: 1}
  python_function:
    loader_module: landcover.serving
    code: &l9 [*l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8, *l8]
"""


def billion_laughs() -> str:
    """A 2 KB MLmodel whose `code` stands for 9^9 strings through YAML aliases."""
    lines = ['a: &l0 ["lol"]']
    lines += [f"b{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + BILLION_LAUGHS


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    began = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    return done, time.perf_counter() - began


def one_line(stderr: str) -> str:
    """The command's one error line (after a prompt on the same line, if one was shown)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line[line.index("error:") :] for line in stderr.splitlines() if "error:" in line]
    assert lines, stderr[-2000:]
    return lines[-1]


GUARD = """
import resource, sys, time
from landcover.artifacts.mlmodel_guard import ForeignModelError, check_mlmodel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
began = time.perf_counter()
try:
    check_mlmodel(sys.argv[1], require_flavor=True)
    print("accepted")
except ForeignModelError as err:
    print("refused:", err)
print(time.perf_counter() - began)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (billion_laughs().encode(), "anchors or aliases"),
        (b"flavors: {landcover: {}}\nfiller: '" + b"x" * 4_000_000 + b"'\n", "over 256 KiB"),
        (
            "flavors:\n  landcover: {format: 1}\n".encode("utf-16"),
            "not UTF-8",
        ),
    ],
    ids=["billion-laughs", "4-MB", "utf-16"],
)
def test_a_hostile_mlmodel_is_refused_in_under_a_second_and_100_mb(tmp_path, content, expected):
    """Before: the billion laughs ran the guard 71-131 s into a MemoryError at 3.9 GB; a 4 MB
    MLmodel took 135 s and 1.35 GB; a UTF-16 one was a traceback."""
    (tmp_path / "MLmodel").write_bytes(content)
    done, _ = run([sys.executable, "-c", GUARD, str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    verdict, seconds, grown_mib = done.stdout.strip().splitlines()
    print(verdict[:200], seconds, grown_mib)
    assert verdict.startswith("refused:") and expected in verdict
    assert float(seconds) < 1.0 and float(grown_mib) < 100
    assert len(verdict) < 400  # the offending value is never quoted whole


def test_the_guard_quotes_a_bounded_excerpt_of_foreign_code(tmp_path):
    from landcover.artifacts.mlmodel_guard import ForeignModelError, check_mlmodel

    code = ["x" * 5000] * 20
    mlmodel = {
        "flavors": {"landcover": {}, "python_function": {"loader_module": "evil", "code": code}}
    }
    (tmp_path / "MLmodel").write_text(json.dumps(mlmodel))  # JSON is YAML
    with pytest.raises(ForeignModelError, match="loader_module 'evil'") as refused:
        check_mlmodel(tmp_path)
    assert len(str(refused.value)) < 800


def cache_command(argv: list[str]) -> str:
    """`landcover-cache ARGV` run in this process (its console script's entry point): the
    message it exits with ("" when it exits 0)."""
    from landcover.predict.compile_cache import main

    try:
        main(argv)
    except SystemExit as stop:
        assert stop.code not in (0, None), stop.code
        return str(stop.code)
    return ""


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("env", "abc"),
        ("arg", "nan"),
        ("arg", "inf"),
        ("arg", "1e400"),
        ("arg", "-1"),
        ("arg", "ten"),
    ],
)
def test_a_cache_size_that_is_not_a_size_is_one_line_and_removes_nothing(
    tmp_path, monkeypatch, setting, value
):
    """Before: LANDCOVER_CACHE_MAX_MB=abc and --max-mb nan/inf/1e400 were tracebacks, and
    --max-mb -1 emptied the cache."""
    graph = tmp_path / "compiled" / f"{'a' * 32}.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"\0" * 1000)
    monkeypatch.setenv("LANDCOVER_CACHE_DIR", str(tmp_path))
    argv = ["prune"]
    if setting == "env":
        monkeypatch.setenv("LANDCOVER_CACHE_MAX_MB", value)
    else:
        argv += ["--max-mb", value]
    message = cache_command(argv)
    assert message.startswith("error:") and "size limit" in message and "\n" not in message
    assert graph.exists()


def test_prune_never_follows_a_linked_cache_folder_nor_removes_what_is_not_a_graph(
    tmp_path, monkeypatch
):
    """Before: `prune` deleted the files of whatever folder `compiled/` linked to."""
    elsewhere = tmp_path / "my-models"
    elsewhere.mkdir()
    precious = elsewhere / "field-survey.onnx"
    precious.write_bytes(b"\0" * 1000)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "compiled").symlink_to(elsewhere)
    monkeypatch.setenv("LANDCOVER_CACHE_DIR", str(tmp_path / "cache"))
    assert "is a link" in cache_command(["prune", "--max-mb", "0"])
    assert precious.exists()
    (tmp_path / "cache" / "compiled").unlink()  # a real cache folder with a stranger in it
    (tmp_path / "cache" / "compiled").mkdir()
    stranger = tmp_path / "cache" / "compiled" / "notes.onnx"
    stranger.write_bytes(b"\0" * 1000)
    assert cache_command(["prune", "--max-mb", "0"]) == ""
    assert stranger.exists()


def dead_server() -> str:
    """A tracking URI where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.slow  # starts a command that loads torch
def test_a_command_needing_a_down_tracking_server_says_so_in_seconds(tmp_path):
    """Before: landcover-team took 252 s to say "INTERNAL_ERROR"; landcover-predict with a run
    id and a studio against a down team server failed after about 260 s."""
    server = dead_server()
    image = random_raster(tmp_path / "scene.tif", 64)
    commands = {
        "team": [str(BIN / "landcover-team"), "show", "bob", "--experiment", "x"],
        "predict": [
            str(BIN / "landcover-predict"),
            "model=0123456789abcdef0123456789abcdef",
            f"input={image}",
            f"output={tmp_path / 'map.tif'}",
            f"tracking.uri={server}",
        ],
        "studio": [
            str(BIN / "landcover-studio"),
            str(image),
            "--model",
            str(tiny_model_checkpoint(tmp_path)),
            "--tracking-uri",
            server,
            "--session",
            str(tmp_path / "session"),
        ],
    }
    for name, command in commands.items():
        done, seconds = run(command, tmp_path, {"MLFLOW_TRACKING_URI": server})
        line = one_line(done.stderr)
        print(f"{name}: {seconds:.1f} s: {line}")
        assert done.returncode != 0 and seconds < 15, (name, seconds)
        assert "does not answer" in line and server in line, line
        assert "INTERNAL_ERROR" not in done.stderr


@pytest.mark.slow  # starts a command that loads torch
def test_landcover_team_refuses_a_wrong_scheme_and_a_closed_stdin_in_one_line(tmp_path):
    """Before: `httpfoo://` was taken for a server, and add-user with stdin closed ended in
    an EOFError traceback."""
    done, _ = run(
        [str(BIN / "landcover-team"), "show", "bob", "--experiment", "x", "--tracking-uri",
         "httpfoo://127.0.0.1:1"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode != 0 and "http(s)://" in done.stderr and "Traceback" not in done.stderr
    from tests.servers import basic_auth_server

    with basic_auth_server(tmp_path, {}) as (url, _):
        env = {"LANDCOVER_NEW_USER_PASSWORD": "", "MLFLOW_TRACKING_URI": url}
        done, _ = run([str(BIN / "landcover-team"), "add-user", "bob"], tmp_path, env)
    assert done.returncode != 0 and "LANDCOVER_NEW_USER_PASSWORD" in one_line(done.stderr)


@pytest.mark.slow  # starts a command that loads torch
def test_a_single_file_failure_names_no_manifest(tmp_path):
    """Before: mapping one file that failed said "see <folder>/manifest.csv", a file a single
    map never writes."""
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\0" + b"\0" * 100)  # a TIFF header, no image
    done, _ = run(
        [
            str(BIN / "landcover-predict"),
            f"model={tiny_model_checkpoint(tmp_path)}",
            f"input={broken}",
            f"output={tmp_path / 'map.tif'}",
            "log_to_mlflow=false",
        ],
        tmp_path,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "manifest.csv" not in done.stderr, done.stderr[-1500:]
    assert not (tmp_path / "manifest.csv").exists()


@pytest.mark.slow
def test_landcover_serve_leaves_no_model_copy_and_refuses_lying_metadata_in_one_line(tmp_path):
    """Before: every landcover-serve left its 55 MB model copy in /tmp, and a model whose
    metadata lies (bands: 3000000) was a traceback in MLflow's worker."""
    import mlflow

    from tests.local_server import HOST, http, running

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    uri, run_id = logged_tiny_model(tmp_path)
    env = {"MLFLOW_TRACKING_URI": uri, "TMPDIR": str(scratch)}
    port = free_port()
    command = [str(BIN / "landcover-serve"), f"runs:/{run_id}/model", "--port", str(port)]
    with running(command, f"http://{HOST}:{port}/ping", tmp_path / "serve.log", env) as server:
        assert http(f"http://{HOST}:{port}/ping")[0] == 200
        assert list(scratch.glob("landcover-serve-*"))  # its private copy, while it serves
    assert server.returncode is not None
    assert not list(scratch.glob("landcover-serve-*"))  # gone with the server

    stale = scratch / "landcover-serve-dead"  # a copy of a server killed with SIGKILL
    stale.mkdir()
    (stale / ".owner-pid").write_text(str(2**22 + 1))  # no such process
    mlflow.set_tracking_uri(uri)
    local = Path(
        mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "m"))
    )
    metadata = json.loads((local / "landcover_model.json").read_text())
    metadata["bands"] = 3_000_000
    (local / "landcover_model.json").write_text(json.dumps(metadata))
    done, seconds = run([str(BIN / "landcover-serve"), str(local), "--port", "1"], tmp_path, env)
    line = one_line(done.stderr)
    assert done.returncode != 0 and "bands = 3000000" in line, line
    assert not list(scratch.glob("landcover-serve-*"))  # its own copy and the dead one's


@pytest.mark.slow  # starts a command that loads torch
def test_a_studio_session_folder_that_is_not_utf8_is_one_line(tmp_path):
    """Before: a session folder named in Latin-1 was a UnicodeEncodeError traceback from
    rasterio's writer, with the folder left behind."""
    image = random_raster(tmp_path / "scene.tif", 64)
    session = os.fsdecode(bytes(tmp_path) + b"/sess-\xe9t\xe9")
    done, _ = run(
        [str(BIN / "landcover-studio"), str(image), "--model",
         str(tiny_model_checkpoint(tmp_path)), "--session", session],
        tmp_path,
    )  # fmt: skip
    assert done.returncode != 0 and "not UTF-8" in one_line(done.stderr)
    assert not os.path.exists(session)
