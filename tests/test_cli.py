"""The console script as a user meets it: --help, --cfg job, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "landcover-train"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed (run `make setup`)")
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_config_groups(tmp_path):
    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0
    for group in ("data:", "model:", "trainer:", "optimizer:", "experiment:"):
        assert group in out.stdout
    assert "chesapeake_sample" in out.stdout and "deeplabv3plus" in out.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = run("--cfg", "job", "model=fpn", "model.encoder_name=resnet34", cwd=tmp_path)
    assert out.returncode == 0
    assert "arch: fpn" in out.stdout and "encoder_name: resnet34" in out.stdout


def test_bad_value_is_one_clear_error_before_any_work(tmp_path):
    out = run("trainer.max_epochs=lots", cwd=tmp_path)
    assert out.returncode != 0
    assert "trainer.max_epochs" in out.stderr and "lots" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded for a bad config


def test_a_mistyped_key_gets_the_closest_one_suggested(tmp_path):
    out = run("trainer.max_epoch=3", cwd=tmp_path)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert "trainer.max_epoch" in last and last.endswith("(did you mean max_epochs?)"), last


def test_missing_data_is_named(tmp_path):
    out = run("data=geotiff", f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert out.returncode != 0
    assert "found no scenes" in out.stderr and "nowhere" in out.stderr


@pytest.mark.parametrize("command", ["landcover-predict", "landcover-evaluate", "landcover-export"])
def test_mapping_commands_report_a_missing_model_in_one_line(tmp_path, command):
    missing = f"model={tmp_path / 'missing.onnx'}"
    arguments = {
        "landcover-predict": [f"input={SCRIPT}", f"output={tmp_path / 'out.tif'}"],
        "landcover-evaluate": ["data=synthetic", f"data.root={tmp_path}"],
        "landcover-export": [f"output={tmp_path / 'out.onnx'}"],
    }[command]
    out = subprocess.run(
        [str(SCRIPT.parent / command), missing, *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "error:" in out.stderr and "missing.onnx" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_failed_command_leaves_no_empty_folders(tmp_path):
    """Refused before any work: no `outputs/<date>/<time>/` holding only the config and the
    error, no output folder holding only its lock (the job's FAILED run stays in MLflow)."""
    refused = run("trainer.max_epochs=-3", cwd=tmp_path)
    assert refused.returncode != 0 and "max_epochs" in refused.stderr
    predicted = subprocess.run(
        [
            str(SCRIPT.parent / "landcover-predict"),
            f"model={tmp_path / 'missing.pt'}",
            f"input={SCRIPT}",
            "output=maps/deep/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert predicted.returncode != 0 and "missing.pt" in predicted.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "outputs" not in left and "maps" not in left, left


BAD_VALUES = {
    "landcover-predict": ["model=x", "input=y", "output=z", "predict.tile_size=abc"],
    "landcover-evaluate": ["model=x", "data=synthetic", "data.root=nowhere", "predict.overlap=abc"],
    "landcover-export": ["model=x", "output=y.onnx", "opset=abc"],
    "landcover-promote": ["filters.min_epochs=abc"],
    "landcover-import-cntk": ["x.model", "evaluate_split=[1,2]"],
    "landcover-train": ["optimizer.lr=abc"],
}
UNKNOWN_KEYS = {
    "landcover-predict": ["model=x", "input=y", "output=z", "+predict.tile_sze=5"],
    "landcover-evaluate": ["model=x", "+evaluate.treshold=0.5"],
    "landcover-export": ["model=x", "output=y.onnx", "+opsett=3"],
    "landcover-promote": ["+registry.nam=x"],
    "landcover-import-cntk": ["x.model", "+schemma=x"],
    "landcover-train": ["+trainer.max_epoch=3"],
}


@pytest.mark.parametrize("cases", [BAD_VALUES, UNKNOWN_KEYS], ids=["wrong type", "unknown key"])
@pytest.mark.parametrize("command", sorted(BAD_VALUES))
def test_a_config_mistake_is_one_line_naming_the_key(tmp_path, command, cases):
    """Before any other check (the model `x` and input `y` do not exist either)."""
    arguments = cases[command]
    key = arguments[-1].lstrip("+").split("=")[0]
    out = subprocess.run(
        [str(SCRIPT.parent / command), *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config value") and key in last, out.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_help_lists_only_its_own_groups(tmp_path):
    """(How fast --help answers is measured by experiments/bench_cli.py.)"""
    train_help = run("--help", cwd=tmp_path).stdout
    assert "commands" not in train_help  # the other commands' groups are not train's
    predict_help = subprocess.run(
        [str(SCRIPT.parent / "landcover-predict"), "--help"], capture_output=True, text=True
    ).stdout
    assert "tracking: default" in predict_help and "model:" not in predict_help
