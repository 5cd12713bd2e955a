"""The MLflow flavour that lets `mlflow models serve` answer with land cover maps.

A trained model is logged once, with two faces: the `pytorch` flavour (what predict, evaluate,
export and promotion load) and a `python_function` flavour whose loader is this module, so that
a REST client that posts 4-band patches gets class codes back, not raw logits it would have to
decode with a schema it does not have. The class codes, the output margin and the stride come
from the `model_config` of the pyfunc flavour, written at logging time.

Request (JSON, `POST /invocations`): `{"inputs": [[[[...]]]]}`, raw digital numbers shaped
(patches, bands, height, width), any height and width. Response: `{"predictions": [...]}`,
class codes shaped (patches, height, width).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.pytorch
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.models import Model
from mlflow.models.model import MODEL_CONFIG

PYFUNC = "python_function"


def save_model(
    pytorch_model: torch.nn.Module,
    path: str,
    *,
    mlflow_model: Model | None = None,
    class_codes: Sequence[int],
    output_margin: int,
    **kwargs: Any,
) -> None:
    """MLflow's PyTorch save, then point its pyfunc flavour at `ClassMapModel`.

    Called by `mlflow.models.Model.log(flavor=landcover.serving, ...)`; everything else (the
    pickled module, requirements, signature, metadata) is MLflow's own format, unchanged.
    """
    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    flavor = mlflow_model.flavors[PYFUNC]
    flavor["loader_module"] = __name__
    flavor[MODEL_CONFIG] = {
        "device": None,
        "class_codes": [int(code) for code in class_codes],
        "output_margin": int(output_margin),
    }
    mlflow_model.save(os.path.join(path, "MLmodel"))


class ClassMapModel:
    """pyfunc predict: (N, bands, H, W) raw pixels -> (N, H, W) uint8 class codes."""

    def __init__(self, module: torch.nn.Module, class_codes: Sequence[int], output_margin: int):
        self.module = module.eval()
        self.codes = torch.tensor(list(class_codes), dtype=torch.uint8)
        self.margin = output_margin

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        if isinstance(data, Mapping):  # a named tensor input arrives as {"pixels": array}
            data = data["pixels"] if "pixels" in data else next(iter(data.values()))
        pixels = torch.as_tensor(np.asarray(data, dtype=np.float32))
        if pixels.ndim != 4:
            raise ValueError(
                f"expected patches shaped (N, bands, height, width), got {tuple(pixels.shape)}"
            )
        if self.margin:
            # the network predicts only the centre of what it sees: mirror the edges so the
            # answer covers the whole patch (as whole-scene prediction does)
            mode = "reflect" if min(pixels.shape[-2:]) > self.margin else "replicate"
            pixels = F.pad(pixels, (self.margin,) * 4, mode=mode)
        with torch.inference_mode():
            logits = self.module(pixels)
        return self.codes[logits.argmax(1)].numpy()

    def get_raw_model(self) -> torch.nn.Module:
        return self.module


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> ClassMapModel:
    """MLflow's pyfunc entry point (`loader_module: landcover.serving` in MLmodel)."""
    config = dict(model_config or {})
    module = mlflow.pytorch._load_model(path, device="cpu", weights_only=False)
    return ClassMapModel(module, config["class_codes"], int(config.get("output_margin", 0)))
