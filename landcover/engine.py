"""The fit loop: train an epoch, validate on the grid, keep checkpoints, report, stop early.

Plain PyTorch rather than Lightning: the loop is short, and owning it keeps the three things
we care about explicit (a streaming confusion matrix over every val pixel, per-index patch
seeds for reproducibility, and MLflow as the only logger).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from landcover.checkpoint import link_checkpoint, read_checkpoint, save_checkpoint
from landcover.data.loaders import TrainingData
from landcover.data.schema import IGNORE_INDEX
from landcover.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    all_reduce_sum,
    sync_batchnorm,
)
from landcover.figures import confusion_matrix_figure, panels_figure
from landcover.metrics import ConfusionMatrix, metric_names, scores_from_matrix
from landcover.models import SegmentationModel
from landcover.tracking import Tracker

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, Mapping[str, float]], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: nothing later in the run can be trusted."""


@dataclass
class FitState:
    """What a checkpoint must carry for a resumed run to continue exactly where it stopped."""

    epoch: int = -1
    best_value: float | None = None
    best_epoch: int | None = None
    best_matrix: list[list[int]] | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class FitResult:
    best_value: float | None
    best_epoch: int | None
    last_metrics: dict[str, float]
    run_id: str | None
    model_uri: str | None
    checkpoint_dir: Path
    summary: dict[str, float] = field(default_factory=dict)


@dataclass
class FitSettings:
    max_epochs: int
    monitor: str = "val/mIoU"
    monitor_mode: str = "max"
    patience: int | None = None
    min_delta: float = 0.0
    num_panels: int = 4
    progress: bool = True
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    keep_epoch_checkpoints: int = 0


class Trainer:
    def __init__(
        self,
        *,
        model: SegmentationModel,
        loss_fn: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        data: TrainingData,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        settings: FitSettings,
        checkpoint_dir: Path,
        tracker: Tracker | None = None,
        epoch_callback: EpochCallback | None = None,
        checkpoint_extra: Mapping[str, Any] | None = None,
        distributed: DistributedContext = SINGLE_PROCESS,
        compile_model: bool = False,
    ) -> None:
        self.model = model.to(device)
        self.loss_fn = loss_fn.to(device)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.device = device
        self.bf16 = bf16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.settings = settings
        self.checkpoint_dir = checkpoint_dir
        self.tracker = tracker
        self.epoch_callback = epoch_callback
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.state = FitState()
        self.schema = data.schema
        # Several processes: the gradient step goes through DDP (gradients averaged across
        # ranks, batch norm over the global batch); validation, checkpoints and artefacts use
        # the plain module. Only rank 0 writes (its tracker is the only one).
        self.distributed = distributed
        self.train_model: torch.nn.Module = self.model
        if distributed.enabled and optimizer is not None:
            sync_batchnorm(self.model)
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # the same layers run every step; some encoders hold layers a shallow
                # encoder_depth never uses, which a static graph tolerates at no per-step cost
                static_graph=True,
            )
        if compile_model and optimizer is not None:
            self.train_model = torch.compile(self.train_model)

    def metric_names(self) -> set[str]:
        """Every per-epoch metric this trainer logs: a monitor must be one of them."""
        names = metric_names(self.schema.names, self.schema.scored_classes)
        names |= {"val/loss", "epoch_seconds", "train/patches_per_s"}
        if self.optimizer is None:
            return names | {"train/pixels", "train/iterations"}
        return names | {"train/loss", "train/lr"}

    # -- state ---------------------------------------------------------------------------------
    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint.get("scheduler") is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = FitState(**checkpoint["fit_state"])

    def _checkpoint(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "fit_state": self.state.__dict__,
            "run_id": self.tracker.run_id if self.tracker else None,
            **self.checkpoint_extra,
        }

    # -- steps ---------------------------------------------------------------------------------
    def _to_device(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = image.to(self.device, non_blocking=True).contiguous(
            memory_format=self.memory_format
        )
        target = target.to(self.device, non_blocking=True).long()
        margin = self.model.output_margin
        if margin and target.shape[-1] == image.shape[-1]:
            target = target[..., margin:-margin, margin:-margin]
        return image, target

    def _batches(self, loader, limit: int | None, description: str):
        """Batches on the device, at most `limit` of them, behind a progress bar."""
        total = min(limit or len(loader), len(loader))
        self.progress_bar = tqdm(
            loader,
            total=total,
            desc=description,
            leave=False,
            disable=not (self.settings.progress and self.distributed.is_main),
            dynamic_ncols=True,
        )
        for step, (image, target) in enumerate(self.progress_bar):
            if step >= total:
                break
            yield self._to_device(image, target)
        self.progress_bar.close()

    def _forward(self, image: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return (model if model is not None else self.model)(image).float()

    def fit_pixels(self, epoch: int) -> dict[str, float]:
        """A model fitted, not trained (the per-pixel baseline): one pass over the training
        patches collects the labelled pixels, then the model fits them at once."""
        self.data.train_dataset.set_epoch(epoch)
        started = time.perf_counter()
        pixels, labels, patches = [], [], 0
        batches = self._batches(
            self.data.train_loader, self.settings.limit_train_batches, f"epoch {epoch} pixels"
        )
        for image, target in batches:
            labelled = target != IGNORE_INDEX
            pixels.append(image.permute(0, 2, 3, 1)[labelled].cpu().numpy())
            labels.append(target[labelled].cpu().numpy())
            patches += image.shape[0]
        metrics = self.model.net.fit_pixels(np.concatenate(pixels), np.concatenate(labels))
        seconds = time.perf_counter() - started
        return {**metrics, "train/patches_per_s": patches / max(seconds, 1e-9)}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        if self.optimizer is None:
            return self.fit_pixels(epoch)
        self.model.train()
        self.data.train_dataset.set_epoch(epoch)
        total_loss, steps, patches = 0.0, 0, 0
        started = time.perf_counter()
        batches = self._batches(
            self.data.train_loader, self.settings.limit_train_batches, f"epoch {epoch} train"
        )
        for step, (image, target) in enumerate(batches):
            if not bool((target != IGNORE_INDEX).any()):
                continue
            loss = self.loss_fn(self._forward(image, self.train_model), target)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"loss became {loss.item()} at epoch {epoch} step {step}; "
                    "lower optimizer.lr or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item()
            steps += 1
            patches += image.shape[0]
            self.progress_bar.set_postfix(loss=f"{total_loss / steps:.4f}")
        seconds = time.perf_counter() - started
        return {
            "train/loss": total_loss / max(steps, 1),
            "train/patches_per_s": patches / max(seconds, 1e-9),
            "train/lr": self.optimizer.param_groups[0]["lr"],
        }

    @torch.inference_mode()
    def validate(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        self.model.eval()
        matrix = ConfusionMatrix(self.schema.num_classes, self.device)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        labelled = 0
        for image, target in self._batches(
            self.data.val_loader, self.settings.limit_val_batches, f"epoch {epoch} val"
        ):
            logits = self._forward(image)
            loss_sum += F.cross_entropy(
                logits, target, ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            labelled += int((target != IGNORE_INDEX).sum())
            matrix.update(logits.argmax(dim=1), target)
        # the confusion matrix is summed across ranks (each scored its own tiles), not averaged
        all_reduce_sum(matrix.matrix)
        all_reduce_sum(loss_sum)
        labelled = int(all_reduce_sum(torch.tensor(labelled, device=self.device)))
        counts = matrix.numpy()
        scores = scores_from_matrix(counts, self.schema.scored_classes)
        metrics = scores.as_metrics(self.schema.names, self.schema.scored_classes)
        metrics["val/loss"] = float(loss_sum) / max(labelled, 1)
        return metrics, counts

    # -- loop ----------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        best = self.state.best_value
        if best is None:
            return not math.isnan(value)
        delta = self.settings.min_delta
        if self.settings.monitor_mode == "max":
            return value > best + delta
        return value < best - delta

    def _save_epoch_checkpoints(self, epoch: int, improved: bool) -> None:
        """last.pt every epoch, best.pt when the monitor improved (a hard link to last.pt, so
        no second copy while they are the same epoch), epoch_NNN.pt only if asked to keep some:
        each is a whole model, and twenty short runs must not fill a disk."""
        if not self.distributed.is_main:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        last = self.checkpoint_dir / "last.pt"
        save_checkpoint(self._checkpoint(), last)
        if improved:
            link_checkpoint(last, self.checkpoint_dir / "best.pt")
        keep = self.settings.keep_epoch_checkpoints
        if keep > 0:
            link_checkpoint(last, self.checkpoint_dir / f"epoch_{epoch:03d}.pt")
            for old in sorted(self.checkpoint_dir.glob("epoch_*.pt"))[:-keep]:
                os.remove(old)

    def checkpoint_bytes(self) -> int:
        """Disk space the checkpoints use (hard links counted once)."""
        seen: set[int] = set()
        total = 0
        for path in self.checkpoint_dir.glob("*.pt"):
            status = path.stat()
            if status.st_ino not in seen:
                seen.add(status.st_ino)
                total += status.st_size
        return total

    def fit(self) -> FitResult:
        settings = self.settings
        metrics: dict[str, float] = {}
        for epoch in range(self.state.epoch + 1, settings.max_epochs):
            started = time.perf_counter()
            metrics = self.train_epoch(epoch)
            val_metrics, counts = self.validate(epoch)
            metrics.update(val_metrics)
            metrics["epoch_seconds"] = time.perf_counter() - started
            if settings.monitor not in metrics:
                raise KeyError(
                    f"trainer.monitor={settings.monitor!r} is not a logged metric; "
                    f"choose one of {sorted(metrics)}"
                )
            value = metrics[settings.monitor]
            improved = self._improved(value)
            self.state.epoch = epoch
            if improved:
                self.state.best_value, self.state.best_epoch = value, epoch
                self.state.best_matrix = counts.tolist()
                self.state.epochs_without_improvement = 0
            else:
                self.state.epochs_without_improvement += 1
            self.state.history.append({"epoch": epoch, **metrics})
            if self.scheduler is not None:
                self.scheduler.step()
            if self.tracker:
                self.tracker.log_metrics(metrics, step=epoch)
            self._save_epoch_checkpoints(epoch, improved)
            log.info(
                "epoch %d: train/loss %.4f val/loss %.4f %s %.4f (best %.4f @ %s) %.0fs",
                epoch,
                metrics.get("train/loss", math.nan),
                metrics["val/loss"],
                settings.monitor,
                value,
                self.state.best_value if self.state.best_value is not None else math.nan,
                self.state.best_epoch,
                metrics["epoch_seconds"],
            )
            if self.epoch_callback and self.distributed.is_main:
                self.epoch_callback(epoch, metrics)
            if (
                settings.patience is not None
                and self.state.epochs_without_improvement >= settings.patience
            ):
                log.info(
                    "early stopping: %s did not improve for %d epochs",
                    settings.monitor,
                    settings.patience,
                )
                break
        if self.distributed.is_main and self.checkpoint_dir.is_dir():
            log.info(
                "checkpoints: %.1f MB in %s (last.pt, best.pt%s)",
                self.checkpoint_bytes() / 1e6,
                self.checkpoint_dir,
                f", {settings.keep_epoch_checkpoints} per-epoch"
                if settings.keep_epoch_checkpoints
                else "",
            )
        return FitResult(
            self.state.best_value,
            self.state.best_epoch,
            metrics,
            self.tracker.run_id if self.tracker else None,
            None,
            self.checkpoint_dir,
        )

    # -- best-epoch artefacts ------------------------------------------------------------------
    def load_best(self) -> None:
        best = self.checkpoint_dir / "best.pt"
        if best.exists():
            state = read_checkpoint(best, map_location=str(self.device))
            self.model.load_state_dict(state["model"])

    @torch.inference_mode()
    def panels(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Image, labels and prediction for a few val windows spread over the val scenes."""
        dataset = self.data.val_dataset
        count = min(self.settings.num_panels, len(dataset))
        self.model.eval()
        images, targets, predictions = [], [], []
        for item in np.linspace(0, len(dataset) - 1, count).astype(int):
            image, target = dataset[int(item)]
            logits = self._forward(
                image[None].to(self.device).contiguous(memory_format=self.memory_format)
            )
            margin = dataset.margin
            visible = image[:, margin : image.shape[1] - margin, margin : image.shape[2] - margin]
            images.append(visible.numpy())
            targets.append(target.numpy())
            predictions.append(logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8))
        return images, targets, predictions

    def log_best_artifacts(self) -> None:
        """Confusion matrix of the best epoch and prediction panels from the best weights."""
        if self.tracker is None or self.state.best_matrix is None:
            return
        matrix = np.array(self.state.best_matrix)
        names = self.schema.names
        self.tracker.log_confusion_matrix(
            matrix,
            names,
            confusion_matrix_figure(
                matrix, names, f"val confusion matrix, best epoch {self.state.best_epoch}"
            ),
        )
        self.load_best()
        if self.settings.num_panels > 0:
            self.tracker.log_figure(
                panels_figure(*self.panels(), self.schema), "panels/val_panels.png"
            )
