"""Structured config schema: a typo or a wrong type fails before any work starts.

Hydra composes plain YAML from `conf/`; `validate_config` then merges it onto these
dataclasses (OmegaConf checks names and types) and checks ranges and choices, raising a
ConfigError that names the key. The model group differs by architecture, so `model` is
checked against the schema its `arch` selects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from landcover.errors import ConfigError


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "32"
    bf16 = "bf16"


class Direction(StrEnum):
    max = "max"
    min = "min"


class OptimizerName(StrEnum):
    adam = "adam"
    adamw = "adamw"
    rmsprop = "rmsprop"
    sgd = "sgd"


class SchedulerName(StrEnum):
    none = "none"
    cosine = "cosine"
    step = "step"


@dataclass
class ClassConfig:
    name: str = "???"
    color: str = "#000000"
    codes: list[int] = field(default_factory=list)
    ignore: bool = False


@dataclass
class SchemaConfig:
    name: str = "???"
    classes: list[ClassConfig] = field(default_factory=list)
    ignore_codes: list[int] = field(default_factory=list)


@dataclass
class SplitConfig:
    pattern: str | None = None
    manifest: str | None = None


@dataclass
class NormalizeConfig:
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [255.0, 255.0, 255.0, 255.0])


@dataclass
class AugmentConfig:
    flips: bool = True
    rot90: bool = True
    color_jitter: float = 0.0


@dataclass
class RareSamplingConfig:
    classes: list[str] = field(default_factory=list)
    min_fraction: float = 0.1
    keep_probability: float = 0.1


@dataclass
class SyntheticConfig:
    scenes: dict[str, int] = field(default_factory=lambda: {"train": 4, "val": 2})
    size: int = 512
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "???"
    root: str = "???"
    image_suffix: str = "???"
    label_suffix: str = "???"
    splits: dict[str, SplitConfig] = field(default_factory=dict)
    bands: int = 4
    band_names: list[str] = field(default_factory=lambda: ["red", "green", "blue", "nir"])
    schema: SchemaConfig = field(default_factory=SchemaConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    patch_size: int = 256
    patches_per_epoch: int = 512
    batch_size: int = 16
    val_tile: int = 256
    val_batch_size: int = 8
    num_workers: int = 0
    cache_max_pixels: int = 16_000_000
    check_label_codes: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    rare_sampling: RareSamplingConfig | None = None
    synthetic: SyntheticConfig | None = None


@dataclass
class SmpModelConfig:
    """Common to the segmentation-models-pytorch architectures."""

    arch: str = "???"
    encoder: str = "resnet18"
    encoder_depth: int = 5
    encoder_weights: str | None = None


@dataclass
class UnetConfig(SmpModelConfig):
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])


@dataclass
class FPNConfig(SmpModelConfig):
    decoder_pyramid_channels: int = 256
    decoder_segmentation_channels: int = 128
    decoder_dropout: float = 0.2


@dataclass
class DeepLabV3PlusConfig(SmpModelConfig):
    decoder_channels: int = 256
    encoder_output_stride: int = 16


@dataclass
class SeedConfig:
    arch: str = "seed"


@dataclass
class PixelGBMConfig:
    arch: str = "pixel_gbm"
    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    l2_regularization: float = 0.0
    samples: int = 200_000


MODEL_SCHEMAS: dict[str, type] = {
    "unet": UnetConfig,
    "fpn": FPNConfig,
    "deeplabv3plus": DeepLabV3PlusConfig,
    "seed": SeedConfig,
    "pixel_gbm": PixelGBMConfig,
}


@dataclass
class EarlyStoppingConfig:
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: bool = True
    deterministic: bool = True
    monitor: str = "val/mIoU"
    monitor_mode: Direction = Direction.max
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint_dir: str = "checkpoints"
    keep_epoch_checkpoints: int = 0
    resume_from: str | None = None
    num_panels: int = 4
    progress: bool = True
    limit_train_batches: int | None = None
    compile: bool = False
    limit_val_batches: int | None = None
    num_threads: int | None = None


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    alpha: float = 0.99
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.none
    step_size: int = 10
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class LossConfig:
    class_weights: dict[str, float] | None = None
    label_smoothing: float = 0.0


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "landcover"
    run_name: str | None = None
    log_model: bool = True
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class PredictSettings:
    """Tiled prediction (`predict:` of landcover-predict and landcover-evaluate)."""

    tile_size: int = 512  # input tile edge (rounded down to the model's stride)
    overlap: int = 64  # full-output models: pixels shared by neighbours (context = overlap / 2)
    mode: str = "auto"  # auto | centre (keep tile cores) | blend (weighted probabilities)
    batch_size: int = 1  # 1 is as fast as 4 on CPU (measured) at a quarter of the memory
    confidence: bool = False  # also write <output>_confidence.tif (max probability x 255)
    probabilities: bool = False  # also write <output>_probabilities.tif (a band per class)
    progress: bool = True
    gdal_cache_mb: int = 128  # GDAL's block cache; its default (5 % of RAM) grows with area


@dataclass
class PredictCommandConfig:
    """landcover-predict."""

    model: str = MISSING  # run id | runs:/ | models:/name/N | models:/name@alias | .pt | .onnx
    input: Any = MISSING  # a raster, a glob, or a list [a.tif, b.tif]
    output: str = MISSING  # a file (one input) or a directory: <stem>_landcover.tif
    device: str = "auto"
    predict: PredictSettings = field(default_factory=PredictSettings)
    log_to_mlflow: bool = True
    quicklook_size: int = 1024  # longest edge of the quicklook PNG logged to MLflow
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class EvaluateSettings:
    confidence_threshold: float = 0.9  # disagreement: the model this sure and the label differs
    min_region_pixels: int = 16  # smaller disagreement regions are not listed
    max_regions: int = 200  # regions listed in disagreement_regions.csv, largest first
    max_panels: int = 8  # scenes shown in the panels figure


@dataclass
class EvaluateCommandConfig:
    """landcover-evaluate."""

    model: str = MISSING
    split: str = "val"
    device: str = "auto"
    output_dir: str = MISSING  # maps, confidence, disagreement
    predict: PredictSettings = field(default_factory=PredictSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class ExportCommandConfig:
    """landcover-export."""

    model: str = MISSING
    output: str = MISSING
    opset: int = 17
    tolerance: float = 1.0e-3  # max |ONNX - PyTorch| logit difference accepted
    log_to_mlflow: bool = True  # into the model's training run (or experiment `exports`)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class PromoteFilters:
    min_epochs: int = 0  # ignore runs that trained fewer epochs
    tags: dict[str, str] = field(default_factory=dict)  # e.g. +filters.tags.data=chesapeake_sample
    where: str = ""  # any extra MLflow filter


@dataclass
class RegistryConfig:
    name: str = "landcover"
    alias: str = "champion"
    previous_alias: str = "previous"  # the champion that was replaced


@dataclass
class PromoteCommandConfig:
    """landcover-promote."""

    experiment: str = MISSING  # where to look for runs
    sweep: str | None = None  # a study name: choose among that sweep's trials only
    metric: str = "val/mIoU"
    direction: str = "auto"  # auto (min for losses/errors, max otherwise) | max | min
    run: str | None = None  # promote this run id instead of choosing
    filters: PromoteFilters = field(default_factory=PromoteFilters)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    against: str | None = None  # compare with this models:/ reference instead of the alias
    force: bool = False  # promote even if the data differ or the candidate is not better
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class ImportCntkCommandConfig:
    """landcover-import-cntk."""

    file: str = MISSING
    schema: str = "tutorial_5label"
    band_names: list[str] = field(default_factory=lambda: ["red", "green", "blue", "nir"])
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    evaluate_split: str | None = None
    output_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


COMMAND_SCHEMAS: dict[str, type] = {
    "predict": PredictCommandConfig,
    "evaluate": EvaluateCommandConfig,
    "export": ExportCommandConfig,
    "promote": PromoteCommandConfig,
    "import_cntk": ImportCntkCommandConfig,
}


@dataclass
class TrialConfig:
    """Set by the Optuna sweeper on each job it launches (`++trial.number=3 ...`): which
    trial of which study the job is, so it can re-attach through the storage in any process."""

    study: str = "???"
    storage: str = "???"
    number: int = MISSING
    heartbeat_interval: int = MISSING  # the sweeper passes its own settings
    grace_period: int = MISSING


@dataclass
class TrainConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trial: TrialConfig | None = None


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config value {key}={value} must be positive")


def _check_finite(node: Any, prefix: str = "") -> None:
    """NaN or infinity in any float value (`optimizer.lr=nan`) is a config error, not a run
    that trains on garbage."""
    if isinstance(node, DictConfig):
        for key in node:
            _check_finite(node[key], f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for index, value in enumerate(node):
            _check_finite(value, f"{prefix}{index}.")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config value {prefix.rstrip('.')}={node} must be a finite number")


def _check_ranges(cfg: DictConfig) -> None:
    _positive(
        cfg,
        "data.bands",
        "data.patch_size",
        "data.patches_per_epoch",
        "data.batch_size",
        "data.val_tile",
        "data.val_batch_size",
        "trainer.max_epochs",
        "optimizer.lr",
        "trainer.limit_train_batches",
        "trainer.limit_val_batches",
        "trainer.num_threads",
    )
    if cfg.trainer.keep_epoch_checkpoints < 0:
        raise ConfigError(
            f"config value trainer.keep_epoch_checkpoints={cfg.trainer.keep_epoch_checkpoints} "
            "must be >= 0"
        )
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config value data.num_workers={cfg.data.num_workers} must be >= 0")
    for key in ("mean", "std"):
        values = cfg.data.normalize[key]
        if len(values) != cfg.data.bands:
            raise ConfigError(
                f"config value data.normalize.{key} has {len(values)} entries but "
                f"data.bands={cfg.data.bands}"
            )
    if any(s <= 0 for s in cfg.data.normalize.std):
        raise ConfigError(
            f"config value data.normalize.std={list(cfg.data.normalize.std)} must be positive"
        )
    if not cfg.data.schema.classes:
        raise ConfigError("config value data.schema.classes is empty")
    if "train" not in cfg.data.splits:
        raise ConfigError(
            f"config value data.splits has no 'train' split (has {list(cfg.data.splits)})"
        )
    rare = cfg.data.rare_sampling
    if rare is not None and not 0 <= rare.keep_probability <= 1:
        raise ConfigError(
            f"config value data.rare_sampling.keep_probability="
            f"{rare.keep_probability} must be within [0, 1]"
        )


def validate_model_config(model: Any) -> DictConfig:
    if model is None or "arch" not in model:
        raise ConfigError(
            "config value model.arch is missing: choose model=unet|fpn|deeplabv3plus|seed|pixel_gbm"
        )
    arch = model["arch"]
    if arch not in MODEL_SCHEMAS:
        raise ConfigError(f"config value model.arch={arch!r} is not one of {list(MODEL_SCHEMAS)}")
    try:
        return OmegaConf.merge(OmegaConf.structured(MODEL_SCHEMAS[arch]), model)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{one_line(err, 'model.')} (model.arch={arch})") from err


def one_line(err: OmegaConfBaseException, prefix: str = "") -> str:
    """`config value predict.tile_size: Value 'abc' ... Integer`: OmegaConf's message on one
    line, naming the key."""
    key = getattr(err, "full_key", None)
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return f"config value {prefix}{key}: {message}" if key else f"bad config: {message}"


def validate_command_config(cfg: DictConfig, name: str) -> DictConfig:
    """A command's composed config, checked against its schema before any work: an unknown
    key, a wrong type or a missing value is one ConfigError naming the key."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    return _typed(COMMAND_SCHEMAS[name], raw, "model=<run id> input=scene.tif")


def _typed(schema: type, raw: dict, example: str) -> DictConfig:
    """`raw` merged onto `schema`, resolved, complete and finite, or one ConfigError."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), raw)
        OmegaConf.resolve(typed)
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err)) from err
    missing = sorted(OmegaConf.missing_keys(typed))
    if missing:
        raise ConfigError(
            f"config values {missing} are required but not set (???); set them on the command "
            f"line, e.g. {example}"
        )
    _check_finite(typed)
    return typed


def validate_config(cfg: DictConfig) -> DictConfig:
    """The composed config, checked and typed; raises ConfigError naming the offending key."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    model = raw.pop("model", None)
    raw.pop("hydra", None)
    raw["model"] = OmegaConf.to_container(validate_model_config(model))
    typed = _typed(TrainConfig, raw, "data.root=/path/to/scenes")
    typed.model = validate_model_config(model)  # typed by its architecture's schema
    _check_ranges(typed)
    return typed
