"""Everything that writes to MLflow, in one place, so the rest stays testable without it.

A run records the resolved config (flattened params plus the YAML), provenance tags, metrics
per epoch, figures, and the trained model. The model is logged in MLflow's "pickle" format:
the default "pt2" (torch.export) freezes input shapes, and a land cover model must run on any
tile size. Explicit pip requirements skip MLflow's dependency inference (~13 s per log).
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

PARAM_VALUE_LIMIT = 500
MODEL_REQUIREMENTS = ("torch", "segmentation-models-pytorch", "timm", "numpy")


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
    tags = {
        "host": platform.node(),
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    if device.type == "cuda":
        tags["gpu"] = torch.cuda.get_device_name(device)
    return tags


def pinned_requirements() -> list[str]:
    requirements = []
    for package in MODEL_REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            requirements.append(package)
    return requirements


def model_signature(bands: int, num_classes: int) -> ModelSignature:
    """Any batch, any height and width: (-1, bands, -1, -1) raw pixels -> logits."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, bands, -1, -1), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "logits")]),
    )


class Tracker:
    """A thin, explicit face on mlflow for one training run."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None

    @contextlib.contextmanager
    def start(
        self,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[str]:
        """Open (or reopen, to resume) a run; an exception inside ends it as FAILED."""
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment)
        with mlflow.start_run(
            run_id=run_id, run_name=None if run_id else run_name, tags=dict(tags or {})
        ) as run:
            self.run_id = run.info.run_id
            yield self.run_id

    def log_params(self, params: Mapping[str, str]) -> None:
        mlflow.log_params(dict(params))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        mlflow.set_tags(dict(tags))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        mlflow.log_metrics(finite, step=step)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        mlflow.log_dict(dict(data), artifact_file)

    def log_figure(self, figure: plt.Figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)
        plt.close(figure)

    def log_confusion_matrix(
        self,
        matrix: np.ndarray,
        class_names: list[str],
        figure: plt.Figure,
        directory: str = "confusion_matrix",
    ) -> None:
        """PNG heatmap plus the raw counts as CSV and JSON (for tools, not eyes)."""
        self.log_figure(figure, f"{directory}/confusion_matrix.png")
        header = "label\\predicted," + ",".join(class_names)
        rows = [
            ",".join([name, *map(str, row)])
            for name, row in zip(class_names, matrix.tolist(), strict=True)
        ]
        self.log_text("\n".join([header, *rows]) + "\n", f"{directory}/confusion_matrix.csv")
        self.log_dict(
            {
                "classes": class_names,
                "matrix": matrix.tolist(),
                "rows": "label",
                "columns": "predicted",
            },
            f"{directory}/confusion_matrix.json",
        )

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_model(
        self, model: torch.nn.Module, *, bands: int, num_classes: int, metadata: Mapping[str, Any]
    ) -> str:
        """Log a CPU copy of the model in eval mode; returns its models:/ URI."""
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            signature=model_signature(bands, num_classes),
            pip_requirements=pinned_requirements(),
            metadata=dict(metadata),
        )
        with tempfile.TemporaryDirectory() as tmp:
            card = Path(tmp) / "landcover_model.json"
            card.write_text(json.dumps(dict(metadata), indent=2))
            mlflow.log_artifact(str(card), "model_card")
        return info.model_uri
