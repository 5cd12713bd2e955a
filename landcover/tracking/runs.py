"""The training run's face on MLflow (`Tracker`) and what every command shares: runs in
the right experiment, provenance tags, the logged model. Each command's own records live
beside it (mapping/job.py, evaluate.py, interop/export.py, sweep/records.py).

A run records the resolved config (flattened params plus the YAML), provenance tags, metrics
per epoch, figures, and the trained model. The model is logged in landcover's own flavour
(`landcover.artifacts.flavour`: safetensors weights plus JSON, never a pickle, so loading it
runs no code from the file; MLflow's "pt2" format would be safe too but freezes input shapes,
and a land cover model must run on any tile size). Explicit pip requirements skip MLflow's
dependency inference (~13 s per log).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec

from landcover import locks
from landcover.errors import RunPrunedError
from landcover.tracking.sqlite_store import prepare_sqlite_store
from landcover.tracking.system_metrics import system_monitors_available

if TYPE_CHECKING:  # a mapping job records its run without ever loading PyTorch
    import torch

log = logging.getLogger("landcover.tracking.runs")

PARAM_VALUE_LIMIT = 500
MODEL_REQUIREMENTS = (
    "torch",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "safetensors",
    "skops",
    "scikit-learn",
)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists become their JSON text (cut to MLflow's limit)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:PARAM_VALUE_LIMIT]
    return flat


def git_state(directory: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the checkout the code runs from ('unknown' outside git)."""
    directory = directory or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}


def environment_tags(device: torch.device) -> dict[str, str]:
    """Machine and library versions, so a result can be reproduced on like hardware."""
    import torch

    tags = {
        "host": platform.node(),
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
    from landcover.cluster import current_node

    node = current_node()  # nodes of one host differ only by their Ray node id
    if node:
        tags["landcover.node"] = node
    return tags


def pinned_requirements() -> list[str]:
    """Installed versions of what a logged model needs (skips MLflow's slow inference)."""
    requirements = []
    for package in MODEL_REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def model_signature(bands: int) -> ModelSignature:
    """The pyfunc (serving) face: (-1, bands, -1, -1) raw pixels -> (-1, -1, -1) class codes
    (a model with a prior layer: one band more, the layer's codes).

    Any batch, any height and width; the PyTorch face returns logits
    (see landcover.artifacts.flavour).
    """
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, bands, -1, -1), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), "class_codes")]),
    )


def start_run(
    uri: str, experiment: str, run_name: str | None = None, tags: Mapping[str, str] | None = None
) -> mlflow.ActiveRun:
    """A plain run for commands other than training (prediction, evaluation, export)."""
    use_experiment(uri, experiment)
    return mlflow.start_run(run_name=run_name, tags=dict(tags or {}))


def use_experiment(uri: str, experiment: str) -> None:
    """Point the fluent API at `experiment` of `uri`, created beside a SQLite store if new (a
    new store's tables built by one process at a time)."""
    prepare_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(
        experiment_id=experiment_id(mlflow.tracking.MlflowClient(uri), experiment)
    )


def log_confusion_matrix(
    matrix: np.ndarray,
    class_names: list[str],
    figure: plt.Figure,
    directory: str = "confusion_matrix",
) -> None:
    """PNG heatmap plus the raw counts as CSV and JSON (for tools, not eyes)."""
    mlflow.log_figure(figure, f"{directory}/confusion_matrix.png")
    plt.close(figure)
    header = "label\\predicted," + ",".join(class_names)
    rows = [
        ",".join([name, *map(str, row)])
        for name, row in zip(class_names, matrix.tolist(), strict=True)
    ]
    mlflow.log_text("\n".join([header, *rows]) + "\n", f"{directory}/confusion_matrix.csv")
    mlflow.log_dict(
        {
            "classes": class_names,
            "matrix": matrix.tolist(),
            "rows": "label",
            "columns": "predicted",
        },
        f"{directory}/confusion_matrix.json",
    )


EXPERIMENT_DESCRIPTION = (
    "Land cover segmentation runs recorded by landcover: each run's description gives its "
    "data, model, best epoch and headline metrics; its Datasets, Model metrics and System "
    "metrics tabs hold the rest."
)


def describe_experiment(client: mlflow.tracking.MlflowClient, experiment: Any) -> None:
    """Open the experiment in MLflow's model-training view (not the GenAI one) with a
    description, once: experiments that already say what they are keep it. A team member
    without the right to edit the experiment records runs all the same."""
    wanted = {
        "mlflow.experimentKind": "custom_model_development",
        "mlflow.note.content": EXPERIMENT_DESCRIPTION,
    }
    for key, value in wanted.items():
        if key not in experiment.tags:
            try:
                client.set_experiment_tag(experiment.experiment_id, key, value)
            except mlflow.exceptions.MlflowException as err:
                log.debug("experiment %s keeps no %s: %s", experiment.name, key, err)
                return


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: a folder beside the
    database file (`<db folder>/mlartifacts/<experiment>`), whatever the working directory.
    MLflow's default, `./mlruns` of whichever directory first created the experiment, scatters
    one store's artifacts over working directories. None: the server decides."""
    database = locks.sqlite_path(tracking_uri)
    if database is None:
        return None
    database = database.resolve()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", experiment)
    if safe != experiment:  # keep two names that sanitise alike apart
        safe = f"{safe}-{zlib.crc32(experiment.encode()):08x}"
    return (database.parent / "mlartifacts" / safe).as_uri()


def experiment_id(client: mlflow.tracking.MlflowClient, experiment: str) -> str:
    """The experiment's id, creating it if needed (artifacts beside a SQLite store); two
    processes creating it at once (parallel sweep slots) both get the one that won."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        # another process may create it first: then get the one that won
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_experiment(
                experiment, artifact_location=artifact_location(client.tracking_uri, experiment)
            )
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise mlflow.exceptions.MlflowException(f"experiment {experiment!r} not created")
    describe_experiment(client, found)
    return found.experiment_id


def browse_command(uri: str, run_id: str) -> str:
    """The exact command that shows a run in MLflow's UI, and the page to open: a SQLite store
    through `mlflow ui` on its absolute path, a server at its own address."""
    run = mlflow.tracking.MlflowClient(uri).get_run(run_id)
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"browse the run: {uri.rstrip('/')}/{page}"
    database = locks.sqlite_path(uri)
    if database is not None:
        uri = f"sqlite:///{database.resolve()}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    program = mlflow_bin if mlflow_bin.exists() else Path("mlflow")
    with contextlib.suppress(ValueError):
        program = program.relative_to(Path.cwd())
    return (
        f"browse the run: {program} ui --backend-store-uri {uri}   "
        f"then open http://127.0.0.1:5000/{page}"
    )


@dataclasses.dataclass(frozen=True)
class LoggedPoint:
    """One metric point this process logged, and the dataset it was computed on."""

    value: float
    timestamp: int
    dataset_name: str | None = None
    dataset_digest: str | None = None


class Tracker:
    """A thin, explicit face on mlflow for one training run.

    `enabled=False` is what ranks other than 0 of a data-parallel run get: the same calls,
    nothing written (one MLflow run per training, however many processes). It is the only
    place "not rank 0" is decided for recording.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        *,
        enabled: bool = True,
        system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.enabled = enabled
        self.system_metrics = system_metrics and system_monitors_available()
        self.system_metrics_interval = system_metrics_interval
        self.run_id: str | None = None
        # step -> {metric: point} of what this process logged
        self.logged: dict[int, dict[str, LoggedPoint]] = {}
        # split (train, val) -> (dataset name, digest): what a `train/*` or `val/*` metric was
        # computed on, carried to the logged model (its page lists "Datasets used")
        self.datasets: dict[str, tuple[str, str]] = {}

    @contextlib.contextmanager
    def start(
        self,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[str | None]:
        """Open (or reopen, to resume) a run and always close it with an honest status:
        FINISHED, KILLED (interrupted, or a pruned sweep trial) or FAILED (with the error)."""
        if not self.enabled:
            yield None
            return
        use_experiment(self.uri, self.experiment)
        if self.system_metrics:
            mlflow.set_system_metrics_sampling_interval(self.system_metrics_interval)
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else run_name,
            tags=dict(tags or {}),
            log_system_metrics=self.system_metrics,
        )
        self.run_id = run.info.run_id
        try:
            yield self.run_id
        except (KeyboardInterrupt, RunPrunedError) as err:
            mlflow.set_tag("landcover.stopped", f"{type(err).__name__}: {err}"[:5000])
            if isinstance(err, RunPrunedError):
                # told apart from a failure in the runs table: by name and by tag
                mlflow.set_tags({"optuna.state": "PRUNED", "landcover.outcome": "pruned"})
                name = mlflow.get_run(self.run_id).info.run_name or ""
                mlflow.tracking.MlflowClient().update_run(self.run_id, name=f"{name} (pruned)")
            mlflow.end_run("KILLED")
            raise
        except BaseException as err:
            mlflow.set_tag("landcover.error", f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run("FAILED")
            raise
        else:
            mlflow.end_run("FINISHED")

    def record_start(
        self,
        cfg: Any,
        data: Any,
        model: torch.nn.Module,
        *,
        resumed: bool,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """What a training run records before its first epoch: the config (flattened params
        and resolved YAML), its scenes, and the model's size and cost, which it returns (a
        sweep can optimise them). A resumed run has its params already."""
        from omegaconf import OmegaConf

        from landcover.config import plain_dict
        from landcover.models import count_gflops, count_parameters

        parameters = count_parameters(model)
        static = {"model/parameters": float(parameters)}
        gflops = count_gflops(model, int(cfg.data.bands))
        if gflops is not None:
            static["model/gflops_per_tile"] = gflops
        if not resumed:
            self.log_params(flatten(plain_dict(cfg)))
            self.log_params(dict(extra or {}))
            self.log_params(
                {
                    "model.parameters": str(parameters),
                    "data.train_scenes": str(len(data.train_scenes)),
                    "data.val_scenes": str(len(data.val_scenes)),
                }
            )
        self.log_text(OmegaConf.to_yaml(cfg), "config/resolved.yaml")
        self.log_datasets(str(cfg.data.name), str(cfg.data.root), data)
        scenes = data.train_scenes + data.val_scenes
        self.log_text(
            "".join(f"{s.image_path},{s.label_path}\n" for s in scenes), "config/scenes.csv"
        )
        self.log_metrics(static, step=0)
        log.info(
            "%d parameters, %d train / %d val scenes",
            parameters,
            len(data.train_scenes),
            len(data.val_scenes),
        )
        return static

    def record_best(self, state: Any, monitor: str) -> dict[str, float]:
        """The best epoch's value and index as `best/*` metrics; returns them with every metric
        of that epoch (what a sweep trial reports)."""
        best = {"best/" + monitor: state.best_value if state.best_value is not None else math.nan}
        self.log_metrics({**best, "best/epoch": float(state.best_epoch or 0)}, step=state.epoch)
        at_best: dict[str, float] = next(
            (h for h in state.history if h["epoch"] == state.best_epoch), {}
        )
        return {**at_best, **best}

    def log_datasets(self, name: str, root: str, data: Any) -> None:
        """The train and val scenes as the run's input datasets (the run page's Datasets)."""
        from landcover.tracking.datasets import log_datasets, scenes_dataset

        if not self.enabled:
            return
        datasets = {
            split: scenes_dataset(f"{name}/{split}", root, scenes, data.schema)
            for split, scenes in (("train", data.train_scenes), ("val", data.val_scenes))
        }
        log_datasets(datasets)
        self.datasets = {split: (d.name, d.digest) for split, d in datasets.items()}

    def log_params(self, params: Mapping[str, str]) -> None:
        """Parameters of the open run."""
        if self.enabled:
            mlflow.log_params(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite metrics at `step` (MLflow cannot chart NaN)."""
        if self.enabled:
            finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
            stamp = int(time.time() * 1000)
            mlflow.log_metrics(finite, step=step, timestamp=stamp)
            self.logged.setdefault(step, {}).update(
                {k: LoggedPoint(v, stamp, *self.dataset_of(k)) for k, v in finite.items()}
            )

    def dataset_of(self, metric: str) -> tuple[str | None, str | None]:
        """(name, digest) of the dataset a metric was computed on: `val/*` the val scenes,
        `train/*` the train scenes, others (best/*, model/*, timings) none."""
        return self.datasets.get(metric.partition("/")[0], (None, None))

    def describe(self, text: str, model_uri: str | None = None) -> None:
        """The run's description (`mlflow.note.content`): what a person reads first; the
        logged model's page shows the same."""
        if not self.enabled:
            return
        mlflow.set_tag("mlflow.note.content", text)
        if model_uri:
            mlflow.tracking.MlflowClient().set_logged_model_tags(
                model_uri.removeprefix("models:/"), {"mlflow.note.content": text}
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact of the open run."""
        if self.enabled:
            mlflow.log_text(text, artifact_file)

    def log_figure(self, figure: plt.Figure, artifact_file: str) -> None:
        """A figure artifact of the open run; the figure is closed either way."""
        if self.enabled:
            mlflow.log_figure(figure, artifact_file)
        plt.close(figure)

    def log_confusion_matrix(
        self,
        matrix: np.ndarray,
        class_names: list[str],
        figure: plt.Figure,
        directory: str = "confusion_matrix",
    ) -> None:
        """The matrix as a figure, CSV and JSON."""
        if self.enabled:
            log_confusion_matrix(matrix, class_names, figure, directory)
        plt.close(figure)

    def log_model(
        self, model: torch.nn.Module, *, metadata: Mapping[str, Any], step: int = 0
    ) -> str | None:
        """Log a CPU copy of the model in eval mode; the run's metrics of `step` (the epoch
        whose weights it holds) are linked to it with their datasets. Returns its models:/ URI."""
        if not self.enabled:
            return None
        uri = log_landcover_model(model, metadata, step=step, step_metrics=self.logged.get(step))
        with tempfile.TemporaryDirectory() as tmp:
            card = Path(tmp) / "landcover_model.json"
            card.write_text(json.dumps(dict(metadata), indent=2))
            mlflow.log_artifact(str(card), "model_card")
        return uri


def log_landcover_model(
    model: torch.nn.Module,
    metadata: Mapping[str, Any],
    run_id: str | None = None,
    step: int = 0,
    step_metrics: Mapping[str, LoggedPoint] | None = None,
) -> str:
    """The model in landcover's flavour (safetensors + JSON, pyfunc face) in the active run or
    `run_id`, holding the run's metrics of `step` (MLflow links them); returns its URI.

    `step_metrics`: what this process logged at `step` (value, timestamp, dataset), when it knows;
    MLflow then links them
    without fetching every metric's whole history (one request per metric: on a team server
    with password checks, minutes of a sweep trial)."""
    with _history_from_memory(step, step_metrics):
        info = _log_model(model, metadata, run_id, step)
    return info.model_uri


_HISTORY_LOCK = threading.Lock()


@contextlib.contextmanager
def _history_from_memory(step: int, metrics: Mapping[str, LoggedPoint] | None) -> Iterator[None]:
    """While a model is logged, answer MLflow's per-metric history fetches from `metrics`.

    `mlflow.models.Model.log` links a run's metrics of `step` to the new logged model by
    fetching the full history of every metric of the run and keeping the points of that step;
    we know those points already, and which dataset each was computed on (a run's metric
    history does not keep it: MLflow stores datasets on a logged model's metrics only), so the
    model's page lists its datasets. Metrics this process did not log at `step` (a resumed
    run's earlier epochs) are still fetched."""
    if not metrics:
        yield
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    original = MlflowClient.get_metric_history

    def known(self: MlflowClient, run_id: str, key: str) -> list[Metric]:
        if key in metrics:  # the same point (its timestamp too): linking adds no new one
            point = metrics[key]
            return [
                Metric(
                    key,
                    float(point.value),
                    point.timestamp,
                    step,
                    dataset_name=point.dataset_name,
                    dataset_digest=point.dataset_digest,
                    run_id=run_id,
                )
            ]
        return original(self, run_id, key)

    with _HISTORY_LOCK:
        MlflowClient.get_metric_history = known  # type: ignore[method-assign]
        try:
            yield
        finally:
            MlflowClient.get_metric_history = original  # type: ignore[method-assign]


def _log_model(
    model: torch.nn.Module, metadata: Mapping[str, Any], run_id: str | None, step: int
) -> Any:
    """MLflow's `Model.log` with landcover's flavour and signature."""
    from landcover.artifacts import flavour  # needs PyTorch: imported where used
    from landcover.predict.prior import records_prior

    return Model.log(
        artifact_path=None,
        name="model",
        step=step,
        flavor=flavour,
        run_id=run_id,
        pytorch_model=model,
        model_metadata=dict(metadata),
        signature=model_signature(int(metadata["bands"]) + int(records_prior(metadata))),
        pip_requirements=pinned_requirements(),
        metadata=dict(metadata),
        class_codes=[(c["codes"] or [i])[0] for i, c in enumerate(metadata["schema"]["classes"])],
        output_margin=int(metadata.get("output_margin", 0)),
    )
