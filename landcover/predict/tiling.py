"""Tile layout and seamless stitching with memory bounded by one strip of tiles.

Every tile has a *core* of `core` x `core` output pixels and sees `context` extra pixels on each
side. Cores tile the raster exactly; inputs overlap by 2 x context. Two ways to merge:

- centre: keep each tile's core only (the 2018 tutorial: 256 in, 128 kept, 64 px context).
  With enough context a fully convolutional network gives exactly the full-raster result.
- blend: keep the whole tile and weight it with a ramp that rises across the overlap, so
  neighbouring tiles fade into each other and no seam is visible.

Probabilities are summed into a strip accumulator (classes x strip height x raster width); rows
are handed out as soon as no later tile can touch them, so memory grows with the raster's width,
never with its area.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from landcover.errors import ConfigValueError


@dataclass(frozen=True)
class TileLayout:
    """How a raster is cut into overlapping tiles whose cores cover it exactly once."""

    width: int
    height: int
    tile: int
    context: int

    def __post_init__(self) -> None:
        if self.core <= 0:
            raise ConfigValueError(
                f"tile size {self.tile} leaves no core with {self.context} px of context on "
                "each side; raise predict.tile_size or lower predict.overlap"
            )

    @property
    def core(self) -> int:
        """Pixels of each tile that are kept (the rest is context)."""
        return self.tile - 2 * self.context

    @property
    def rows(self) -> int:
        """Tile rows needed to cover the raster's height."""
        return -(-self.height // self.core)

    @property
    def cols(self) -> int:
        """Tile columns needed to cover the raster's width."""
        return -(-self.width // self.core)

    def row_tops(self) -> Iterator[int]:
        """Top row of each strip's cores."""
        for index in range(self.rows):
            yield index * self.core

    def col_lefts(self) -> list[int]:
        """Raster column where each tile column's core starts."""
        return [index * self.core for index in range(self.cols)]


def blend_weights(tile: int, context: int) -> np.ndarray:
    """(tile, tile) weights: 1 in the core, a linear ramp across each 2 x context overlap.

    Never exactly zero, so pixels at the raster edge (seen by one tile only) stay defined.
    """
    if context == 0:
        return np.ones((tile, tile), dtype=np.float32)
    position = np.arange(tile, dtype=np.float32) + 0.5
    ramp = np.clip(np.minimum(position, tile - position) / (2 * context), 1e-3, 1.0)
    return np.outer(ramp, ramp).astype(np.float32)


# (first raster row, rows, first column, merged probabilities (classes, rows, cols)) -> None
Reweight = Callable[[int, int, int, np.ndarray], None]


class StripAccumulator:
    """Weighted sums of class probabilities for the rows that tiles of one strip can touch."""

    def __init__(self, layout: TileLayout, num_classes: int, blend: bool) -> None:
        self.layout = layout
        self.blend = blend
        self.num_classes = num_classes
        self.weights = blend_weights(layout.tile, layout.context) if blend else None
        # rows [top, top + buffer height) of the raster (top may be negative: padding)
        self.top = -layout.context if blend else 0
        height = layout.tile if blend else layout.core
        width = layout.cols * layout.core + 2 * layout.context
        self.sums = np.zeros((num_classes, height, width), dtype=np.float32)
        self.total_weight = np.zeros((height, width), dtype=np.float32)
        # one tile's weighted probabilities, reused: no allocation per tile
        self.scratch = np.empty((num_classes, layout.tile, layout.tile), dtype=np.float32)

    def add(self, probabilities: np.ndarray, row: int, col: int) -> None:
        """Probabilities (classes, tile, tile) of the tile whose core starts at (row, col)."""
        layout = self.layout
        if self.blend:
            r = row - layout.context - self.top
            c = col  # buffer column 0 is raster column -context
            assert self.weights is not None  # blending has weights
            weighted = np.multiply(probabilities, self.weights, out=self.scratch)
            self.sums[:, r : r + layout.tile, c : c + layout.tile] += weighted
            self.total_weight[r : r + layout.tile, c : c + layout.tile] += self.weights
        else:
            core = (
                probabilities[
                    :,
                    layout.context : layout.context + layout.core,
                    layout.context : layout.context + layout.core,
                ]
                if probabilities.shape[-1] == layout.tile
                else probabilities
            )
            r = row - self.top
            c = col + layout.context
            self.sums[:, r : r + layout.core, c : c + layout.core] = core
            self.total_weight[r : r + layout.core, c : c + layout.core] = 1.0

    def flush(
        self,
        next_row: int | None,
        *,
        keep_probabilities: bool = False,
        chunk: int = 2048,
        reweight: Reweight | None = None,
    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None]:
        """Hand out the finished rows (those the next strip cannot reach) and shift the buffer.

        Returns (first raster row, class indices (rows, width) uint8, confidence (rows, width)
        float32, and the merged probabilities (classes, rows, width) if asked for). Merging goes
        column chunk by chunk so no full-strip float copy is ever made; rows outside the raster
        are dropped. `reweight(first row, rows, first col, merged)` may change the merged
        probabilities of a chunk in place before the classes are picked (a prior layer).
        """
        layout = self.layout
        if next_row is None:
            reach = self.top + self.sums.shape[1]
        else:
            reach = next_row - layout.context if self.blend else next_row
        count = reach - self.top
        start = self.top
        keep_from, keep_to = max(0, -start), max(0, min(count, layout.height - start))
        rows = max(keep_to - keep_from, 0)
        classes = np.empty((rows, layout.width), dtype=np.uint8)
        confidence = np.empty((rows, layout.width), dtype=np.float32)
        probabilities = (
            np.empty((self.num_classes, rows, layout.width), dtype=np.float32)
            if keep_probabilities
            else None
        )
        for col in range(0, layout.width, chunk):
            width = min(chunk, layout.width - col)
            c0 = layout.context + col
            merged = self.sums[:, keep_from:keep_to, c0 : c0 + width] / np.maximum(
                self.total_weight[keep_from:keep_to, c0 : c0 + width], 1e-12
            )
            if reweight is not None and rows:
                reweight(start + keep_from, rows, col, merged)
            classes[:, col : col + width] = merged.argmax(axis=0)
            confidence[:, col : col + width] = merged.max(axis=0)
            if probabilities is not None:
                probabilities[:, :, col : col + width] = merged
        # shift what stays (the overlap with the next strip) to the top of the buffer
        rest = self.sums.shape[1] - count
        if rest > 0:
            self.sums[:, :rest] = self.sums[:, count:].copy()
            self.total_weight[:rest] = self.total_weight[count:].copy()
        self.sums[:, max(rest, 0) :] = 0
        self.total_weight[max(rest, 0) :] = 0
        self.top = reach
        return start + keep_from, classes, confidence, probabilities
