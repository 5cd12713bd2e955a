"""What a training run records about its best epoch once the loop is over: the confusion
matrix the loop kept, per-class scores, learning curves, and prediction panels drawn with the
best weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from landcover.metrics import metric_safe
from landcover.tracking.figures import (
    confusion_matrix_figure,
    learning_curves_figure,
    panels_figure,
    per_class_scores_figure,
)
from landcover.training.loop import Trainer


def window_title(trainer: Trainer, item: int) -> str:
    """`<scene file> rows r0-r1, cols c0-c1`: where a panel comes from."""
    dataset = trainer.data.val_dataset
    index, row, col = dataset.windows[item]
    scene = Path(trainer.data.val_scenes[index].image_path).name
    size = dataset.tile
    return f"{scene}\nrows {row}-{row + size}, cols {col}-{col + size}"


@torch.inference_mode()
def val_panels(
    trainer: Trainer,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[str]]:
    """Image, labels, prediction and title for a few val windows spread over the val scenes."""
    dataset = trainer.data.val_dataset
    count = min(trainer.settings.num_panels, len(dataset))
    trainer.model.eval()
    images, targets, predictions, titles = [], [], [], []
    for item in np.linspace(0, len(dataset) - 1, count).astype(int):
        titles.append(window_title(trainer, int(item)))
        image, target = dataset[int(item)]
        batch = image[None].to(trainer.device).contiguous(memory_format=trainer.memory_format)
        logits = trainer.forward(batch)
        margin = dataset.margin
        visible = image[:, margin : image.shape[1] - margin, margin : image.shape[2] - margin]
        images.append(visible.numpy())
        targets.append(target.numpy())
        predictions.append(logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8))
    return images, targets, predictions, titles


def log_best_epoch(trainer: Trainer) -> None:
    """Confusion matrix of the best epoch, then the best weights loaded and panels drawn."""
    state = trainer.state
    if not trainer.tracker.enabled or state.best_matrix is None:
        return
    matrix = np.array(state.best_matrix)
    names = trainer.schema.names
    title = f"val confusion matrix, best epoch {state.best_epoch}"
    trainer.tracker.log_confusion_matrix(
        matrix, names, confusion_matrix_figure(matrix, names, title)
    )
    at_best = next((h for h in state.history if h["epoch"] == state.best_epoch), {})
    scores = {
        metric: {
            name: at_best.get(f"val/{metric.lower()}_{metric_safe(name)}", 0.0) for name in names
        }
        for metric in ("IoU", "F1")
    }
    trainer.tracker.log_figure(
        per_class_scores_figure(
            scores, trainer.schema, f"val per class, best epoch {state.best_epoch}"
        ),
        "figures/per_class_scores.png",
    )
    trainer.tracker.log_figure(
        learning_curves_figure(state.history, trainer.settings.monitor, state.best_epoch),
        "figures/learning_curves.png",
    )
    best = trainer.checkpoints.best(map_location=str(trainer.device))
    if best is not None:
        trainer.model.load_state_dict(best["model"])
    if trainer.settings.num_panels > 0:
        images, targets, predictions, titles = val_panels(trainer)
        figure = panels_figure(images, targets, predictions, trainer.schema, titles)
        trainer.tracker.log_figure(figure, "panels/val_panels.png")
