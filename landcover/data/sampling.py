"""Training patches drawn at random and validation tiles laid on a grid.

Randomness is keyed on (seed, epoch, index) rather than on a stateful generator, so a patch
does not depend on how many DataLoader workers (or, later, DDP ranks) produce the batches:
runs are reproducible whatever the parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from landcover.data.reader import SceneReader


@dataclass(frozen=True)
class RareClassSampling:
    """The 2018 tutorial's rejection sampling: keep a patch outright when the rare classes
    cover more than `min_fraction` of it, otherwise keep it with probability `keep_probability`.
    """

    class_indices: tuple[int, ...]
    min_fraction: float
    keep_probability: float
    max_tries: int = 50

    def accepts(self, target: np.ndarray, rng: np.random.Generator) -> bool:
        """Whether a patch is kept: always when rare classes cover enough of it, otherwise with
        `keep_probability`."""
        share = np.isin(target, self.class_indices).mean()
        return bool(share > self.min_fraction or rng.random() < self.keep_probability)


def jitter_radiometry(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-band random gain and offset: scenes flown on other days differ in brightness and
    band balance, and a model trained on a few scenes should not learn their exact levels."""
    bands = image.shape[0]
    gain = rng.uniform(1 - strength, 1 + strength, size=(bands, 1, 1)).astype(np.float32)
    offset = rng.uniform(-strength, strength, size=(bands, 1, 1)).astype(np.float32) * 64
    return np.clip(image * gain + offset, 0, 255).astype(np.uint8)


def augment(
    image: np.ndarray, target: np.ndarray, rng: np.random.Generator, *, flips: bool, rot90: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and quarter turns, the same for image (C,H,W) and target (H,W)."""
    if flips and rng.random() < 0.5:
        image, target = image[:, :, ::-1], target[:, ::-1]
    if flips and rng.random() < 0.5:
        image, target = image[:, ::-1, :], target[::-1, :]
    if rot90:
        turns = int(rng.integers(4))
        if turns:
            image, target = np.rot90(image, turns, axes=(1, 2)), np.rot90(target, turns)
    return image, target


class RandomPatchDataset(Dataset):
    """`length` random square windows per epoch, scenes drawn in proportion to their area."""

    def __init__(
        self,
        reader: SceneReader,
        *,
        patch_size: int,
        length: int,
        seed: int,
        rare: RareClassSampling | None = None,
        flips: bool = True,
        rot90: bool = True,
        color_jitter: float = 0.0,
    ) -> None:
        too_small = [s.image_path for s in reader.scenes if min(s.width, s.height) < patch_size]
        if too_small:
            raise ValueError(
                f"patch_size {patch_size} is larger than scene(s) {too_small}; "
                "lower data.patch_size"
            )
        self.reader = reader
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.rare = rare
        self.flips = flips
        self.rot90 = rot90
        self.color_jitter = color_jitter
        self.epoch = 0
        areas = np.array([s.pixels for s in reader.scenes], dtype=np.float64)
        self.scene_weights = areas / areas.sum()

    def set_epoch(self, epoch: int) -> None:
        """Patch positions depend on (seed, epoch, index) only, so any worker count and a resumed
        run draw the same patches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _draw_window(self, rng: np.random.Generator) -> tuple[int, int, int]:
        index = int(rng.choice(len(self.scene_weights), p=self.scene_weights))
        scene = self.reader.scenes[index]
        row = int(rng.integers(scene.height - self.patch_size + 1))
        col = int(rng.integers(scene.width - self.patch_size + 1))
        return index, row, col

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, item))
        size = self.patch_size
        tries = self.rare.max_tries if self.rare else 1
        for _ in range(tries):
            index, row, col = self._draw_window(rng)
            target = self.reader.read_target(index, row, col, size, size)
            if self.rare is None or self.rare.accepts(target, rng):
                break
        image = self.reader.read_image(index, row, col, size, size)
        image, target = augment(image, target, rng, flips=self.flips, rot90=self.rot90)
        if self.color_jitter:
            image = jitter_radiometry(image, rng, self.color_jitter)
        return (
            torch.from_numpy(np.ascontiguousarray(image)),
            torch.from_numpy(np.ascontiguousarray(target)),
        )


class GridPatchDataset(Dataset):
    """Output tiles of `tile` pixels covering every pixel of every scene exactly once.

    Each input is the tile grown by `margin` on every side, for networks that predict only the
    centre of what they see (the 2018 tutorial's 256-in / 128-out network has margin 64).
    Beyond the scene's edge the target is IGNORE_INDEX, so no pixel is scored twice.
    """

    def __init__(self, reader: SceneReader, *, tile: int, margin: int = 0) -> None:
        self.reader = reader
        self.tile = tile
        self.margin = margin
        self.windows = [
            (index, row, col)
            for index, scene in enumerate(reader.scenes)
            for row in range(0, scene.height, tile)
            for col in range(0, scene.width, tile)
        ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, row, col = self.windows[item]
        m, size = self.margin, self.tile
        image, _ = self.reader.read_padded(index, row - m, col - m, size + 2 * m, size + 2 * m)
        _, target = self.reader.read_padded(index, row, col, size, size)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(
            np.ascontiguousarray(target)
        )
