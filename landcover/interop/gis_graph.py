"""One ONNX graph for the tools maps are made with: a fixed square tile of digital numbers in,
class probabilities out.

QGIS's Deepness plugin and ArcGIS Pro's raster functions cut a raster into fixed tiles, hand
each to the model and keep what it answers; neither knows our normalisation or our output
margin, so the graph carries them (the model's normalisation and network, its margin cut, a
softmax over the classes). They cut tiles differently, and a fully convolutional network's
answer depends on where a tile is cut, so each tool gets the graph that makes its tiles see what
`landcover-predict`'s see:

- ArcGIS Pro pads every block with the scene itself by `ModelPadding` (the context), from one
  context outside the raster's corner, as `landcover-predict` does: its graph (`mirror=False`)
  is the network on the tile as given, its margin cut.
- Deepness cuts tiles from the layer's edge with no padding, and where its grid runs past the
  layer (above the top, right of the right edge) it reads no data (zeros). Its graph
  (`mirror=True`) first mirrors all-zero rows and columns at the tile's edges from its own
  pixels (numpy's "symmetric"), then mirrors the tile outward by the context on every side, as
  `landcover-predict` mirrors a scene's edge, and cuts the context from the answer: a tile in,
  an answer as large as the tile out. The tool is told to overlap tiles by twice the context,
  so every pixel inside the scene is answered by a tile's centre with that much real context
  around it, and pixels at the scene's edge by an edge tile mirrored as `landcover-predict`
  mirrors them.

The context is the network's margin or CONTEXT pixels, whichever is larger.
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
CONTEXT = 64
TIE = 1e-4  # logits closer than this (relative) are a tie, whoever breaks it


@dataclass(frozen=True)
class TileGraph:
    """An exported fixed-tile graph and the tiling it asks for."""

    path: Path
    tile: int  # the input's edge, pixels
    context: int  # pixels of overlap each side a tile's centre needs (tools overlap 2 x this)
    bands: int
    classes: int
    margin: int  # the network's own output margin
    mirrored: bool = True  # mirrors nodata and the context inside (output = tile) or not

    @property
    def output(self) -> int:
        """The answer's edge, pixels."""
        return self.tile if self.mirrored else self.tile - 2 * self.margin


def _symmetric_index(size: int, first: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Indices 0..size-1 where those outside [first, end) reflect back into it as numpy's
    "symmetric" pad does (period 2 x its length)."""
    length = end - first
    folded = torch.remainder(torch.arange(size, device=first.device) - first, 2 * length)
    return first + torch.where(folded < length, folded, 2 * length - 1 - folded)


def _valid_range(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[first, end) of the True entries of a 1-D mask (all of it when none is True)."""
    size = present.shape[0]
    weights = present.to(torch.float32)  # ArgMax of integers is not in ONNX Runtime 1.17
    first = torch.argmax(weights)
    end = size - torch.argmax(weights.flip(0))
    none = ~present.any()
    return torch.where(none, torch.zeros_like(first), first), torch.where(
        none, torch.full_like(end, size), end
    )


def mirror_nodata_edges(pixels: torch.Tensor) -> torch.Tensor:
    """(1, bands, rows, cols): rows and columns with every band 0 at a tile's edges (past a
    layer's edge, where Deepness reads no data: above its top, right of its right edge)
    replaced by the tile's own pixels mirrored."""
    present = pixels.abs().sum(dim=1)[0] > 0  # (rows, cols)
    top, bottom = _valid_range(present.any(dim=1))
    left, right = _valid_range(present.any(dim=0))
    pixels = pixels.index_select(2, _symmetric_index(pixels.shape[2], top, bottom))
    return pixels.index_select(3, _symmetric_index(pixels.shape[3], left, right))


def mirror_pad(pixels: torch.Tensor, pad: int) -> torch.Tensor:
    """numpy's "symmetric" pad by `pad` pixels on every side, as landcover-predict pads a scene."""
    pixels = torch.cat([pixels[..., :pad, :].flip(-2), pixels, pixels[..., -pad:, :].flip(-2)], -2)
    return torch.cat([pixels[..., :pad].flip(-1), pixels, pixels[..., -pad:].flip(-1)], -1)


class _TileProbabilities(nn.Module):
    """Digital numbers of one tile -> class probabilities of each pixel it answers."""

    def __init__(self, model: SegmentationModel, margin: int, context: int, mirror: bool) -> None:
        super().__init__()
        self.model = model
        self.margin = margin
        self.context = context
        self.mirror = mirror

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cut = self.margin
        if self.mirror:
            pixels = mirror_pad(mirror_nodata_edges(pixels), self.context)
            cut = self.context
        logits = self.model.net(self.model.normalize(pixels))
        if cut:
            logits = logits[..., cut:-cut, cut:-cut]
        return torch.softmax(logits, dim=1)


def tiling(metadata: dict[str, Any], tile: int = TILE, mirror: bool = True) -> tuple[int, int]:
    """(tile, context) for a model: the context at least its margin and CONTEXT, even (Deepness
    halves overlaps); the tile a multiple of its stride once mirrored by the context (inside
    the graph) or as it is."""
    divisor = int(metadata.get("size_divisor", 32))
    context = max(int(metadata.get("output_margin", 0)), CONTEXT)
    context += context % 2
    inside = 2 * context if mirror else 0
    tile = (tile + inside) // divisor * divisor - inside
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
    mirror: bool = True,
) -> TileGraph:
    """Write the fixed-tile probability graph (batch 1) with `properties` as ONNX metadata:
    `mirror=True` for Deepness, `False` for tools that pad tiles with the scene (ArcGIS)."""
    tile, context = tiling(metadata, tile, mirror)
    bands = int(metadata["bands"])
    margin = int(metadata.get("output_margin", 0))
    network = cast("SegmentationModel", model.cpu().eval())
    write_graph(
        _TileProbabilities(network, margin, context, mirror).eval(),
        torch.rand(1, bands, tile, tile) * 255,
        Path(path),
        output_name="probabilities",
        properties=properties or {},
        opset=opset,
    )
    classes = len(metadata["schema"]["classes"])
    return TileGraph(Path(path), tile, context, bands, classes, margin, mirror)


def class_agreement(model: torch.nn.Module, graph: TileGraph, seed: int = 0) -> float:
    """Share of a tile's pixels whose class the graph and PyTorch (given the tile padded the
    same way) agree on, ties left out: the package's check before it is written. The tile's
    first 40 rows and last 40 columns are no data (zeros), as where Deepness reads past a
    layer's edge, so the mirroring is checked too."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(1, graph.bands, graph.tile, graph.tile, generator=generator) * 255).numpy()
    expected_input = pixels
    if graph.mirrored:
        pixels[..., :40, :] = 0
        pixels[..., -40:] = 0
        inside = pixels[..., 40:, : graph.tile - 40]
        pad = graph.context
        expected_input = np.pad(
            inside, ((0, 0), (0, 0), (pad + 40, pad), (pad, pad + 40)), mode="symmetric"
        )
    with torch.inference_mode():
        expected = model.cpu().eval()(torch.from_numpy(expected_input)).numpy()
    if graph.mirrored:  # what the model's own margin cut left of the context
        cut = graph.context - graph.margin
        expected = expected[..., cut : expected.shape[-2] - cut, cut : expected.shape[-1] - cut]
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    found = session.run(None, {"pixels": pixels})[0].argmax(1)
    # a pixel whose two best logits PyTorch itself cannot tell apart (an untrained network on
    # noise has many) is no disagreement: float rounding decides it either way
    top2 = np.sort(expected, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > TIE * np.maximum(np.abs(top2[:, 1]), 1.0)
    if not decisive.any():
        return 1.0
    return float(np.mean((found == expected.argmax(1))[decisive]))
