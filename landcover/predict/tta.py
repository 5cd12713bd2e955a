"""Test-time augmentation: class probabilities averaged over flips or the 8 symmetries of the
square (`predict.tta=none|flips|d4`).

Aerial imagery has no up or down, so a model's mistakes that depend on orientation average
out. Each transform is undone on the probabilities before averaging, so the result lines up
with the tile and the predictor blends and stitches it as any other: no new seams. It costs
one forward pass per transform (4 for flips, 8 for d4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Transform = tuple[int, bool]  # (quarter turns, mirrored left-right first)

MODES: dict[str, list[Transform]] = {
    "none": [(0, False)],
    # identity, left-right, up-down (a mirror then a half turn), both (a half turn)
    "flips": [(0, False), (0, True), (2, True), (2, False)],
    "d4": [(turns, mirrored) for mirrored in (False, True) for turns in range(4)],
}


def apply(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    """(N, C, H, W) mirrored left-right (if asked), then turned by quarter turns."""
    turns, mirrored = transform
    if mirrored:
        batch = torch.flip(batch, dims=(-1,))
    return torch.rot90(batch, turns, dims=(-2, -1))


def undo(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    """The inverse of `apply`: turned back, then mirrored back."""
    turns, mirrored = transform
    batch = torch.rot90(batch, -turns, dims=(-2, -1))
    return torch.flip(batch, dims=(-1,)) if mirrored else batch


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
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    transforms: list[Transform],
) -> torch.Tensor:
    """Mean over `transforms` of the class probabilities of the transformed batch, each
    mapped back onto the untransformed tile."""
    total = None
    for transform in transforms:
        probabilities = torch.softmax(forward(apply(batch, transform).contiguous()), dim=1)
        probabilities = undo(probabilities, transform)
        total = probabilities if total is None else total + probabilities
    assert total is not None
    return total / len(transforms)
