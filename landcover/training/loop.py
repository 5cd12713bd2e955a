"""The fit loop: train an epoch, validate on the grid, report, stop early.

Along Lightning's seams without adopting it: checkpoint files are `checkpoint.CheckpointManager`'s,
when to stop is `EarlyStopping`'s, best-epoch figures are `best_epoch.py`'s, and a model fitted
once (the per-pixel GBM) fits itself from the batches it is given.

Plain PyTorch rather than Lightning: the loop is short, and owning it keeps the three things
we care about explicit (a streaming confusion matrix over every val pixel, per-index patch
seeds for reproducibility, and MLflow as the only logger).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from landcover.artifacts.checkpoint import CheckpointManager
from landcover.config import TrainerConfig
from landcover.data.loaders import TrainingData
from landcover.data.schema import IGNORE_INDEX
from landcover.errors import LandcoverError
from landcover.metrics import ConfusionMatrix, metric_names, scores_from_matrix
from landcover.models import SegmentationModel
from landcover.tracking.runs import Tracker
from landcover.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    all_reduce_sum,
    sync_batchnorm,
)

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, Mapping[str, float]], None]


class TrainingDivergedError(LandcoverError, RuntimeError):
    """The loss became NaN or infinite: nothing later in the run can be trusted. A user's
    error to act on (a learning rate too high), so commands end with its one line."""


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
    """What a fit returns to train() and to sweeps: the best value and epoch, the last metrics, the
    run and model."""

    best_value: float | None
    best_epoch: int | None
    last_metrics: dict[str, float]
    run_id: str | None
    model_uri: str | None
    checkpoint_dir: Path
    summary: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EarlyStopping:
    """When a monitored value counts as better, and when waiting for better is over."""

    mode: str  # max | min
    min_delta: float
    patience: int | None  # None: never stop early

    def improved(self, value: float, best: float | None) -> bool:
        """`value` beats `best` by more than `min_delta` (any finite value beats none)."""
        if best is None:
            return not math.isnan(value)
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def should_stop(self, epochs_without_improvement: int) -> bool:
        """Patience is used up."""
        return self.patience is not None and epochs_without_improvement >= self.patience


def hold_frozen_batchnorm(model: torch.nn.Module) -> None:
    """Batch-norm layers whose weights are frozen (`init.freeze`) keep their statistics too:
    in training mode they would re-estimate them from the new data's batches, which changes
    what a frozen layer computes (a one-scene fine-tune of the 2018 network lost OA that way)."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            parameters = list(layer.parameters(recurse=False))
            if parameters and not any(p.requires_grad for p in parameters):
                layer.eval()


class Trainer:
    """The fit loop over one model, its data and optimiser; checkpoints, stopping and recording are
    handed to their own objects."""

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
        settings: TrainerConfig,
        checkpoints: CheckpointManager,
        tracker: Tracker,
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
        # a model fitted rather than trained (the per-pixel GBM) is fitted in one epoch
        self.max_epochs = 1 if model.fitted_once else settings.max_epochs
        self.stopping = EarlyStopping(
            str(settings.monitor_mode),
            settings.early_stopping.min_delta,
            settings.early_stopping.patience,
        )
        self.checkpoints = checkpoints
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
        if distributed.enabled and not model.fitted_once:
            sync_batchnorm(self.model)
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                # the same layers run every step; some encoders hold layers a shallow
                # encoder_depth never uses, which a static graph tolerates at no per-step cost
                static_graph=True,
            )
        if compile_model and not model.fitted_once:
            self.train_model = cast(torch.nn.Module, torch.compile(self.train_model))

    def metric_names(self) -> set[str]:
        """Every per-epoch metric this trainer logs: a monitor must be one of them."""
        names = metric_names(self.schema.names, self.schema.scored_classes)
        names |= {"val/loss", "epoch_seconds", "train/patches_per_s"}
        if self.model.fitted_once:
            return names | {"train/pixels", "train/iterations"}
        return names | {"train/loss", "train/lr"}

    # -- state ---------------------------------------------------------------------------------
    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser and schedule state, and the loop's own
        state."""
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
            "run_id": self.tracker.run_id,
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

    def _batches(
        self,
        loader: DataLoader,
        limit: int | None,
        description: str,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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

    def forward(self, image: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits in float32, under bf16 autocast where the runtime chose it."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return (model if model is not None else self.model)(image).float()

    def fit_once(self, epoch: int) -> dict[str, float]:
        """A model fitted, not trained (the per-pixel baseline): it fits one pass of training
        batches itself."""
        self.data.train_dataset.set_epoch(epoch)
        started = time.perf_counter()
        patches = 0

        def counted() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            nonlocal patches
            for image, target in self._batches(
                self.data.train_loader, self.settings.limit_train_batches, f"epoch {epoch} pixels"
            ):
                patches += image.shape[0]
                yield image, target

        metrics = cast(Any, self.model.net).fit_batches(counted())
        seconds = time.perf_counter() - started
        return {**metrics, "train/patches_per_s": patches / max(seconds, 1e-9)}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of gradient steps (or the one fit of a model fitted once); a NaN loss stops the
        run."""
        if self.model.fitted_once:
            return self.fit_once(epoch)
        assert self.optimizer is not None  # every model not fitted once has one
        self.model.train()
        hold_frozen_batchnorm(self.model)
        self.data.train_dataset.set_epoch(epoch)
        total_loss, steps, patches = 0.0, 0, 0
        started = time.perf_counter()
        batches = self._batches(
            self.data.train_loader, self.settings.limit_train_batches, f"epoch {epoch} train"
        )
        for step, (image, target) in enumerate(batches):
            if not bool((target != IGNORE_INDEX).any()):
                continue
            loss = self.loss_fn(self.forward(image, self.train_model), target)
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
        """Scores over every labelled val pixel (a streaming confusion matrix, summed across ranks)
        and the mean loss."""
        self.model.eval()
        matrix = ConfusionMatrix(self.schema.num_classes, self.device)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        labelled = 0
        for image, target in self._batches(
            self.data.val_loader, self.settings.limit_val_batches, f"epoch {epoch} val"
        ):
            logits = self.forward(image)
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
    def monitored(self, metrics: Mapping[str, float]) -> float:
        """The value of `trainer.monitor` among an epoch's metrics."""
        if self.settings.monitor not in metrics:
            raise KeyError(
                f"trainer.monitor={self.settings.monitor!r} is not a logged metric; "
                f"choose one of {sorted(metrics)}"
            )
        return metrics[self.settings.monitor]

    def score_start(self) -> None:
        """The starting weights (a model fine-tuned from) scored like an epoch, as epoch -1:
        fine-tuning on a few patches can move a well-trained network away from the val area,
        and then the start, not the least bad epoch, is the model to keep."""
        metrics, counts = self.validate(-1)
        self.state.best_value, self.state.best_epoch = self.monitored(metrics), -1
        self.state.best_matrix = counts.tolist()
        self.state.history.append({"epoch": -1, **metrics})
        self.tracker.log_metrics({f"start/{k}": v for k, v in metrics.items()}, step=0)
        self.checkpoints.save(self._checkpoint(), -1, True)
        log.info(
            "starting weights: %s %.4f (kept unless an epoch beats it)",
            self.settings.monitor,
            self.state.best_value,
        )

    def fit(self) -> FitResult:
        """Epochs until `max_epochs` or early stopping; each is recorded and checkpointed before the
        next starts."""
        settings = self.settings
        metrics: dict[str, float] = {}
        if settings.keep_start and self.state.epoch < 0 and self.state.best_value is None:
            self.score_start()
        for epoch in range(self.state.epoch + 1, self.max_epochs):
            started = time.perf_counter()
            metrics = self.train_epoch(epoch)
            val_metrics, counts = self.validate(epoch)
            metrics.update(val_metrics)
            metrics["epoch_seconds"] = time.perf_counter() - started
            value = self.monitored(metrics)
            improved = self.stopping.improved(value, self.state.best_value)
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
            self.tracker.log_metrics(metrics, step=epoch)
            self.checkpoints.save(self._checkpoint(), epoch, improved)
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
            if self.stopping.should_stop(self.state.epochs_without_improvement):
                log.info(
                    "early stopping: %s did not improve for %d epochs",
                    settings.monitor,
                    self.stopping.patience,
                )
                break
        if self.checkpoints.enabled and self.checkpoints.directory.is_dir():
            log.info("checkpoints: %s", self.checkpoints.summary())
        return FitResult(
            self.state.best_value,
            self.state.best_epoch,
            metrics,
            self.tracker.run_id,
            None,
            self.checkpoints.directory,
        )
