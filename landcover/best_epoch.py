"""What a training run records about its best epoch once the loop is over: the confusion
matrix the loop kept, and prediction panels drawn with the best weights."""

from __future__ import annotations

import numpy as np
import torch

from landcover.engine import Trainer
from landcover.figures import confusion_matrix_figure, panels_figure


@torch.inference_mode()
def val_panels(trainer: Trainer) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Image, labels and prediction for a few val windows spread over the val scenes."""
    dataset = trainer.data.val_dataset
    count = min(trainer.settings.num_panels, len(dataset))
    trainer.model.eval()
    images, targets, predictions = [], [], []
    for item in np.linspace(0, len(dataset) - 1, count).astype(int):
        image, target = dataset[int(item)]
        batch = image[None].to(trainer.device).contiguous(memory_format=trainer.memory_format)
        logits = trainer.forward(batch)
        margin = dataset.margin
        visible = image[:, margin : image.shape[1] - margin, margin : image.shape[2] - margin]
        images.append(visible.numpy())
        targets.append(target.numpy())
        predictions.append(logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8))
    return images, targets, predictions


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
    best = trainer.checkpoints.best(map_location=str(trainer.device))
    if best is not None:
        trainer.model.load_state_dict(best["model"])
    if trainer.settings.num_panels > 0:
        figure = panels_figure(*val_panels(trainer), trainer.schema)
        trainer.tracker.log_figure(figure, "panels/val_panels.png")
