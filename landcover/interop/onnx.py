"""ONNX export with dynamic batch, height and width, checked against PyTorch.

The exported graph is the model's normalisation and network (and its centre crop, for the seed
network) without the any-size padding of the PyTorch wrapper: ONNX inputs must be multiples of
the model's `size_divisor`, which travels in the file's metadata with the class schema; the
tiled predictor always sends such tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from landcover.artifacts.onnx_file import METADATA_KEY, load_onnx
from landcover.atomic import atomic_target

if TYPE_CHECKING:  # importing smp costs seconds; an ONNX model never needs it
    from landcover.models import SegmentationModel


class _Exportable(nn.Module):
    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.model.net(self.model.normalize(pixels))
        m = self.model.output_margin
        return logits[..., m:-m, m:-m] if m else logits


def export_onnx(
    model: torch.nn.Module,
    metadata: dict[str, Any],
    path: Path,
    opset: int = 17,
    example_size: int = 256,
) -> Path:
    """Write `path` atomically (a temporary file renamed into place)."""
    import onnx

    path = Path(path)
    model = model.cpu().eval()
    divisor = int(metadata.get("size_divisor", model.size_divisor))
    size = max(divisor, example_size // divisor * divisor)
    example = torch.rand(1, int(metadata["bands"]), size, size) * 255
    with atomic_target(path) as tmp:
        torch.onnx.export(
            _Exportable(cast("SegmentationModel", model)),
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={
                "pixels": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "out_height", 3: "out_width"},
            },
        )
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.save(proto, str(tmp))
    return path


def max_abs_difference(
    model: torch.nn.Module, path: Path, sizes=((1, 256, 256), (2, 320, 192)), seed: int = 0
) -> float:
    """Largest |ONNX - PyTorch| logit difference over random inputs of several shapes."""
    session, metadata = load_onnx(path)

    def forward(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": pixels})[0]

    return forward_difference(model, forward, int(metadata["bands"]), sizes, seed)


def forward_difference(
    model: torch.nn.Module,
    forward: Callable[[np.ndarray], np.ndarray],
    bands: int,
    sizes=((1, 256, 256), (2, 320, 192)),
    seed: int = 0,
) -> float:
    """Largest |forward - PyTorch| logit difference over random pixels (0-255) of several
    (batch, height, width) shapes: how any compiled copy of `model` is checked before use."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    model = model.cpu().eval()
    for batch, height, width in sizes:
        pixels = torch.rand(batch, bands, height, width, generator=generator) * 255
        with torch.inference_mode():
            expected = model(pixels).numpy()
        worst = max(worst, float(np.abs(forward(pixels.numpy()) - expected).max()))
    return worst
