"""Test-time augmentation: class probabilities averaged over flips or the 8 symmetries of the
square (`predict.tta=none|flips|d4`).

Aerial imagery has no up or down, so a model's mistakes that depend on orientation average
out. Each transform is undone on the probabilities before averaging, so the result lines up
with the tile and the predictor blends and stitches it as any other: no new seams. It costs
one forward pass per transform (4 for flips, 8 for d4).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Transform = tuple[int, bool]  # (quarter turns, mirrored left-right first)

MODES: dict[str, list[Transform]] = {
    "none": [(0, False)],
    # identity, left-right, up-down (a mirror then a half turn), both (a half turn)
    "flips": [(0, False), (0, True), (2, True), (2, False)],
    "d4": [(turns, mirrored) for mirrored in (False, True) for turns in range(4)],
}


def apply(batch: np.ndarray, transform: Transform) -> np.ndarray:
    """(N, C, H, W) mirrored left-right (if asked), then turned by quarter turns (a view)."""
    turns, mirrored = transform
    if mirrored:
        batch = batch[..., ::-1]
    return np.rot90(batch, turns, axes=(-2, -1))


def undo(batch: np.ndarray, transform: Transform) -> np.ndarray:
    """The inverse of `apply`: turned back, then mirrored back."""
    turns, mirrored = transform
    batch = np.rot90(batch, -turns, axes=(-2, -1))
    return batch[..., ::-1] if mirrored else batch


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities along axis 1, computed in place of the logits."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def check_mode(mode: str, tile_height: int, tile_width: int) -> list[Transform]:
    """The transforms of `mode`; quarter turns need square tiles."""
    from landcover.errors import ConfigValueError

    if mode not in MODES:
        raise ConfigValueError(f"config value predict.tta={mode!r} is not one of {list(MODES)}")
    transforms = MODES[mode]
    if tile_height != tile_width and any(turns % 2 for turns, _ in transforms):
        raise ConfigValueError(f"predict.tta={mode} turns tiles by 90 degrees: needs square tiles")
    return transforms


def averaged_probabilities(
    forward: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    transforms: list[Transform],
) -> np.ndarray:
    """Mean over `transforms` of the class probabilities of the transformed batch, each
    mapped back onto the untransformed tile."""
    total: np.ndarray | None = None
    for transform in transforms:
        # every forward returns a fresh array: the softmax may overwrite it
        logits = np.asarray(forward(np.ascontiguousarray(apply(batch, transform))), np.float32)
        probabilities = undo(softmax(logits), transform)
        if total is None:
            total = np.ascontiguousarray(probabilities)
        else:
            total += probabilities
    assert total is not None
    if len(transforms) > 1:
        total /= len(transforms)
    return total
