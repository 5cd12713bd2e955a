import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from landcover.data.schema import IGNORE_INDEX
from landcover.metrics import ConfusionMatrix, scores_from_matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_matrix_and_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    classes = 5
    target = rng.integers(0, classes, size=(6, 32, 32))
    # predictions agree with the labels most of the time, like a model would
    predicted = np.where(
        rng.random(target.shape) < 0.7, target, rng.integers(0, classes, size=target.shape)
    )
    target[rng.random(target.shape) < 0.1] = IGNORE_INDEX

    cm = ConfusionMatrix(classes)
    for batch in range(0, 6, 2):  # streamed in uneven pieces
        cm.update(
            torch.from_numpy(predicted[batch : batch + 2]),
            torch.from_numpy(target[batch : batch + 2]),
        )
    keep = target != IGNORE_INDEX
    y_true, y_pred = target[keep], predicted[keep]
    expected = confusion_matrix(y_true, y_pred, labels=range(classes))
    np.testing.assert_array_equal(cm.numpy(), expected)

    scores = scores_from_matrix(cm.numpy())
    labels = list(range(classes))
    assert scores.overall_accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores.kappa == pytest.approx(cohen_kappa_score(y_true, y_pred))
    np.testing.assert_allclose(
        scores.iou, jaccard_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(scores.f1, f1_score(y_true, y_pred, labels=labels, average=None))
    np.testing.assert_allclose(
        scores.precision, precision_score(y_true, y_pred, labels=labels, average=None)
    )
    np.testing.assert_allclose(
        scores.recall, recall_score(y_true, y_pred, labels=labels, average=None)
    )
    assert scores.mean_iou == pytest.approx(jaccard_score(y_true, y_pred, average="macro"))


def test_mean_iou_skips_absent_and_unscored_classes():
    matrix = np.array([[5, 1, 0], [2, 8, 0], [0, 0, 0]])  # class 2 never seen nor predicted
    scores = scores_from_matrix(matrix)
    assert np.isnan(scores.iou[2])
    assert scores.mean_iou == pytest.approx(np.mean([5 / 8, 8 / 11]))
    only_second = scores_from_matrix(matrix, scored=[1])
    assert only_second.mean_iou == pytest.approx(8 / 11)


def test_metric_names_follow_class_names():
    scores = scores_from_matrix(np.array([[3, 1], [0, 4]]))
    metrics = scores.as_metrics(["water", "trees"], [0, 1])
    assert metrics["val/iou_water"] == pytest.approx(3 / 4)
    assert metrics["val/f1_trees"] == pytest.approx(8 / 9)
    assert metrics["val/overall_accuracy"] == pytest.approx(7 / 8)
