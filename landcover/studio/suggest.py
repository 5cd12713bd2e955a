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


def area_scores(confidence: np.ndarray, corrected: np.ndarray, radius: int = RADIUS) -> np.ndarray:
    """Mean uncertainty over the disk around every pixel; -inf where the disk would touch a
    correction or leave the scene."""
    size = 2 * radius + 1
    uncertainty = 1.0 - confidence.astype(np.float32)
    scores = ndimage.uniform_filter(uncertainty, size=size, mode="nearest")
    near_corrections = ndimage.maximum_filter(corrected.astype(np.uint8), size=size) > 0
    scores[near_corrections] = -np.inf
    scores[:radius], scores[-radius:], scores[:, :radius], scores[:, -radius:] = (-np.inf,) * 4
    return scores


def pick_spread(
    scores: np.ndarray,
    classes: np.ndarray,
    count: int,
    spacing: int,
    radius: int = RADIUS,
    skip: set[int] | None = None,
) -> list[Suggestion]:
    """The best-scoring areas, no two within `spacing`, the classes taking turns (a class with
    no candidate left drops out of the turn)."""
    peaks = (scores == ndimage.maximum_filter(scores, size=2 * radius + 1)) & np.isfinite(scores)
    rows, cols = np.nonzero(peaks)
    order = np.argsort(-scores[rows, cols], kind="stable")[:CANDIDATES]
    rows, cols = rows[order], cols[order]
    by_class: dict[int, list[int]] = {}
    for position, (r, c) in enumerate(zip(rows, cols, strict=True)):
        index = int(classes[r, c])
        if skip and index in skip:
            continue
        by_class.setdefault(index, []).append(position)
    turn = sorted(by_class, key=lambda k: -scores[rows[by_class[k][0]], cols[by_class[k][0]]])
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
                    Suggestion(
                        int(here[0]), int(here[1]), radius, index, float(scores[tuple(here)])
                    )
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
    return pick_spread(
        area_scores(confidence, corrected, radius), classes, count, spacing, radius, skip
    )
