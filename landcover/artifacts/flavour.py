"""The MLflow flavour of landcover models: a model at rest that is safe to load.

A trained model is logged once, with two faces: the `landcover` flavour (weights in
safetensors, architecture and class schema in JSON: loading rebuilds the network from this
package's code and never unpickles anything; see `landcover.artifacts.files`) and a
`python_function` flavour whose loader is `landcover.serving` (the name every MLmodel file
records, old ones included), so that a REST client that posts 4-band patches gets class codes
back (`landcover.serving.pyfunc`). Models logged by older versions (MLflow's pickled PyTorch
flavour) are refused with the command that converts them.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.models import Model

from landcover.artifacts import files
from landcover.artifacts.mlmodel_guard import LOADER, check_mlmodel

FLAVOR = "landcover"
PYFUNC = "python_function"


def save_model(
    pytorch_model: torch.nn.Module,
    path: str,
    *,
    mlflow_model: Model | None = None,
    model_metadata: Mapping[str, Any],
    class_codes: Sequence[int],
    output_margin: int,
    pip_requirements: Sequence[str] = (),
    signature: Any = None,
    **kwargs: Any,
) -> None:
    """Write the model directory: weights, metadata, requirements and the MLmodel file.

    Called by `mlflow.models.Model.log(flavor=landcover.artifacts.flavour, ...)`.
    """
    import mlflow.pyfunc

    del kwargs
    directory = Path(path)
    files.save(pytorch_model, directory, model_metadata)
    (directory / "requirements.txt").write_text("\n".join(pip_requirements) + "\n")
    python_env = {
        "python": platform.python_version(),
        "build_dependencies": ["pip"],
        "dependencies": ["-r requirements.txt"],
    }
    (directory / "python_env.yaml").write_text(yaml.safe_dump(python_env))
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    if signature is not None:
        mlflow_model.signature = signature
    mlflow_model.add_flavor(
        FLAVOR,
        format=files.FORMAT,
        weights=files.WEIGHTS_FILE,
        metadata=files.METADATA_FILE,
    )
    mlflow.pyfunc.add_to_model(
        mlflow_model,
        loader_module=LOADER,
        python_env="python_env.yaml",
        model_config={
            "class_codes": [int(code) for code in class_codes],
            "output_margin": int(output_margin),
        },
    )
    mlflow_model.save(os.path.join(path, "MLmodel"))


def load_module_and_metadata(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a downloaded model directory, rebuilt without unpickling, and its
    metadata."""
    directory = Path(path)
    check_mlmodel(directory)  # before MLflow reads anything it could run
    mlmodel = Model.load(str(directory / "MLmodel")) if (directory / "MLmodel").is_file() else None
    if mlmodel is not None and FLAVOR not in mlmodel.flavors:
        raise files.UnsafeModelError(files.convert_hint(str(path)))
    return files.load(directory)


def load_module(path: str | Path) -> torch.nn.Module:
    """The network of a downloaded model directory, rebuilt without unpickling."""
    return load_module_and_metadata(path)[0]
