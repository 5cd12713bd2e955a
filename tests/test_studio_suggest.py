"""Where to label next: the studio's suggestions go where the model hesitates, apart from
each other, across the classes, and not where a person already corrected."""

from __future__ import annotations

import numpy as np

from landcover.studio.suggest import suggest


def scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 200 x 200 map: class 0 on the left half, 1 on the right; confident except for a few
    unsure blobs (two on each side)."""
    classes = np.zeros((200, 200), np.uint8)
    classes[:, 100:] = 1
    confidence = np.full((200, 200), 0.95, np.float32)
    for row, col in ((40, 40), (150, 60), (50, 150), (160, 170)):
        confidence[row - 5 : row + 6, col - 5 : col + 6] = 0.4
    return classes, confidence


def test_suggestions_are_the_unsure_areas_spread_and_across_classes():
    classes, confidence = scene()
    found = suggest(classes, confidence, np.zeros(classes.shape, bool), count=4, spacing=30)
    centres = {(s.row, s.col) for s in found}
    for blob in ((40, 40), (150, 60), (50, 150), (160, 170)):  # each blob, within a pixel
        assert any(abs(r - blob[0]) <= 1 and abs(c - blob[1]) <= 1 for r, c in centres), blob
    assert [s.class_index for s in found][:2] in ([0, 1], [1, 0])  # the classes take turns
    assert all(s.score > 0.3 for s in found)  # 1 - 0.95 = 0.05 elsewhere
    points = np.array(sorted(centres))
    distances = np.hypot(*(points[:, None] - points[None]).transpose(2, 0, 1))
    assert distances[np.triu_indices(4, 1)].min() >= 30


def test_no_two_suggestions_side_by_side_and_corrected_areas_are_skipped():
    classes, confidence = scene()
    confidence[100:140, 20:80] = 0.3  # one large unsure area on the left
    corrected = np.zeros(classes.shape, bool)
    corrected[35:46, 35:46] = True  # (40, 40) was answered
    found = suggest(classes, confidence, corrected, count=6, spacing=30)
    centres = np.array([(s.row, s.col) for s in found])
    assert not any(abs(r - 40) < 10 and abs(c - 40) < 10 for r, c in centres)
    distances = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert distances[np.triu_indices(len(centres), 1)].min() >= 30
    inside = [(r, c) for r, c in centres if 100 <= r < 140 and 20 <= c < 80]
    assert 1 <= len(inside) <= 3  # the large area is asked about, not tiled with suggestions


def test_a_class_that_is_no_target_is_never_suggested():
    classes, confidence = scene()
    found = suggest(classes, confidence, np.zeros(classes.shape, bool), count=4, skip={1})
    assert found and all(s.class_index == 0 for s in found)


def test_a_tile_is_scored_strip_by_strip_as_the_whole_scene_would_be(monkeypatch):
    """A whole tile's scores are never held at once: the candidates found strip by strip (each
    with its neighbours' rows) are the local maxima of the whole scene's scores, in order."""
    from scipy import ndimage

    from landcover.studio import suggest as suggestions

    rng = np.random.default_rng(0)
    confidence = ndimage.uniform_filter(rng.random((301, 157)).astype(np.float32), 5)
    corrected = np.zeros(confidence.shape, bool)
    corrected[95:105, 20:60] = True  # across a strip's edge
    whole = suggestions.area_scores(confidence, corrected)  # one strip: the whole scene
    rows, cols = suggestions.local_peaks(whole, suggestions.RADIUS)
    order = np.argsort(-whole[rows, cols], kind="stable")[: suggestions.CANDIDATES]
    monkeypatch.setattr(suggestions, "STRIP", 50)
    assert np.array_equal(suggestions.area_scores(confidence, corrected), whole)
    found = suggestions.candidates(confidence, corrected)
    assert len(found[0]) > 20
    assert np.array_equal(found[0], rows[order]) and np.array_equal(found[1], cols[order])
    assert np.array_equal(found[2], whole[rows[order], cols[order]])
