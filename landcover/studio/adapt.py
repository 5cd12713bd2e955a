"""Learning a person's corrections: a regularised fit of the head on kept features.

The corrected pixels pull the head towards the painted classes; anchor pixels, sampled outside
the corrections and labelled with the current map's own classes (uniformly, plus a few of every
class so a rare one is held too), hold the rest of the map where it was, and a penalty on the
distance to the starting weights keeps the change small. The map elsewhere may still change:
that is what the retrain's metrics report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from landcover.studio.head import Head, SceneFeatures

UNIFORM_ANCHORS = 6000
ANCHORS_PER_CLASS = 300
MAX_CORRECTED = 60_000  # corrected pixels a fit reads: a whole accepted scene stays cheap
STEPS = 300
LEARNING_RATE = 0.01
ANCHOR_WEIGHT = 10.0
PROXIMAL_WEIGHT = 1e-3


@dataclass(frozen=True)
class FitReport:
    """What a retrain did, for its MLflow run and the page."""

    corrected_pixels: int
    anchor_pixels: int
    corrected_accuracy_before: float
    corrected_accuracy_after: float
    changed_pixels: int  # pixels of the scene whose class changed
    steps: int
    # overall accuracy and mIoU before and after, and what they were scored on (the scene's
    # labels or the corrections): filled once the retrain's run has them
    scores: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Fitted:
    """The refitted head, what the fit did, and the map under the new head (computed once:
    the run's scores, its picture and the version's rasters all read it)."""

    head: Head
    report: FitReport
    classes: np.ndarray  # class index of every pixel
    confidence: np.ndarray


def nth_true(mask: np.ndarray, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cols of the `picks`-th True pixels of `mask` in row-major order: what
    `np.nonzero(mask)` indexed by `picks` gives, without listing every True pixel (16 bytes
    each: 720 MB for a 45 Mpx tile)."""
    per_row = np.count_nonzero(mask, axis=1)
    ends = np.cumsum(per_row)
    rows = np.searchsorted(ends, picks, side="right")
    within = picks - (ends[rows] - per_row[rows])
    cols = np.empty(len(picks), np.int64)
    for row in np.unique(rows):
        chosen = rows == row
        cols[chosen] = np.flatnonzero(mask[row])[within[chosen]]
    return rows.astype(np.int64), cols


def row_strips(height: int, rows: int = 1024) -> Iterator[slice]:
    """A scene's rows a strip at a time, for work that widens its input (np.bincount and
    torch's `long` to 8 bytes a pixel, float copies to 4): 360 MB for a 45 Mpx tile at once."""
    for top in range(0, height, rows):
        yield slice(top, min(top + rows, height))


def value_counts(values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """How many pixels hold each byte value (where `where`), strip by strip."""
    counts = np.zeros(256, np.int64)
    for rows in row_strips(values.shape[0]):
        part = values[rows] if where is None else values[rows][where[rows]]
        counts += np.bincount(part.ravel(), minlength=256)
    return counts


def anchor_pixels(
    classes: np.ndarray, corrected: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, cols and classes of pixels that keep the current map's class: a uniform sample of
    the uncorrected pixels (each class by its area), plus a few of every class present so
    that a rare one is held too."""
    rng = np.random.default_rng(seed)
    free = ~corrected
    count = int(np.count_nonzero(free))
    pick = rng.choice(count, size=min(count, UNIFORM_ANCHORS), replace=False)
    picked = nth_true(free, pick)
    rows, cols = [picked[0]], [picked[1]]
    for value in np.flatnonzero(value_counts(classes, free)):
        of_class = free & (classes == value)
        count = int(np.count_nonzero(of_class))
        few = rng.choice(count, size=min(count, ANCHORS_PER_CLASS), replace=False)
        r, c = nth_true(of_class, few)
        rows.append(r)
        cols.append(c)
    all_rows, all_cols = np.concatenate(rows), np.concatenate(cols)
    return all_rows, all_cols, classes[all_rows, all_cols].astype(np.int64)


def sample_corrected(corrected: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The corrected pixels a fit reads: all of them, or a uniform sample of MAX_CORRECTED
    when a person accepted or painted most of a scene (each holds a k x k x channels vector:
    millions would not fit in memory, and a sample of this size teaches the same head). When
    nothing is left uncorrected there are no anchors, and the corrections alone hold the map."""
    count = int(np.count_nonzero(corrected))
    if count <= MAX_CORRECTED:
        return nth_true(corrected, np.arange(count))
    pick = np.random.default_rng(seed).choice(count, size=MAX_CORRECTED, replace=False)
    pick.sort()
    return nth_true(corrected, pick)


def fit_head(
    scene: SceneFeatures,
    start: Head,
    current: np.ndarray,
    corrections: np.ndarray,
    ignore_value: int,
    seed: int = 0,
) -> Fitted:
    """A new head that maps the corrected pixels (class indices in `corrections`, `ignore_value`
    elsewhere) to their classes while keeping the rest of `current`, `start`'s map."""
    torch.manual_seed(seed)
    corrected = corrections != ignore_value
    rows, cols = sample_corrected(corrected, seed)
    targets = torch.from_numpy(corrections[rows, cols].astype(np.int64))
    a_rows, a_cols, a_targets = anchor_pixels(current, corrected, seed)
    x_fix = torch.from_numpy(scene.neighbourhoods(rows, cols).astype(np.float32))
    x_anchor = torch.from_numpy(scene.neighbourhoods(a_rows, a_cols).astype(np.float32))
    y_anchor = torch.from_numpy(a_targets)

    w0 = start.weight.reshape(start.weight.shape[0], -1)
    weight = w0.clone().requires_grad_(True)
    bias = start.bias.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=LEARNING_RATE)

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = x @ weight.T + bias
        return torch.relu(out) if start.relu else out

    with torch.no_grad():
        before = float((logits(x_fix).argmax(1) == targets).float().mean()) if len(rows) else 1.0
    rows_free = torch.zeros(len(w0), 1)
    rows_free[torch.unique(targets)] = 1.0  # only the corrected classes' scores move
    for _ in range(STEPS):
        optimiser.zero_grad()
        loss = F.cross_entropy(logits(x_fix), targets)
        if len(a_rows):
            loss = loss + ANCHOR_WEIGHT * F.cross_entropy(logits(x_anchor), y_anchor)
        loss = loss + PROXIMAL_WEIGHT * (weight - w0).pow(2).sum()
        loss.backward()
        assert weight.grad is not None and bias.grad is not None
        weight.grad *= rows_free
        bias.grad *= rows_free[:, 0]
        optimiser.step()
    with torch.no_grad():
        after = float((logits(x_fix).argmax(1) == targets).float().mean()) if len(rows) else 1.0
    head = Head(
        weight.detach().reshape(start.weight.shape).clone(), bias.detach().clone(), start.relu
    )
    new_classes, confidence = scene.classes_and_confidence(head)
    report = FitReport(
        corrected_pixels=int(corrected.sum()),
        anchor_pixels=len(a_rows),
        corrected_accuracy_before=before,
        corrected_accuracy_after=after,
        changed_pixels=int((new_classes != current).sum()),
        steps=STEPS,
    )
    return Fitted(head, report, new_classes, confidence)
