"""One ONNX graph for the tools maps are made with: a fixed square tile of digital numbers in,
class probabilities of every pixel of the tile out.

QGIS's Deepness plugin and ArcGIS Pro's raster functions cut a raster into fixed tiles, hand
each to the model and keep what it answers; neither knows our normalisation or our output
margin. So the graph carries them: the tile mirrored outward by the network's output margin
(as `landcover-predict` pads a scene's edge, numpy's "symmetric"), the model's own normalisation
and network, its margin cut, then a softmax over the classes: the answer is as large as the
tile. The tools are told (in their own metadata) to overlap tiles by twice `context`, the
margin or CONTEXT pixels, whichever is larger: every pixel inside the scene is then answered
by a tile's centre, with that much real context around it, as in `landcover-predict`; pixels
at the scene's edge by an edge tile, mirrored where the tool supplies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from landcover.interop.onnx import write_graph

if TYPE_CHECKING:
    from landcover.models import SegmentationModel

TILE = 512  # what landcover-predict cuts by default
CONTEXT = 32  # half landcover-predict's default overlap of 64 pixels


@dataclass(frozen=True)
class TileGraph:
    """An exported fixed-tile graph and the tiling it asks for."""

    path: Path
    tile: int  # the input's and the output's edge, pixels
    context: int  # pixels of overlap each side a tile's centre needs (tools overlap 2 x this)
    bands: int
    classes: int
    margin: int  # the network's own output margin, mirrored inside the graph


class _TileProbabilities(nn.Module):
    """Digital numbers of one tile -> class probabilities of each of its pixels."""

    def __init__(self, model: SegmentationModel, margin: int) -> None:
        super().__init__()
        self.model = model
        self.margin = margin

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.margin
        if m:  # numpy's "symmetric": the edge row repeated, as landcover-predict pads
            pixels = torch.cat(
                [pixels[..., :m, :].flip(-2), pixels, pixels[..., -m:, :].flip(-2)], -2
            )
            pixels = torch.cat([pixels[..., :m].flip(-1), pixels, pixels[..., -m:].flip(-1)], -1)
        logits = self.model.net(self.model.normalize(pixels))
        if m:
            logits = logits[..., m:-m, m:-m]
        return torch.softmax(logits, dim=1)


def tiling(metadata: dict[str, Any], tile: int = TILE) -> tuple[int, int]:
    """(tile, context) for a model: the tile a multiple of its stride once padded by its
    margin, the context at least its margin and CONTEXT, even (Deepness halves overlaps)."""
    divisor = int(metadata.get("size_divisor", 32))
    margin = int(metadata.get("output_margin", 0))
    tile = (tile + 2 * margin) // divisor * divisor - 2 * margin
    context = max(margin, CONTEXT)
    context += context % 2
    if tile - 2 * context < 32:
        raise ValueError(f"a {tile} px tile leaves no centre beside {context} px of context")
    return tile, context


def export_tile_graph(
    model: torch.nn.Module,
    metadata: dict[str, Any],
    path: Path,
    tile: int = TILE,
    opset: int = 17,
    properties: dict[str, str] | None = None,
) -> TileGraph:
    """Write the fixed-tile probability graph (batch 1) with `properties` as ONNX metadata."""
    tile, context = tiling(metadata, tile)
    bands = int(metadata["bands"])
    margin = int(metadata.get("output_margin", 0))
    network = cast("SegmentationModel", model.cpu().eval())
    write_graph(
        _TileProbabilities(network, margin).eval(),
        torch.rand(1, bands, tile, tile) * 255,
        Path(path),
        output_name="probabilities",
        properties=properties or {},
        opset=opset,
    )
    classes = len(metadata["schema"]["classes"])
    return TileGraph(Path(path), tile, context, bands, classes, margin)


def class_agreement(model: torch.nn.Module, graph: TileGraph, seed: int = 0) -> float:
    """Share of a random tile's pixels whose class the graph and PyTorch (which pads the same
    way) agree on: the package's check before it is written."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(1, graph.bands, graph.tile, graph.tile, generator=generator) * 255).numpy()
    m = graph.margin
    padded = np.pad(pixels, ((0, 0), (0, 0), (m, m), (m, m)), mode="symmetric") if m else pixels
    with torch.inference_mode():
        expected = model.cpu().eval()(torch.from_numpy(padded)).numpy().argmax(1)
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    found = session.run(None, {"pixels": pixels})[0].argmax(1)
    return float(np.mean(found == expected))
