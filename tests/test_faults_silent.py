"""The faults that passed silently (issue "Nothing lost, nothing corrupt, nothing run"): each
test reproduces one case that the code before it let through with exit 0, a traceback or a
corrupt file, and checks the one-line refusal or the intact result instead."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from tests.conftest import mount_tmpfs
from tests.test_faults import random_raster, tiny_model_checkpoint
from tests.test_mapping_job import job_command

BIN = Path(sys.executable).parent


@pytest.fixture
def model(tmp_path) -> Path:
    (tmp_path / "in").mkdir()
    return tiny_model_checkpoint(tmp_path)


def run_job(tmp: Path, inputs: str, folder: Path, model: Path, *extra: str):
    return subprocess.run(
        job_command(tmp, inputs, folder, *extra, model=model),
        cwd=tmp,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )


def rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "manifest.csv").open(errors="surrogateescape") as handle:
        return {Path(r["input"]).name: r for r in csv.DictReader(handle)}


def unreadable_maps(folder: Path) -> list[str]:
    bad = []
    for path in folder.rglob("*.tif"):
        try:
            with rasterio.open(path) as src:
                for _, window in src.block_windows(1):
                    src.read(1, window=window)
        except rasterio.errors.RasterioError:
            bad.append(path.name)
    return bad


@pytest.mark.slow
def test_a_full_disk_in_a_mapping_job_publishes_no_corrupt_map(tmp_path, model):
    """With about 1.4 MB free GDAL once wrote a second map's TIFF directory into no space,
    logged it at INFO, and the map (103 kB of a 180 kB file) was published and marked done;
    a re-run then skipped it for ever."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=3m")
    try:
        for index in range(2):  # the first map fits; the second did not, and was published
            random_raster(tmp_path / "in" / f"s{index}.tif", 1024)
        inputs = f"{tmp_path}/in/*.tif"
        free = os.statvfs(disk)
        filler = disk / "filler"
        filler.write_bytes(b"\1" * (free.f_bavail * free.f_frsize - 1_400_000))
        folder = disk / "maps"
        full = run_job(tmp_path, inputs, folder, model)
        assert full.returncode == 1, (full.stdout + full.stderr)[-3000:]
        states = {name: row["status"] for name, row in rows(folder).items()}
        assert "failed" in states.values(), states
        assert "no space left" in full.stderr
        assert unreadable_maps(folder) == []
        for name, row in rows(folder).items():  # every map said done is whole
            if row["status"] == "done":
                assert Path(row["output"]).stat().st_size == int(row["bytes"]), name

        filler.unlink()  # space freed: the re-run maps what failed, and only that
        again = run_job(tmp_path, inputs, folder, model)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        assert {row["status"] for row in rows(folder).values()} == {"done"}
        one_shot = run_job(tmp_path, inputs, tmp_path / "one_shot", model)
        assert one_shot.returncode == 0
        totals = json.loads((folder / "area_totals.json").read_text())
        assert totals == json.loads((tmp_path / "one_shot" / "area_totals.json").read_text())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_map_never_replaces_its_input(tmp_path, model):
    scene = random_raster(tmp_path / "scene.tif", 64)
    before = scene.read_bytes()
    same = subprocess.run(
        [
            str(BIN / "landcover-predict"),
            f"model={model}",
            f"input={scene}",
            f"output={scene}",
            "log_to_mlflow=false",
            "predict.progress=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert same.returncode == 1
    assert f"the map would replace its input {scene}" in same.stderr.strip().splitlines()[-1]
    assert scene.read_bytes() == before


def test_a_manifest_is_a_cache_a_foreign_map_in_it_is_not_trusted(tmp_path, model):
    for index in range(3):
        random_raster(tmp_path / "in" / f"t{index}.tif", 64)
    folder = tmp_path / "maps"
    assert run_job(tmp_path, f"{tmp_path}/in/*.tif", folder, model).returncode == 0
    foreign = random_raster(tmp_path / "foreign.tif", 64)
    manifest = (folder / "manifest.csv").read_text()
    (folder / "manifest.csv").write_text(
        manifest.replace(str(folder / "t1_landcover.tif"), str(foreign))
    )
    (folder / "t2_landcover.tif").write_bytes(b"not the map that was published")
    again = run_job(tmp_path, f"{tmp_path}/in/*.tif", folder, model)
    said = again.stdout + again.stderr
    assert again.returncode == 0, said[-3000:]
    assert "1 of 3 inputs already mapped" in said  # t0 only: t1 and t2 mapped again
    assert {r["output"] for r in rows(folder).values()} == {
        str(folder / f"t{i}_landcover.tif") for i in range(3)
    }
    assert unreadable_maps(folder) == []


def test_a_file_name_that_is_not_utf8_maps_and_resumes(tmp_path, model):
    folder_in = tmp_path / "in"
    random_raster(tmp_path / "plain.tif", 64)
    os.rename(tmp_path / "plain.tif", os.fsencode(folder_in) + b"/caf\xe9.tif")
    random_raster(folder_in / "ok.tif", 64)
    folder = tmp_path / "maps"
    first = run_job(tmp_path, f"{folder_in}/*.tif", folder, model)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert len(rows(folder)) == 2 and {r["status"] for r in rows(folder).values()} == {"done"}
    again = run_job(tmp_path, f"{folder_in}/*.tif", folder, model)
    assert again.returncode == 0 and "2 of 2 inputs already mapped" in again.stdout + again.stderr


def test_a_read_only_output_folder_is_one_line(tmp_path, model):
    random_raster(tmp_path / "in" / "a.tif", 64)
    random_raster(tmp_path / "in" / "b.tif", 64)
    locked = tmp_path / "locked"
    mount_tmpfs(locked, "size=1m", "ro")
    try:
        out = run_job(tmp_path, f"{tmp_path}/in/*.tif", locked, model)
        assert out.returncode == 1
        assert "Traceback" not in out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {locked}: read-only"), last
    finally:
        subprocess.run(["umount", "-l", str(locked)], check=False)


def test_a_link_planted_in_the_output_folder_is_replaced_not_followed(tmp_path, model):
    random_raster(tmp_path / "in" / "a.tif", 64)
    random_raster(tmp_path / "in" / "b.tif", 64)
    folder = tmp_path / "maps"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("mosaic.png", "mosaic.vrt", "manifest.csv", "a_landcover.tif"):
        (folder / name).symlink_to(victim)
    out = run_job(tmp_path, f"{tmp_path}/in/*.tif", folder, model)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert victim.read_text() == "precious"
    assert not [p.name for p in folder.iterdir() if p.is_symlink()]


def logged_tiny_model(tmp: Path) -> tuple[str, str]:
    """The tiny test U-Net logged as training logs a model; returns (tracking uri, run id)."""
    import torch

    from landcover.models import build_model
    from landcover.tracking import runs as tracking

    checkpoint = torch.load(tiny_model_checkpoint(tmp), weights_only=True)
    metadata = checkpoint["metadata"]
    module = build_model(
        metadata["model"],
        in_channels=4,
        num_classes=len(metadata["schema"]["classes"]),
        **metadata["normalize"],
    )
    module.load_state_dict(checkpoint["model"])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with tracking.start_run(uri, "foreign") as run:
        tracking.log_landcover_model(module.eval(), metadata)
    return uri, run.info.run_id


def logged_model_with_foreign_loader(tmp: Path) -> tuple[str, str, Path]:
    """A real logged landcover model whose MLmodel was edited to load `evilmod` from a `code`
    folder (which would write a marker file when imported); returns (uri, run id, marker)."""
    import mlflow
    import yaml

    from landcover.tracking import runs as tracking

    uri, run_id = logged_tiny_model(tmp)
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    model_dir = tmp / "edited"
    import shutil

    shutil.copytree(local, model_dir)
    marker = tmp / "pwned"
    (model_dir / "code").mkdir()
    (model_dir / "code" / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "def _load_pyfunc(path, model_config=None):\n    return None\n"
    )
    document = yaml.safe_load((model_dir / "MLmodel").read_text())
    document["flavors"]["python_function"]["loader_module"] = "evilmod"
    document["flavors"]["python_function"]["code"] = "code"
    (model_dir / "MLmodel").write_text(yaml.safe_dump(document))
    with tracking.start_run(uri, "foreign") as edited:
        mlflow.log_artifacts(str(model_dir), "model")
    return uri, edited.info.run_id, marker


def test_a_model_naming_another_loader_is_refused_before_any_import(tmp_path):
    from landcover import artifacts
    from landcover.artifacts.mlmodel_guard import ForeignModelError

    uri, run_id, marker = logged_model_with_foreign_loader(tmp_path)
    with pytest.raises(ForeignModelError, match="loader_module 'evilmod'"):
        artifacts.load(run_id, tracking_uri=uri)
    with pytest.raises(ForeignModelError, match="loader_module 'evilmod'"):
        artifacts.load(str(tmp_path / "edited"))  # the same folder handed over on disk
    served = subprocess.run(
        [str(BIN / "landcover-serve"), f"runs:/{run_id}/model", "--port", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert served.returncode != 0
    last = served.stderr.strip().splitlines()[-1]
    assert "refused before loading" in last and "loader_module 'evilmod'" in last, last
    assert "code path 'code'" in last
    predicted = subprocess.run(
        [
            str(BIN / "landcover-predict"),
            f"model={run_id}",
            f"input={random_raster(tmp_path / 's.tif', 64)}",
            f"output={tmp_path / 'map.tif'}",
            f"tracking.uri={uri}",
            "predict.progress=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 1 and "refused before loading" in predicted.stderr
    assert not marker.exists()
    assert not (tmp_path / "map.tif").exists()


def peak_rss_mib(group: int) -> float:
    """The largest VmHWM among the processes of a process group (the server and its workers)."""
    peak = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            if os.getpgid(int(status.parent.name)) != group:
                continue
        except (OSError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


@pytest.mark.slow
def test_serving_counts_what_it_computes_and_bounds_memory(tmp_path):
    """200 patches of 1 x 1 (6.6 kB of JSON) were counted as 200 pixels, computed as 200
    padded patches at once (5.8 GB, a 504 after 60 s, and the work went on); a request of
    exactly the budget took 6.3 GB."""
    import time

    import numpy as np

    from landcover.serving.pyfunc import DEFAULT_MAX_PIXELS
    from tests.servers import HOST, free_port, http, running

    patches = DEFAULT_MAX_PIXELS // (512 * 512)  # a request of exactly the budget
    uri, run_id = logged_tiny_model(tmp_path)
    port = free_port()
    command = [str(BIN / "landcover-serve"), f"runs:/{run_id}/model", "--port", str(port)]
    base = f"http://{HOST}:{port}"
    env = {"MLFLOW_TRACKING_URI": uri}
    with running(command, f"{base}/ping", tmp_path / "serve.log", env) as server:
        started = time.monotonic()
        status, body = http(f"{base}/invocations", {"inputs": np.ones((200, 4, 1, 1)).tolist()})
        seconds = time.monotonic() - started
        assert 400 <= status < 500 and seconds < 5, (status, body[:300], seconds)
        assert b"patches" in body
        budget = (
            np.random.default_rng(0).integers(0, 255, (patches, 4, 512, 512)).astype(np.float32)
        )
        status, body = http(f"{base}/invocations", {"inputs": budget.tolist()}, timeout=300)
        assert status == 200, body[:300]
        assert np.asarray(json.loads(body)["predictions"]).shape == (patches, 512, 512)
        peak = peak_rss_mib(os.getpgid(server.pid))
        print(f"serving peak RSS: {peak:.0f} MiB")
        assert peak < 2048, peak


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.__setitem__("bands", 3_000_000), "bands = 3000000"),
        (lambda m: m["model"].__setitem__("arch", "hypernet"), "unknown architecture"),
        (lambda m: m["model"].pop("arch"), "names no architecture"),
        (
            lambda m: m["model"].__setitem__("encoder_name", "tu-hf-hub:evil/net"),
            "without a download",
        ),
    ],
)
def test_model_metadata_out_of_bounds_is_one_error_before_any_allocation(tmp_path, edit, expected):
    import mlflow

    from landcover import artifacts
    from landcover.artifacts.bounds import StoredModelError

    uri, run_id = logged_tiny_model(tmp_path)
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    metadata = json.loads((local / "landcover_model.json").read_text())
    edit(metadata)
    (local / "landcover_model.json").write_text(json.dumps(metadata))
    from landcover.tracking import runs as tracking

    with tracking.start_run(uri, "edited") as edited:
        mlflow.log_artifacts(str(local), "model")
    with pytest.raises(StoredModelError, match=expected):
        artifacts.load(edited.info.run_id, tracking_uri=uri)


def loky_workers(parent: int) -> list[int]:
    """Process ids of joblib's (loky) workers below `parent`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and b"popen_loky" in cmdline:  # not its resource tracker
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_joblib_sweep_survives_a_killed_worker(tmp_path):
    """SIGKILL of one loky worker ended the whole sweep with a TerminatedWorkerError traceback,
    killed the other trial too and left trials, the parent and child runs RUNNING."""
    import signal
    import time

    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from tests.test_sweep import sweep_command, write_sweep

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="joblib launcher missing")
    config_dir = write_sweep(
        tmp_path,
        "kill",
        """hydra:
  sweeper:
    study_name: kill
    n_trials: 2
    pruner: {name: none}
    params:
      trainer.max_epochs: choice(3)
      optimizer.lr: tag(log, interval(1e-4, 1e-2))
""",
    )
    command = sweep_command(
        tmp_path,
        config_dir,
        "hydra/launcher=joblib",
        "hydra.sweeper.n_jobs=2",
        "trainer.num_threads=1",
        "data.patches_per_epoch=48",
        sweep="kill",
    )
    sweep = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while len(loky_workers(sweep.pid)) < 2:
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no joblib workers appeared"
        time.sleep(0.2)
    time.sleep(4)  # both trials are training by now (each takes over 10 s)
    os.kill(loky_workers(sweep.pid)[0], signal.SIGKILL)
    out, err = sweep.communicate(timeout=900)
    said = out + err
    assert sweep.returncode == 0, said[-4000:]
    assert "TerminatedWorkerError" in said and "a replacement runs it again" in said
    trials = optuna.load_study(
        study_name="kill", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    ).get_trials()
    from landcover.sweep.study import REPLACES, counting

    summary = [(t.number, t.state.name, t.user_attrs) for t in trials]
    lost = [t for t in trials if "the launcher lost the job" in t.user_attrs.get("fail_reason", "")]
    assert lost, summary  # the killed worker's trial, and any other the broken pool took
    replaced = {t.user_attrs[REPLACES] for t in trials if REPLACES in t.user_attrs}
    assert {t.number for t in lost} <= replaced, summary  # each one run again
    counted = counting(trials)
    assert len(counted) == 2 and all(t.state.is_finished() for t in counted), summary
    assert sum(t.state == TrialState.COMPLETE for t in counted) >= 1, summary
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_a_temporary_file_of_a_killed_save_is_removed_by_the_next(tmp_path):
    """SIGKILL during a checkpoint save left `tmpXXXX.tmp.pt` beside it that nothing removed."""
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from pathlib import Path\n"
            "from landcover.atomic import atomic_target\n"
            f"with atomic_target(Path({str(tmp_path / 'last.pt')!r})) as tmp:\n"
            "    tmp.write_bytes(b'half a checkpoint')\n"
            "    os.kill(os.getpid(), 9)\n",
        ],
        capture_output=True,
    )
    assert killed.returncode == -9
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.pt")]  # what it left
    import torch

    from landcover.artifacts.checkpoint import save_checkpoint

    save_checkpoint({"w": torch.zeros(3)}, tmp_path / "last.pt")  # the next run's save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


TAKE_LOCK = """
import sys, threading
from landcover.locks import store_lock
done = threading.Event()
def take():
    with store_lock(sys.argv[1], "registry"):
        done.set()
threading.Thread(target=take, daemon=True).start()
print("taken" if done.wait(1.5) else "waiting")
"""


def test_the_store_lock_is_one_however_the_path_is_spelt(tmp_path):
    """The same SQLite file named through a link took another lock (two registry versions
    for one run in 2 of 5 rounds); through a hard link, under another name, it still did
    (2 versions once in 3 rounds, issue 33). Another process asks for the lock by the real
    name while this one holds it by another."""
    from landcover.locks import store_lock

    real = tmp_path / "store" / "mlflow.db"
    real.parent.mkdir()
    real.touch()
    (tmp_path / "team.db").symlink_to(real)  # another name for the same database file
    os.link(real, real.parent / "other-name.db")  # and a hard link: a third name
    for other in (tmp_path / "team.db", real.parent / "other-name.db"):
        with store_lock(f"sqlite:///{other}", "registry"):
            asked = subprocess.run(
                [sys.executable, "-c", TAKE_LOCK, f"sqlite:///{real}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert asked.stdout.strip() == "waiting", (other.name, asked.stdout, asked.stderr)


def test_a_diverging_training_is_one_line(tmp_path, tiny_synthetic):
    from tests.test_train_e2e import tiny_overrides

    out = subprocess.run(
        [
            str(BIN / "landcover-train"),
            *tiny_overrides(tiny_synthetic, tmp_path, "optimizer.lr=1e30"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: loss became")


def test_a_truncated_label_file_is_called_truncated(tmp_path):
    import numpy as np

    from tests.conftest import write_raster
    from tests.test_faults import train_fails, usable_scenes

    root = tmp_path / "data"
    usable_scenes(root, size=256)
    label = root / "train" / "s_label.tif"
    # cut short where its georeferencing went too (a copy that stopped early)
    write_raster(label, np.ones((256, 256), np.uint8), crs=None)
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])
    message = train_fails(root, tmp_path)
    assert "s_label.tif: truncated or corrupt" in message, message
    assert "CRS mismatch" not in message


def test_a_stac_document_that_is_a_list_is_one_error(tmp_path):
    from landcover.errors import ConfigError
    from landcover.mapping.inputs import expand

    document = tmp_path / "items.json"
    document.write_text('[{"type": "Feature"}]')
    with pytest.raises(ConfigError, match="a JSON list, not a STAC"):
        expand(str(document))


def test_the_compile_cache_keeps_to_its_size_oldest_use_first(tmp_path, monkeypatch):
    from landcover.predict.compile_cache import main, prune

    monkeypatch.setenv("LANDCOVER_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "compiled"
    (folder / "sources").mkdir(parents=True)
    names = {"new": "0" * 32, "middle": "1" * 32, "old": "2" * 32}  # as model_key names them
    for age, name in enumerate(names.values()):
        graph = folder / f"{name}.onnx"
        graph.write_bytes(b"\0" * 1_000_000)
        os.utime(graph, (1e9 - age * 1000, 1e9))  # last used: new, middle, old
        (folder / "sources" / f"{name}.json").write_text(json.dumps({"graph": graph.name}))
    assert prune(limit=2_100_000) == (1, 1_000_000)
    kept = sorted(p.stem for p in folder.glob("*.onnx"))
    assert kept == sorted([names["middle"], names["new"]])
    assert sorted(p.stem for p in (folder / "sources").iterdir()) == kept
    main(["prune", "--max-mb", "0"])
    assert not list(folder.glob("*.onnx")) and not list((folder / "sources").iterdir())


@pytest.mark.slow
def test_a_finished_sweep_trial_keeps_no_local_checkpoint(tmp_path):
    """A smoke trial kept a 172 MB checkpoint beside the model it had logged."""
    from tests.test_sweep import run_sweep

    run_sweep(tmp_path, "hydra.sweeper.n_trials=1", "tracking.log_model=true")
    assert not list((tmp_path / "multirun").rglob("*.pt"))
