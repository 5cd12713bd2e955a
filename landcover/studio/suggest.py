"""Where to label next: small areas where the model hesitates most, spread over the scene and
over the classes, away from what was already corrected.

A person correcting a map clicks where the map looks wrong; the model knows where it is unsure.
An area's score is its mean uncertainty (one minus the top class probability) over a disk of
the suggestion's radius. Suggestions are taken greedily, best first, with two rules that keep
them useful: no two closer than `spacing` (two clicks side by side teach the same thing), and
the classes the map draws take turns (a scene mostly of trees would otherwise ask only about
tree edges). Areas touching a correction are skipped: they were answered. Recomputed from the
current version's map after every retrain. Whether this beats random clicks is measured by
`experiments/studio_active_learning.py`, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

RADIUS = 6  # pixels: the area a suggestion asks about (a brush dab)
CANDIDATES = 4000  # local maxima considered, best first


@dataclass(frozen=True)
class Suggestion:
    """One place to look: its centre (pixel), radius, the class the map draws there, and its
    mean uncertainty (0: sure, towards 1: unsure)."""

    row: int
    col: int
    radius: int
    class_index: int
    score: float

    def to_dict(self) -> dict[str, float | int]:
        """Plain form for the page."""
        return {
            "row": self.row,
            "col": self.col,
            "radius": self.radius,
            "class_index": self.class_index,
            "score": round(self.score, 4),
        }


def default_spacing(height: int, width: int, count: int, radius: int) -> int:
    """Spread `count` suggestions over the scene: about the side of a square holding one, and
    never less than four radii."""
    return max(4 * radius, int(np.sqrt(height * width / max(count, 1)) / 2))


STRIP = 1024  # rows filtered at a time: a whole tile's float copies would be GBs


def area_scores(confidence: np.ndarray, corrected: np.ndarray, radius: int = RADIUS) -> np.ndarray:
    """Mean uncertainty over the disk around every pixel; -inf where the disk would touch a
    correction or leave the scene. Filtered strip by strip (each with `radius` rows of its
    neighbours), which gives exactly the whole scene's filters."""
    height = confidence.shape[0]
    scores = np.empty(confidence.shape, np.float32)
    for top in range(0, height, STRIP):
        lo, hi = max(0, top - radius), min(height, top + STRIP + radius)
        strip = area_scores_strip(confidence[lo:hi], corrected[lo:hi], radius)
        scores[top : top + STRIP] = strip[top - lo : top - lo + min(STRIP, height - top)]
    scores[:radius], scores[-radius:], scores[:, :radius], scores[:, -radius:] = (-np.inf,) * 4
    return scores


def local_peaks(scores: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cols of the finite local maxima of `scores` (within `radius`), strip by strip."""
    height = scores.shape[0]
    rows, cols = [], []
    for top in range(0, height, STRIP):
        lo, hi = max(0, top - radius), min(height, top + STRIP + radius)
        part = scores[lo:hi]
        peaks = (part == ndimage.maximum_filter(part, size=2 * radius + 1)) & np.isfinite(part)
        r, c = np.nonzero(peaks[top - lo : top - lo + min(STRIP, height - top)])
        rows.append(r + top)
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols)


def candidates(
    confidence: np.ndarray, corrected: np.ndarray, radius: int = RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, cols and scores of the best CANDIDATES local maxima of `area_scores`, best first:
    what `local_peaks(area_scores(...))` finds, computed strip by strip so that a whole tile's
    scores are never held at once."""
    height, width = confidence.shape
    rows, cols, values = [], [], []
    for top in range(0, height, STRIP):
        lo, hi = max(0, top - 2 * radius), min(height, top + STRIP + 2 * radius)
        scores = area_scores_strip(confidence[lo:hi], corrected[lo:hi], radius)
        rows_in = np.arange(lo, hi)  # the scene's own edges are out of bounds
        scores[(rows_in < radius) | (rows_in >= height - radius)] = -np.inf
        scores[:, :radius], scores[:, width - radius :] = -np.inf, -np.inf
        slo = max(0, top - radius) - lo  # the rows whose peaks are decided here, with a halo
        part = scores[slo : min(height, top + STRIP + radius) - lo]
        peaks = (part == ndimage.maximum_filter(part, size=2 * radius + 1)) & np.isfinite(part)
        offset = top - lo - slo
        r, c = np.nonzero(peaks[offset : offset + min(STRIP, height - top)])
        rows.append(r + top)
        cols.append(c)
        values.append(part[r + offset, c])
    all_rows, all_cols, all_values = (
        np.concatenate(rows),
        np.concatenate(cols),
        np.concatenate(values),
    )
    order = np.argsort(-all_values, kind="stable")[:CANDIDATES]
    return all_rows[order], all_cols[order], all_values[order]


def area_scores_strip(confidence: np.ndarray, corrected: np.ndarray, radius: int) -> np.ndarray:
    """`area_scores` of a strip, without the scene-edge rule (rows near the strip's ends are
    only right where the strip ends with the scene)."""
    size = 2 * radius + 1
    uncertainty = 1.0 - confidence.astype(np.float32)
    scores = ndimage.uniform_filter(uncertainty, size=size, mode="nearest")
    near = ndimage.maximum_filter(corrected.astype(np.uint8), size=size) > 0
    scores[near] = -np.inf
    return scores


def pick_spread(
    scores: np.ndarray,
    classes: np.ndarray,
    count: int,
    spacing: int,
    radius: int = RADIUS,
    skip: set[int] | None = None,
) -> list[Suggestion]:
    """The best-scoring areas of `scores`, no two within `spacing`, the classes taking turns."""
    rows, cols = local_peaks(scores, radius)
    order = np.argsort(-scores[rows, cols], kind="stable")[:CANDIDATES]
    rows, cols = rows[order], cols[order]
    return spread(rows, cols, scores[rows, cols], classes, count, spacing, radius, skip)


def spread(
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    classes: np.ndarray,
    count: int,
    spacing: int,
    radius: int = RADIUS,
    skip: set[int] | None = None,
) -> list[Suggestion]:
    """From candidates best first, no two within `spacing`, the classes taking turns (a class
    with no candidate left drops out of the turn)."""
    by_class: dict[int, list[int]] = {}
    for position, (r, c) in enumerate(zip(rows, cols, strict=True)):
        index = int(classes[r, c])
        if skip and index in skip:
            continue
        by_class.setdefault(index, []).append(position)
    turn = sorted(by_class, key=lambda k: -values[by_class[k][0]])
    cursor = dict.fromkeys(turn, 0)
    chosen: list[Suggestion] = []
    taken = np.empty((0, 2))
    while len(chosen) < count and turn:
        for index in list(turn):
            queue = by_class[index]
            while cursor[index] < len(queue):
                position = queue[cursor[index]]
                cursor[index] += 1
                here = np.array([rows[position], cols[position]])
                if len(taken) and np.min(np.hypot(*(taken - here).T)) < spacing:
                    continue
                taken = np.vstack([taken, here])
                chosen.append(
                    Suggestion(int(here[0]), int(here[1]), radius, index, float(values[position]))
                )
                break
            else:
                turn.remove(index)
            if len(chosen) == count:
                break
    return chosen


def suggest(
    classes: np.ndarray,
    confidence: np.ndarray,
    corrected: np.ndarray,
    count: int = 12,
    radius: int = RADIUS,
    spacing: int | None = None,
    skip: set[int] | None = None,
) -> list[Suggestion]:
    """Up to `count` places to correct next, best first within each class's turn. `skip`:
    class indices never suggested (a "no data" class is no target)."""
    height, width = classes.shape
    spacing = spacing or default_spacing(height, width, count, radius)
    rows, cols, values = candidates(confidence, corrected, radius)
    return spread(rows, cols, values, classes, count, spacing, radius, skip)
