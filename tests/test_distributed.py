"""Data-parallel training with torchrun on CPU (gloo): the same steps as one process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.test_train_e2e import tiny_overrides

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# Float sums in another order (two half batches) differ by ~1e-5 in a gradient, and training
# amplifies such noise step by step; after k = 2 steps the parameters agree to 1e-4, while a
# wrong step (other patches, per-rank batch norm, summed instead of averaged gradients) moves
# them by more than 1e-2.
TOLERANCE = 1e-4


def launch(command: list[str], cwd: Path) -> None:
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def overrides(root: Path, tmp: Path) -> list[str]:
    return tiny_overrides(
        root,
        tmp,
        "trainer.max_epochs=2",
        "trainer.keep_epoch_checkpoints=2",
        "trainer.num_panels=1",
        "trainer.num_threads=1",
        # plain SGD: Adam turns float noise in near-zero gradients into lr-sized steps, which
        # would hide a real difference behind an arbitrary one
        "optimizer=sgd",
        "optimizer.lr=0.05",
        "data.patches_per_epoch=8",
        "data.batch_size=8",  # the global batch: 4 per process with two processes; k = 2 steps
        "trainer.checkpoint_dir=checkpoints",
        f"hydra.run.dir={tmp / 'run'}",
    )


@pytest.fixture(scope="module")
def runs(tiny_synthetic, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    launch([str(BIN / "landcover-train"), *overrides(tiny_synthetic, single)], single)
    double = tmp_path_factory.mktemp("ddp")
    scratch = set(Path(tempfile.gettempdir()).glob("landcover-rank*"))
    launch(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "landcover.training.train",
            *overrides(tiny_synthetic, double),
        ],
        double,
    )
    # rank 1's scratch Hydra folder is gone with it
    assert set(Path(tempfile.gettempdir()).glob("landcover-rank*")) <= scratch
    return single, double


def test_two_processes_take_the_steps_of_one(runs):
    single, double = runs
    one = torch.load(single / "run/checkpoints/last.pt", weights_only=False)["model"]
    two = torch.load(double / "run/checkpoints/last.pt", weights_only=False)["model"]
    assert one.keys() == two.keys()
    worst = max(
        (one[k].float() - two[k].float()).abs().max().item()
        for k in one
        if one[k].is_floating_point()
    )
    assert worst < TOLERANCE, f"parameters differ by {worst}"
    # and training moved them: the comparison is not between two untouched models
    first = torch.load(single / "run/checkpoints/epoch_000.pt", weights_only=False)["model"]
    moved = max((one[k] - first[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert moved > 100 * TOLERANCE


def test_one_mlflow_run_one_output_folder_one_set_of_metrics(runs):
    single, double = runs
    client = MlflowClient(f"sqlite:///{double / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "val/mIoU")
    assert [point.step for point in history] == [0, 1]
    # validation is summed over both ranks' tiles: the same confusion matrix as one process
    single_run = MlflowClient(f"sqlite:///{single / 'mlflow.db'}").search_runs(
        [
            MlflowClient(f"sqlite:///{single / 'mlflow.db'}")
            .get_experiment_by_name("e2e")
            .experiment_id
        ]
    )[0]
    for key in ("val/overall_accuracy", "val/mIoU"):
        assert abs(run.data.metrics[key] - single_run.data.metrics[key]) < 1e-3
    assert sorted(p.name for p in (double / "run").iterdir()) == sorted(
        p.name for p in (single / "run").iterdir()
    )
