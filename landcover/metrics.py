"""A streaming confusion matrix over every labelled pixel, and the scores derived from it.

Scores come from the summed matrix, never from averaging per-batch scores: a batch with three
water pixels must not weigh as much as one with a million. The matrix lives on the model's
device so accumulating it costs no host transfer per batch; summing matrices from several
processes (DDP ranks) gives exactly the single-process result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from landcover.data.schema import IGNORE_INDEX


class ConfusionMatrix:
    """Rows are true classes, columns predicted classes."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch; pixels whose target is IGNORE_INDEX (or out of range) are skipped."""
        target = target.reshape(-1).long()
        predicted = predicted.reshape(-1).long()
        keep = (target != IGNORE_INDEX) & (target >= 0) & (target < self.num_classes)
        flat = target[keep] * self.num_classes + predicted[keep]
        self.matrix += torch.bincount(flat, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def numpy(self) -> np.ndarray:
        """The counts on the CPU as int64 (labels in rows, predictions in columns)."""
        return self.matrix.cpu().numpy()


@dataclass(frozen=True)
class Scores:
    """Per-class and overall scores from one confusion matrix: the only source of every metric we
    log."""

    overall_accuracy: float
    mean_iou: float
    kappa: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    iou: np.ndarray
    support: np.ndarray

    def as_metrics(
        self, class_names: Sequence[str], scored: Sequence[int], prefix: str = "val/"
    ) -> dict[str, float]:
        """Flat metric names for tracking: val/overall_accuracy, val/iou_water, ..."""
        metrics = {
            f"{prefix}overall_accuracy": self.overall_accuracy,
            f"{prefix}mIoU": self.mean_iou,
            f"{prefix}kappa": self.kappa,
        }
        for index in scored:
            name = metric_safe(class_names[index])
            for key, values in zip(
                PER_CLASS, (self.iou, self.f1, self.precision, self.recall), strict=True
            ):
                if not np.isnan(values[index]):
                    metrics[f"{prefix}{key}_{name}"] = float(values[index])
        return metrics


PER_CLASS = ("iou", "f1", "precision", "recall")
_NOT_IN_METRIC_NAMES = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_safe(class_name: str) -> str:
    """A class name as MLflow accepts it in a metric name (alphanumerics, `_-. :/`): a model
    file's names are anyone's text, and one odd character refused the whole batch."""
    return _NOT_IN_METRIC_NAMES.sub("_", class_name)[:200]


OVERALL = ("overall_accuracy", "mIoU", "kappa")


def metric_names(
    class_names: Sequence[str], scored: Sequence[int], prefix: str = "val/"
) -> set[str]:
    """Every name `Scores.as_metrics` can produce for this schema (to check a monitor early)."""
    names = {f"{prefix}{key}" for key in OVERALL}
    for index in scored:
        names |= {f"{prefix}{key}_{class_names[index]}" for key in PER_CLASS}
    return names


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def scores_from_matrix(matrix: np.ndarray, scored: Sequence[int] | None = None) -> Scores:
    """Overall accuracy, Cohen's kappa, per-class precision/recall/F1/IoU.

    Mean IoU averages the classes that are present (in the labels or the predictions) among
    `scored`: a class absent from a validation set says nothing about the model.
    """
    matrix = matrix.astype(np.float64)
    total = matrix.sum()
    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * true_positive, support + predicted)
    iou = _safe_divide(true_positive, support + predicted - true_positive)
    overall = float(true_positive.sum() / total) if total else float("nan")
    expected = float((support * predicted).sum() / total**2) if total else float("nan")
    kappa = (overall - expected) / (1 - expected) if total and expected < 1 else float("nan")
    scored = list(range(len(matrix))) if scored is None else list(scored)
    present = [i for i in scored if support[i] + predicted[i] > 0]
    mean_iou = float(np.mean(iou[present])) if present else float("nan")
    return Scores(
        overall, mean_iou, float(kappa), precision, recall, f1, iou, support.astype(np.int64)
    )
