"""`landcover-train`: build the parts a config names, fit, record in MLflow.

`train(cfg)` is the whole job as a function (sweeps call it directly); `run_job` is one Hydra
job of it, and `main` the `python -m` entry torchrun starts.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from landcover import artifacts
from landcover.artifacts.checkpoint import CheckpointManager, load_checkpoint
from landcover.artifacts.reference import LoadedModel
from landcover.commands import ending_in_one_line, run_hydra_app, stop_on_signal
from landcover.config import TrainConfig, plain_dict, train_settings, validate_config
from landcover.data.loaders import TrainingData, build_training_data
from landcover.data.scenes import class_pixel_totals
from landcover.errors import ConfigError, LandcoverError, RunPrunedError
from landcover.models import SegmentationModel, build_model
from landcover.models.transfer import TransferReport, parameter_groups, transfer_weights
from landcover.paths import CONFIG_DIR
from landcover.runtime import Runtime
from landcover.runtime import start as start_runtime
from landcover.sweep import multirun
from landcover.tracking import runs as tracking
from landcover.tracking.runs import Tracker
from landcover.training import distributed as dist
from landcover.training.best_epoch import log_best_epoch
from landcover.training.loop import EpochCallback, FitResult, Trainer
from landcover.training.optim import build_loss, build_optimizer, build_scheduler
from landcover.upgrade import CONFIG_VERSION

log = logging.getLogger("landcover.training.train")


def output_dir() -> Path:
    """The Hydra job's folder (or ./outputs outside Hydra): relative checkpoint dirs live here."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd() / "outputs"


def model_metadata(cfg: DictConfig, data: TrainingData, model: SegmentationModel) -> dict:
    """What prediction needs to use the model with no settings repeated."""
    return {
        "landcover_format": 2,
        "config_version": CONFIG_VERSION,
        "arch": cfg.model.arch,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "schema": data.schema.to_dict(),
        "bands": cfg.data.bands,
        "band_names": list(cfg.data.band_names),
        "normalize": {"mean": list(cfg.data.normalize.mean), "std": list(cfg.data.normalize.std)},
        "input": "raw digital numbers, float32 (batch, bands, height, width), any height/width",
        "output_margin": model.output_margin,
        "size_divisor": model.size_divisor,
        "patch_size": cfg.data.patch_size,
        "pixel_size": training_pixel_size(data),
        "dataset_fingerprint": data.fingerprint,
        # a layer fused into the maps at prediction (landcover.predict.prior); none: {}
        "prior": plain_dict(cfg.prior) if cfg.prior.codes else {},
    }


def training_pixel_size(data: TrainingData) -> float | None:
    """The ground size of a training pixel (CRS units), which mapping compares inputs with;
    None for data without a CRS (the real sample patches)."""
    scene = data.train_scenes[0]
    return abs(float(scene.transform[0])) if scene.crs else None


def run_tags(
    cfg: DictConfig, data: TrainingData, runtime: Runtime, extra: Mapping[str, str] | None
) -> dict[str, str]:
    """Provenance: code, machine, data, model, how the job was launched."""
    overrides = multirun.user_overrides(multirun.job_overrides())
    parent = multirun.job_parent() if cfg.trial is None else None
    return {
        **tracking.git_state(),
        **tracking.environment_tags(runtime.device),
        "dataset_fingerprint": data.fingerprint,
        "data": cfg.data.name,
        "model.arch": cfg.model.arch,
        **dict(cfg.tracking.tags),
        **dict(extra or {}),
        "distributed.world_size": str(runtime.distributed.world_size),
        "landcover.overrides": " ".join(overrides)[:5000],
        **({"mlflow.parentRunId": parent[0]} if parent else {}),
    }


def init_source(cfg: DictConfig) -> LoadedModel:
    """The model `init.model` names, on the CPU; its input normalisation becomes this run's
    (the copied weights expect what they were trained on), so the config says so too."""

    source = artifacts.load(str(cfg.init.model), tracking_uri=cfg.tracking.uri, device="cpu")
    if source.torch_module is None or getattr(source.torch_module, "fitted_once", False):
        raise ConfigError(f"config value init.model={cfg.init.model}: not a network to start from")
    if int(source.metadata["bands"]) != int(cfg.data.bands):
        raise ConfigError(
            f"config value init.model={cfg.init.model}: it reads {source.metadata['bands']} "
            f"bands, data.bands is {cfg.data.bands}"
        )
    normalize = source.metadata["normalize"]
    cfg.data.normalize.mean = list(normalize["mean"])
    cfg.data.normalize.std = list(normalize["std"])
    return source


def start_from(
    cfg: DictConfig, model: SegmentationModel, data: TrainingData, source: LoadedModel | None
) -> tuple[TransferReport | None, dict[str, str]]:
    """The source's weights copied into `model` (re-mapped by class), with the tags that name
    where the run started; nothing without `init.model`."""
    if source is None:
        return None, {}
    assert source.torch_module is not None  # init_source refuses anything else
    report = transfer_weights(
        model,
        source.torch_module.state_dict(),
        source.schema,
        data.schema,
        plain_dict(cfg.init.class_map) if cfg.init.class_map else None,
    )
    log.info("started from %s: %s", cfg.init.model, report.summary())
    tags = {
        "landcover.init_from": str(cfg.init.model),
        "landcover.init_from_run": source.source_run_id or "",
        "landcover.init_transfer": report.summary(),
    }
    return report, tags


def default_run_name(cfg: DictConfig) -> str | None:
    """A multirun child is named by the overrides it was launched with."""
    parent = multirun.job_parent() if cfg.trial is None else None
    if parent is None:
        return None
    return multirun.child_run_name(multirun.user_overrides(multirun.job_overrides()), parent[1])


def build_trainer(
    cfg: DictConfig,
    settings: TrainConfig,
    runtime: Runtime,
    model: SegmentationModel,
    data: TrainingData,
    tracker: Tracker,
    epoch_callback: EpochCallback | None,
) -> Trainer:
    """The fit loop over what `train` built; its checkpoints carry the config and metadata.
    A monitor the loop never logs is refused here, before the first epoch."""
    groups = parameter_groups(
        model, list(cfg.init.freeze), float(cfg.init.frozen_lr_scale), float(cfg.optimizer.lr)
    )
    optimizer = None if model.fitted_once else build_optimizer(cfg.optimizer, groups)
    trainer = Trainer(
        model=model,
        loss_fn=build_loss(cfg.loss, data.schema, class_pixel_totals(data.train_scenes)),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.scheduler, optimizer) if optimizer else None,
        data=data,
        device=runtime.device,
        bf16=runtime.bf16,
        channels_last=runtime.channels_last,
        settings=settings.trainer,
        checkpoints=CheckpointManager(
            output_dir() / settings.trainer.checkpoint_dir,  # an absolute dir replaces the base
            keep_epochs=settings.trainer.keep_epoch_checkpoints,
            enabled=runtime.distributed.is_main,
        ),
        tracker=tracker,
        epoch_callback=epoch_callback,
        distributed=runtime.distributed,
        compile_model=settings.trainer.compile,
        checkpoint_extra={
            "config": OmegaConf.to_yaml(cfg),
            "metadata": model_metadata(cfg, data, model),
        },
    )
    if settings.trainer.monitor not in trainer.metric_names():
        raise ConfigError(
            f"config value trainer.monitor={settings.trainer.monitor!r} is never logged by "
            "training; "
            f"choose one of {sorted(trainer.metric_names())}"
        )
    return trainer


def train(
    cfg: DictConfig,
    epoch_callback: EpochCallback | None = None,
    extra_tags: Mapping[str, str] | None = None,
    extra_params: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> FitResult:
    """Validate the config, build data/model/optimiser, fit, and record everything.

    The result's `summary` holds what a sweep can optimise: `best/<monitor>`, the monitor
    itself and every other metric at the best epoch, `model/parameters` and
    `model/gflops_per_tile`.
    """
    cfg = validate_config(cfg)
    settings = train_settings(cfg)  # typed from here down
    runtime = start_runtime(settings.trainer, settings.seed)
    resume = settings.trainer.resume_from
    checkpoint = load_checkpoint(resume) if resume else None
    source = init_source(cfg) if cfg.init.model and checkpoint is None else None
    model = build_model(
        cfg.model,
        in_channels=cfg.data.bands,
        num_classes=len(cfg.data.schema.classes),
        mean=list(cfg.data.normalize.mean),
        std=list(cfg.data.normalize.std),
    )
    if model.fitted_once and runtime.distributed.enabled:
        raise LandcoverError(f"model={cfg.model.arch} is fitted once in one process: no torchrun")
    data = build_training_data(
        cfg.data,
        seed=cfg.seed,
        output_margin=model.output_margin,
        pin_memory=runtime.device.type == "cuda",
        distributed=runtime.distributed,
    )
    report, init_tags = start_from(cfg, model, data, source)
    tracker = Tracker(
        cfg.tracking.uri,
        cfg.tracking.experiment,
        enabled=runtime.distributed.is_main,
        system_metrics=bool(cfg.tracking.system_metrics),
        system_metrics_interval=float(cfg.tracking.system_metrics_interval),
    )
    trainer = build_trainer(cfg, settings, runtime, model, data, tracker, epoch_callback)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        log.info("resuming from %s after epoch %d", resume, trainer.state.epoch)
    with tracker.start(
        run_name=cfg.tracking.run_name or run_name or default_run_name(cfg),
        run_id=checkpoint.get("run_id") if checkpoint else None,
        tags=run_tags(cfg, data, runtime, {**init_tags, **dict(extra_tags or {})}),
    ):
        if report is not None:
            tracker.log_text(json.dumps(asdict(report), indent=2), "init/transfer.json")
        static = tracker.record_start(
            cfg, data, model, resumed=bool(checkpoint), extra=extra_params
        )
        where = trainer.checkpoints.directory
        log.info(
            "run %s: %s on %s, checkpoints in %s",
            tracker.run_id,
            cfg.model.arch,
            runtime.device,
            where,
        )
        try:
            result = trainer.fit()
        except RunPrunedError:
            if cfg.trial is not None:  # a pruned trial is never resumed either
                trainer.checkpoints.remove()
            raise
        at_best = tracker.record_best(trainer.state, settings.trainer.monitor)
        result.summary = {**at_best, **static}
        log_best_epoch(trainer)
        if cfg.tracking.log_model:
            metadata = trainer.checkpoint_extra["metadata"]
            result.model_uri = tracker.log_model(
                cpu_copy(trainer.model), metadata=metadata, step=max(int(result.best_epoch or 0), 0)
            )
        tracker.describe(describe_run(cfg, data, trainer, at_best, static), result.model_uri)
        keep = settings.trainer.keep_epoch_checkpoints
        if cfg.trial is not None and result.model_uri and not keep:
            # a finished trial is never resumed, and its logged model holds the best weights
            freed = trainer.checkpoints.remove()
            log.info("trial's local checkpoints removed (%.1f MB)", freed / 1e6)
        best = f"{result.best_value:.4f}" if result.best_value is not None else "none"
        log.info(
            "done: best %s = %s at epoch %s", settings.trainer.monitor, best, result.best_epoch
        )
    if tracker.enabled and tracker.run_id and cfg.trial is None:
        log.info("%s", tracking.browse_command(str(cfg.tracking.uri), tracker.run_id))
    return result


def describe_run(
    cfg: DictConfig,
    data: TrainingData,
    trainer: Trainer,
    at_best: Mapping[str, float],
    static: Mapping[str, float],
) -> str:
    """The run's description: command, data, model, best epoch, headline metrics."""
    from landcover.tracking.descriptions import command_line, training_description

    model = str(cfg.model.arch)
    if cfg.model.get("encoder_name"):
        model += f"/{cfg.model.encoder_name}"
    prefix = "val/iou_"
    return training_description(
        command=command_line("landcover-train", multirun.user_overrides(multirun.job_overrides())),
        data_name=str(cfg.data.name),
        train_scenes=len(data.train_scenes),
        val_scenes=len(data.val_scenes),
        fingerprint=data.fingerprint,
        model=model,
        parameters=int(static["model/parameters"]),
        monitor=str(cfg.trainer.monitor),
        best_epoch=trainer.state.best_epoch,
        epochs=trainer.state.epoch,
        best=at_best,
        per_class_iou={k[len(prefix) :]: v for k, v in at_best.items() if k.startswith(prefix)},
    )


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """What is logged: a CPU copy in eval mode, contiguous memory, plain batch norm."""
    copied = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # Module.to takes memory_format; its stubs do not say so
    return dist.plain_batchnorm(copied).eval()


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job of `landcover-train`: a plain run, or a sweep trial in whatever process
    the launcher chose; user errors end as one line."""
    if threading.current_thread() is threading.main_thread():
        # also in jobs of sweep launchers, which do not start through run_hydra_app
        signal.signal(signal.SIGTERM, stop_on_signal)
    if cfg.get("trial") is not None:
        # a sweep trial, launched in whatever process: errors go back through the study
        from landcover.sweep.trial import run_trial

        return run_trial(cfg, train)
    with ending_in_one_line(log):
        result = train(cfg)
    return result.best_value


_hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(run_job)


def main() -> None:
    """`python -m landcover.training.train` (what torchrun starts); the console script is
    `landcover.commands:train`, which imports this module only when a job runs."""
    run_hydra_app(_hydra_main)


if __name__ == "__main__":
    main()
