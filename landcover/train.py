"""`landcover-train`: compose a config with Hydra, build the parts, fit, record in MLflow.

`train(cfg)` is the whole job as a function (sweeps call it directly); `main` is only the
Hydra wrapper that turns user errors into one clear line instead of a traceback.
"""

from __future__ import annotations

import copy
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from landcover import distributed as dist
from landcover import tracking
from landcover.checkpoint import load_checkpoint
from landcover.commands import run_hydra_app, stop_on_signal
from landcover.config import validate_config
from landcover.data.loaders import build_training_data
from landcover.engine import EpochCallback, FitResult, FitSettings, Trainer
from landcover.errors import ConfigError, LandcoverError
from landcover.models import build_model, count_gflops, count_parameters
from landcover.optim import build_loss, build_optimizer, build_scheduler
from landcover.paths import CONFIG_DIR
from landcover.sweep import multirun

log = logging.getLogger("landcover.train")


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LandcoverError(f"config value trainer.device={name} but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def output_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path.cwd() / "outputs"


def model_metadata(cfg: DictConfig, data, model) -> dict:
    """What prediction needs to use the model with no settings repeated."""
    return {
        "landcover_format": 2,
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
        "dataset_fingerprint": data.fingerprint,
    }


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
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = select_device(cfg.trainer.device.value)
    distributed = dist.init(device.type)
    if distributed.enabled and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
    bf16 = cfg.trainer.precision.value == "bf16" or (
        cfg.trainer.precision.value == "auto" and device.type == "cuda"
    )
    channels_last = cfg.trainer.channels_last and device.type == "cuda"

    checkpoint = load_checkpoint(cfg.trainer.resume_from) if cfg.trainer.resume_from else None
    schema_cfg = cfg.data.schema
    model = build_model(
        cfg.model,
        in_channels=cfg.data.bands,
        num_classes=len(schema_cfg.classes),
        mean=list(cfg.data.normalize.mean),
        std=list(cfg.data.normalize.std),
    )
    fitted_once = not any(p.requires_grad for p in model.parameters())  # model=pixel_gbm
    if fitted_once and distributed.enabled:
        raise LandcoverError(
            f"model={cfg.model.arch} is fitted once in one process; run it without torchrun"
        )
    data = build_training_data(
        cfg.data,
        seed=cfg.seed,
        output_margin=model.output_margin,
        pin_memory=device.type == "cuda",
        distributed=distributed,
    )
    if fitted_once:
        optimizer = scheduler = None
        if cfg.trainer.max_epochs != 1:
            log.info("%s is fitted once, not trained by epochs: one epoch", cfg.model.arch)
    else:
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.trainer.max_epochs)
    settings = FitSettings(
        max_epochs=1 if fitted_once else cfg.trainer.max_epochs,
        monitor=cfg.trainer.monitor,
        monitor_mode=cfg.trainer.monitor_mode.value,
        patience=cfg.trainer.early_stopping.patience,
        min_delta=cfg.trainer.early_stopping.min_delta,
        num_panels=cfg.trainer.num_panels,
        progress=cfg.trainer.progress,
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
        keep_epoch_checkpoints=cfg.trainer.keep_epoch_checkpoints,
    )
    resolved_yaml = OmegaConf.to_yaml(cfg)
    checkpoint_dir = Path(cfg.trainer.checkpoint_dir)
    if not checkpoint_dir.is_absolute():
        checkpoint_dir = output_dir() / checkpoint_dir
    metadata = model_metadata(cfg, data, model)
    tracker = (
        tracking.Tracker(cfg.tracking.uri, cfg.tracking.experiment)
        if distributed.is_main
        else tracking.NullTracker()
    )
    trainer = Trainer(
        model=model,
        loss_fn=build_loss(cfg.loss, data.schema),
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        device=device,
        bf16=bf16,
        channels_last=channels_last,
        settings=settings,
        checkpoint_dir=checkpoint_dir,
        tracker=tracker if distributed.is_main else None,
        epoch_callback=epoch_callback,
        distributed=distributed,
        compile_model=cfg.trainer.compile,
        checkpoint_extra={"config": resolved_yaml, "metadata": metadata},
    )
    logged = trainer.metric_names()
    if cfg.trainer.monitor not in logged:
        raise ConfigError(
            f"config value trainer.monitor={cfg.trainer.monitor!r} is never logged by training; "
            f"choose one of {sorted(logged)}"
        )
    if checkpoint is not None:
        trainer.restore(checkpoint)
        log.info("resuming from %s after epoch %d", cfg.trainer.resume_from, trainer.state.epoch)
    parameters = count_parameters(model)
    static_metrics = {"model/parameters": float(parameters)}
    gflops = count_gflops(model, cfg.data.bands)
    if gflops is not None:
        static_metrics["model/gflops_per_tile"] = gflops
    overrides = multirun.user_overrides(multirun.job_overrides())
    parent = multirun.job_parent() if cfg.trial is None else None
    if parent is not None and run_name is None:
        run_name = multirun.child_run_name(overrides, parent[1])
    tags = {
        **tracking.git_state(),
        **tracking.environment_tags(device),
        "dataset_fingerprint": data.fingerprint,
        "data": cfg.data.name,
        "model.arch": cfg.model.arch,
        **dict(cfg.tracking.tags),
        **dict(extra_tags or {}),
        "distributed.world_size": str(distributed.world_size),
        "landcover.overrides": " ".join(overrides)[:5000],
        **({"mlflow.parentRunId": parent[0]} if parent else {}),
    }
    run_id = checkpoint.get("run_id") if checkpoint else None
    run_name = cfg.tracking.run_name or run_name
    with tracker.start(run_name=run_name, run_id=run_id, tags=tags):
        if checkpoint is None:
            tracker.log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))
            tracker.log_params(dict(extra_params or {}))
            tracker.log_params(
                {
                    "model.parameters": str(parameters),
                    "data.train_scenes": str(len(data.train_scenes)),
                    "data.val_scenes": str(len(data.val_scenes)),
                }
            )
        tracker.log_text(resolved_yaml, "config/resolved.yaml")
        tracker.log_text(
            "\n".join(f"{s.image_path},{s.label_path}" for s in data.train_scenes + data.val_scenes)
            + "\n",
            "config/scenes.csv",
        )
        log.info(
            "run %s: %s on %s, %d parameters, %d train / %d val scenes, checkpoints in %s",
            tracker.run_id,
            cfg.model.arch,
            device,
            parameters,
            len(data.train_scenes),
            len(data.val_scenes),
            checkpoint_dir,
        )
        tracker.log_metrics(static_metrics, step=0)
        result = trainer.fit()
        best = {"best/" + cfg.trainer.monitor: result.best_value or float("nan")}
        tracker.log_metrics(
            {**best, "best/epoch": float(result.best_epoch or 0)}, step=trainer.state.epoch
        )
        at_best = next((h for h in trainer.state.history if h["epoch"] == result.best_epoch), {})
        result.summary = {**at_best, **static_metrics, **best}
        trainer.log_best_artifacts()
        if cfg.tracking.log_model:
            cpu_model = dist.plain_batchnorm(
                copy.deepcopy(trainer.model).to("cpu", memory_format=torch.contiguous_format)
            )
            result.model_uri = tracker.log_model(
                cpu_model.eval(),
                bands=cfg.data.bands,
                metadata=metadata,
            )
        log.info(
            "done: best %s = %s at epoch %s; run %s",
            cfg.trainer.monitor,
            result.best_value,
            result.best_epoch,
            tracker.run_id,
        )
    return result


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
    try:
        result = train(cfg)
    except LandcoverError as err:
        log.error("%s", err)
        sys.exit(f"error: {err}")
    return result.best_value


_hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(run_job)


def main() -> None:
    """`python -m landcover.train` (what torchrun starts); the console script is
    `landcover.entrypoints:train`, which imports this module only when a job runs."""
    run_hydra_app(_hydra_main)


if __name__ == "__main__":
    main()
