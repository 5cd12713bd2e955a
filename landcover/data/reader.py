"""Windowed reads of scenes, shared by the training sampler and the validation grid.

A reader opens its file handles lazily and per process: DataLoader workers are forked after
the dataset is built, and a GDAL handle must never be shared across processes. Scenes small
enough (by `cache_max_pixels`) are read whole once per process and sliced from memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from landcover.data.scenes import Scene, open_raster
from landcover.data.schema import IGNORE_INDEX
from landcover.errors import SceneError


class SceneReader:
    """Reads windows of one scene, keeping the files open per process and the whole scene in memory
    when it is small."""

    def __init__(
        self, scenes: Sequence[Scene], lookup_table: np.ndarray, cache_max_pixels: int = 0
    ) -> None:
        self.scenes = list(scenes)
        self.lookup_table = lookup_table
        self.cache_max_pixels = cache_max_pixels
        self._pid: int | None = None
        self._handles: dict[int, tuple] = {}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        # Handles never travel to another process (spawned workers, DDP ranks).
        state = self.__dict__.copy()
        state.update(_pid=None, _handles={}, _cache={})
        return state

    def _ensure_process(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._handles = {}
            self._cache = {}

    def _open(self, index: int) -> tuple:
        self._ensure_process()
        if index not in self._handles:
            scene = self.scenes[index]
            self._handles[index] = (open_raster(scene.image_path), open_raster(scene.label_path))
        return self._handles[index]

    def _cached(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.scenes[index].pixels > self.cache_max_pixels:
            return None
        self._ensure_process()
        if index not in self._cache:
            image, label = self._open(index)
            self._cache[index] = (image.read(), self.lookup_table[label.read(1)])
        return self._cache[index]

    def read_target(self, index: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Training targets (class indices, IGNORE_INDEX where ignored) of a window inside the
        scene."""
        cached = self._cached(index)
        if cached is not None:
            return cached[1][row : row + height, col : col + width]
        _, label = self._open(index)
        window = Window(col, row, width, height)
        codes = self._read(label, self.scenes[index].label_path, window, 1)
        return self.lookup_table[codes]

    def read_image(self, index: int, row: int, col: int, height: int, width: int) -> np.ndarray:
        """(bands, height, width) uint8 pixels of a window inside the scene."""
        cached = self._cached(index)
        if cached is not None:
            return cached[0][:, row : row + height, col : col + width]
        image, _ = self._open(index)
        return self._read(image, self.scenes[index].image_path, Window(col, row, width, height))

    @staticmethod
    def _read(source, path: str, window: Window, band: int | None = None) -> np.ndarray:
        """A windowed read whose failure (a corrupt block met mid-epoch) names file and window."""
        try:
            return source.read(band, window=window) if band else source.read(window=window)
        except RasterioIOError as err:
            raise SceneError(
                f"{path}: reading window col {window.col_off}, row {window.row_off}, "
                f"{window.width} x {window.height} failed: corrupt block? ({err})"
            ) from err

    def read_padded(
        self, index: int, row: int, col: int, height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """A window that may hang over the scene's edge: the image is mirrored there (so a
        network sees plausible context), the target is IGNORE_INDEX (so no pixel is scored
        twice or invented)."""
        scene = self.scenes[index]
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, scene.height), min(col + width, scene.width)
        image = self.read_image(index, r0, c0, r1 - r0, c1 - c0)
        target = self.read_target(index, r0, c0, r1 - r0, c1 - c0)
        pads = ((r0 - row, row + height - r1), (c0 - col, col + width - c1))
        if any(p for pair in pads for p in pair):
            image = np.pad(image, ((0, 0), *pads), mode="symmetric")
            target = np.pad(target, pads, mode="constant", constant_values=IGNORE_INDEX)
        return image, target
