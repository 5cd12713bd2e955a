"""ONNX export with dynamic batch, height and width, checked against PyTorch.

The exported graph is the model's normalisation and network (and its centre crop, for the seed
network) without the any-size padding of the PyTorch wrapper: ONNX inputs must be multiples of
the model's `size_divisor`, which travels in the file's metadata with the class schema; the
tiled predictor always sends such tiles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
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
    model = model.cpu().eval()
    divisor = int(metadata.get("size_divisor", model.size_divisor))
    size = max(divisor, example_size // divisor * divisor)
    example = torch.rand(1, int(metadata["bands"]), size, size) * 255
    return write_graph(
        _Exportable(cast("SegmentationModel", model)),
        example,
        Path(path),
        output_name="logits",
        properties={METADATA_KEY: json.dumps(metadata)},
        opset=opset,
        dynamic_axes={
            "pixels": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "out_height", 3: "out_width"},
        },
    )


def write_graph(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    output_name: str,
    properties: dict[str, str],
    opset: int = 17,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """`module` traced on `example` into an ONNX file (input "pixels") carrying `properties`
    as metadata, written whole or not at all: every graph this project writes goes here."""
    import onnx

    with atomic_target(path) as tmp:
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["pixels"],
            output_names=[output_name],
            opset_version=opset,
            dynamo=False,
            dynamic_axes=dynamic_axes,
        )
        proto = onnx.load(str(tmp))
        for key, value in properties.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return path


RELATIVE_TOLERANCE = 1e-4  # |compiled - PyTorch| / the largest |logit| accepted
MIN_AGREEMENT = 0.999  # share of the check input's pixels whose class must be PyTorch's


@dataclass(frozen=True)
class ForwardCheck:
    """How a compiled copy of a model (an ONNX graph, an OpenVINO model) compares with PyTorch
    on the check input: in the logits' own scale, and in the classes a user sees. An absolute
    bound (1e-3) refused a normally trained U-Net whose logits reach tens (1.09e-3)."""

    max_abs: float  # largest |compiled - PyTorch| logit difference
    scale: float  # largest |logit| PyTorch gave
    agreement: float  # share of pixels whose most probable class is the same

    @property
    def relative(self) -> float:
        """The largest difference in units of the largest logit."""
        return self.max_abs / max(self.scale, 1e-12)

    def refusal(
        self, tolerance: float = RELATIVE_TOLERANCE, min_agreement: float = MIN_AGREEMENT
    ) -> str | None:
        """Why the copy is not to be used, naming the figure, or None."""
        if not self.agreement >= min_agreement:
            return (
                f"classes agree with PyTorch on {self.agreement:.4%} of the check input's "
                f"pixels (at least {min_agreement:.2%} required)"
            )
        if not self.relative <= tolerance:
            return (
                f"|difference| {self.max_abs:.2e} is {self.relative:.2e} of the largest |logit| "
                f"{self.scale:.3g} (tolerance {tolerance:g})"
            )
        return None

    def __str__(self) -> str:
        return (
            f"max |difference| {self.max_abs:.2e} ({self.relative:.1e} of the largest |logit| "
            f"{self.scale:.3g}), classes agree on {self.agreement:.4%} of pixels"
        )


def onnx_check(
    model: torch.nn.Module, path: Path, sizes=((1, 256, 256), (2, 320, 192)), seed: int = 0
) -> ForwardCheck:
    """How the ONNX file at `path` compares with `model` on random inputs of several shapes."""
    session, metadata = load_onnx(path)

    def forward(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": pixels})[0]

    return forward_check(model, forward, int(metadata["bands"]), sizes, seed)


def forward_check(
    model: torch.nn.Module,
    forward: Callable[[np.ndarray], np.ndarray],
    bands: int,
    sizes=((1, 256, 256), (2, 320, 192)),
    seed: int = 0,
) -> ForwardCheck:
    """How `forward` compares with PyTorch over random pixels (0-255) of several (batch,
    height, width) shapes: how any compiled copy of `model` is checked before use."""
    generator = torch.Generator().manual_seed(seed)
    worst, scale, same, total = 0.0, 0.0, 0, 0
    model = model.cpu().eval()
    for batch, height, width in sizes:
        pixels = torch.rand(batch, bands, height, width, generator=generator) * 255
        with torch.inference_mode():
            expected = model(pixels).numpy()
        found = forward(pixels.numpy())
        worst = max(worst, float(np.abs(found - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        same += int((found.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * expected.shape[2] * expected.shape[3]
    return ForwardCheck(worst, scale, same / max(total, 1))
