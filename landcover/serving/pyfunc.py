"""The pyfunc face of a landcover model: what `mlflow models serve` and `landcover-serve` answer.

Request (JSON, `POST /invocations`): `{"inputs": [[[[...]]]]}`, raw digital numbers shaped
(patches, bands, height, width), any height and width. Response: `{"predictions": [...]}`,
class codes shaped (patches, height, width). Requests above `LANDCOVER_SERVE_MAX_PIXELS`
pixels as processed (default 2,097,152: eight 512 x 512 patches; a patch counts with the
margins and stride padding the network adds, so 200 patches of 1 x 1 are not 200 pixels),
above `LANDCOVER_SERVE_MAX_PATCHES` patches (64), with a patch above
`LANDCOVER_SERVE_FORWARD_PIXELS` (512 x 512 as processed; larger areas are what
`landcover-predict` maps) or with non-finite values are refused with a 400-class error before
any computation. Patches are computed a bounded number of pixels at a time, and a request
still running past MLflow's request timeout stops at the next pass. A model with a prior
layer (NLCD, `landcover.predict.prior`) takes the layer's codes as one more band after the
image's (its signature says bands + 1): a client that has the image has the layer on the
same grid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from landcover.artifacts import files
from landcover.artifacts.flavour import load_module_and_metadata
from landcover.data.schema import ClassSchema
from landcover.predict.prior import PriorLayer, prior_of

MAX_PIXELS_ENV = "LANDCOVER_SERVE_MAX_PIXELS"
# eight 512 x 512 patches: parsing a request's JSON costs the worker about 100 MiB per
# patch of that size; with sixteen its peak passed 2.5 GiB
DEFAULT_MAX_PIXELS = 8 * 512 * 512
FORWARD_PIXELS_ENV = "LANDCOVER_SERVE_FORWARD_PIXELS"
DEFAULT_FORWARD_PIXELS = 512 * 512  # pixels one forward pass may process: bounds memory
MAX_PATCHES_ENV = "LANDCOVER_SERVE_MAX_PATCHES"
DEFAULT_MAX_PATCHES = 64
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's own; its default is 60 s


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def max_pixels() -> int:
    """Pixels one request may carry (LANDCOVER_SERVE_MAX_PIXELS): a large request gets a 400, not an
    out-of-memory kill."""
    return int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))


class ClassMapModel:
    """pyfunc predict: (N, bands, H, W) raw pixels -> (N, H, W) uint8 class codes."""

    def __init__(
        self,
        module: torch.nn.Module,
        class_codes: Sequence[int],
        output_margin: int,
        prior: PriorLayer | None = None,
    ):
        self.module = module.eval()
        self.codes = torch.tensor(list(class_codes), dtype=torch.uint8)
        self.margin = output_margin
        self.prior = prior

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Class codes for a batch of raw pixels; bad or oversized requests are 400s."""
        if isinstance(data, Mapping):  # a named tensor input arrives as {"pixels": array}
            data = data["pixels"] if "pixels" in data else next(iter(data.values()))
        array = np.asarray(data, dtype=np.float32)
        if array.ndim != 4:
            raise _bad_request(
                f"expected patches shaped (N, bands, height, width), got {array.shape}"
            )
        if array.shape[0] > _setting(MAX_PATCHES_ENV, DEFAULT_MAX_PATCHES):
            raise _bad_request(
                f"request of {array.shape[0]} patches is above the server's limit of "
                f"{_setting(MAX_PATCHES_ENV, DEFAULT_MAX_PATCHES)} ({MAX_PATCHES_ENV})"
            )
        per_patch = self.processed_pixels(array.shape[2], array.shape[3])
        pixels_in = array.shape[0] * per_patch
        if pixels_in > max_pixels():
            raise _bad_request(
                f"request of {pixels_in} pixels as processed (patches {array.shape}, each padded "
                f"to {per_patch} pixels) is above the server's budget of {max_pixels()} "
                f"({MAX_PIXELS_ENV}): send smaller or fewer patches"
            )
        forward = _setting(FORWARD_PIXELS_ENV, DEFAULT_FORWARD_PIXELS)
        if per_patch > forward:
            raise _bad_request(
                f"patches of {array.shape[2]} x {array.shape[3]} are processed as {per_patch} "
                f"pixels each, above {forward} per forward pass ({FORWARD_PIXELS_ENV}): send "
                "smaller patches, or map whole rasters with landcover-predict"
            )
        if not np.isfinite(array).all():
            raise _bad_request("request holds NaN or infinite pixel values")
        layer = None
        if self.prior is not None:
            array, layer = array[:, :-1], array[:, -1]
            if ((layer < 0) | (layer > 255) | (layer != np.round(layer))).any():
                raise _bad_request(
                    f"the last band carries the {self.prior.name} prior layer's codes: "
                    "whole numbers 0-255"
                )
        logits = self._logits_in_chunks(array, max(1, forward // per_patch))
        if self.prior is None or layer is None:
            return self.codes[logits.argmax(1)].numpy()
        probabilities = torch.softmax(logits.float(), dim=1).numpy()
        codes = layer.astype(np.uint8)
        for index in range(probabilities.shape[0]):
            self.prior.reweight(probabilities[index], codes[index])
        return self.codes.numpy()[probabilities.argmax(1)]

    def processed_pixels(self, height: int, width: int) -> int:
        """Pixels the network computes for one patch: margins mirrored on, then padded up to
        the network's stride (what memory and time follow, not what the client sent)."""
        divisor = int(getattr(self.module, "size_divisor", 1) or 1)
        rows = -(-(height + 2 * self.margin) // divisor) * divisor
        cols = -(-(width + 2 * self.margin) // divisor) * divisor
        return rows * cols

    def _logits_in_chunks(self, array: np.ndarray, per_forward: int) -> torch.Tensor:
        """Logits of every patch, `per_forward` patches a pass (memory stays bounded); gives
        up between passes once MLflow's request timeout has passed (the client has had its
        504 by then: the work is cancelled, not carried on)."""
        deadline = time.monotonic() + _setting(TIMEOUT_ENV, 60)
        parts = []
        for start in range(0, array.shape[0], per_forward):
            if time.monotonic() > deadline:
                raise MlflowException(
                    f"request cancelled after {_setting(TIMEOUT_ENV, 60)} s ({TIMEOUT_ENV})"
                )
            pixels = torch.from_numpy(np.ascontiguousarray(array[start : start + per_forward]))
            if self.margin:
                # the network predicts only the centre of what it sees: mirror the edges so
                # the answer covers the whole patch (as whole-scene prediction does)
                mode = "reflect" if min(pixels.shape[-2:]) > self.margin else "replicate"
                pixels = F.pad(pixels, (self.margin,) * 4, mode=mode)
            with torch.inference_mode():
                parts.append(self.module(pixels))
        return torch.cat(parts)

    def get_raw_model(self) -> torch.nn.Module:
        """The PyTorch module behind the pyfunc face."""
        return self.module


def _bad_request(message: str) -> MlflowException:
    """An error `mlflow models serve` answers with HTTP 400, not 500."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def class_map_model(path: str, model_config: Mapping[str, Any] | None = None) -> ClassMapModel:
    """The pyfunc face of the model saved in `path`; MLflow reaches it through
    `landcover.serving._load_pyfunc` (the `loader_module` every landcover MLmodel names)."""
    config = dict(model_config or {})
    directory = Path(path).parent if Path(path).name == files.WEIGHTS_FILE else Path(path)
    module, metadata = load_module_and_metadata(directory)
    prior = prior_of(metadata, ClassSchema.from_config(metadata["schema"]))
    return ClassMapModel(
        module, config["class_codes"], int(config.get("output_margin", 0)), prior=prior
    )
