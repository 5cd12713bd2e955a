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

from collections.abc import Iterator
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


def _strips(height: int, halo: int) -> Iterator[tuple[slice, slice]]:
    """Each STRIP rows of the scene: the rows read (with `halo` rows of the neighbours on each
    side, clipped to the scene) and, within those, the rows the strip answers for."""
    for top in range(0, height, STRIP):
        lo, hi = max(0, top - halo), min(height, top + STRIP + halo)
        yield slice(lo, hi), slice(top - lo, top - lo + min(STRIP, height - top))


def _peaks_in(scores: np.ndarray, keep: slice, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (counted from `keep`'s start) and cols of the finite local maxima of `scores`
    (within `radius`) among the rows `keep`."""
    size = 2 * radius + 1
    peaks = (scores == ndimage.maximum_filter(scores, size=size)) & np.isfinite(scores)
    rows, cols = np.nonzero(peaks[keep])
    return rows, cols


def area_scores(confidence: np.ndarray, corrected: np.ndarray, radius: int = RADIUS) -> np.ndarray:
    """Mean uncertainty over the disk around every pixel; -inf where the disk would touch a
    correction or leave the scene. Filtered strip by strip (each with `radius` rows of its
    neighbours), which gives exactly the whole scene's filters."""
    scores = np.empty(confidence.shape, np.float32)
    for read, keep in _strips(confidence.shape[0], radius):
        strip = area_scores_strip(confidence[read], corrected[read], radius)
        scores[read.start + keep.start : read.start + keep.stop] = strip[keep]
    scores[:radius], scores[-radius:], scores[:, :radius], scores[:, -radius:] = (-np.inf,) * 4
    return scores


def local_peaks(scores: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cols of the finite local maxima of `scores` (within `radius`), strip by strip."""
    rows, cols = [], []
    for read, keep in _strips(scores.shape[0], radius):
        r, c = _peaks_in(scores[read], keep, radius)
        rows.append(r + read.start + keep.start)
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols)


def candidates(
    confidence: np.ndarray, corrected: np.ndarray, radius: int = RADIUS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, cols and scores of the best CANDIDATES local maxima of `area_scores`, best first:
    what `local_peaks(area_scores(...))` finds, computed strip by strip so that a whole tile's
    scores are never held at once (each strip reads 2 radii of its neighbours: one for the
    scores its peaks compare, one for the disks of those)."""
    height, width = confidence.shape
    rows, cols, values = [], [], []
    for read, keep in _strips(height, 2 * radius):
        scores = area_scores_strip(confidence[read], corrected[read], radius)
        scene_rows = np.arange(read.start, read.stop)  # the scene's own edges are out of bounds
        scores[(scene_rows < radius) | (scene_rows >= height - radius)] = -np.inf
        scores[:, :radius], scores[:, width - radius :] = -np.inf, -np.inf
        r, c = _peaks_in(scores, keep, radius)
        rows.append(r + read.start + keep.start)
        cols.append(c)
        values.append(scores[keep][r, c])
    found = np.concatenate(rows), np.concatenate(cols), np.concatenate(values)
    order = np.argsort(-found[2], kind="stable")[:CANDIDATES]
    return found[0][order], found[1][order], found[2][order]


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
