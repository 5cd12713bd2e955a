"""Config types: a typo or a wrong type fails before any work starts.

Types live here, values in `conf/` (once: no default is written in both places). The schemas
are registered in Hydra's ConfigStore and named at the top of each config's defaults list, so
composition checks names and types; `validate_config` then checks what types cannot say
(ranges, finite numbers, required values, the optimiser's arguments), raising a ConfigError
that names the key. The model group differs by architecture: each `conf/model/*.yaml` names
its architecture's schema.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from landcover.errors import ConfigError
from landcover.paths import CONFIG_DIR

PREDICT_DEFAULTS = f"{CONFIG_DIR}/predict/default.yaml"


class Precision(StrEnum):
    """Training arithmetic; `auto` is bf16 on CUDA and 32-bit floats on CPU."""

    auto = "auto"
    fp32 = "32"
    bf16 = "bf16"


class Direction(StrEnum):
    """Whether a larger or a smaller monitored value is better."""

    max = "max"
    min = "min"


# Types only: every value lives in `conf/` (a field without a default is required, `???`).
# The few defaults below are for keys no YAML file sets (tests/test_config.py checks this).


@dataclass
class ClassConfig:
    """One class of a label schema: the raster codes it merges, its map colour."""

    name: str
    color: str
    codes: list[int]
    ignore: bool = False  # kept as an output channel but never a target


@dataclass
class SchemaConfig:
    """Raster label codes -> training classes (`conf/data/schema/`)."""

    name: str
    classes: list[ClassConfig]
    ignore_codes: list[int]


@dataclass
class SplitConfig:
    """Where a split's scenes are: a glob of image files or a CSV of image,label pairs."""

    pattern: str | None = None
    manifest: str | None = None


@dataclass
class NormalizeConfig:
    """Per-band (x - mean) / std applied inside the model, so it takes raw digital numbers."""

    mean: list[float]
    std: list[float]


@dataclass
class AugmentConfig:
    """Training-time augmentation of patches."""

    flips: bool
    rot90: bool
    color_jitter: float


@dataclass
class RareSamplingConfig:
    """Rejection sampling of patches poor in rare classes (the 2018 tutorial's trick)."""

    classes: list[str]
    min_fraction: float
    keep_probability: float


@dataclass
class SyntheticConfig:
    """Generated landscapes written on first use (`landcover.data.synthetic`)."""

    scenes: dict[str, int]
    size: int
    seed: int


@dataclass
class DataConfig:
    """A data source (`conf/data/`): scenes, bands, label schema, patches and batches."""

    name: str
    root: str
    image_suffix: str
    label_suffix: str
    splits: dict[str, SplitConfig]
    bands: int
    band_names: list[str]
    schema: SchemaConfig
    normalize: NormalizeConfig
    patch_size: int
    patches_per_epoch: int
    batch_size: int
    val_tile: int
    val_batch_size: int
    num_workers: int
    cache_max_pixels: int
    check_label_codes: bool
    augment: AugmentConfig
    rare_sampling: RareSamplingConfig | None
    synthetic: SyntheticConfig | None
    prior_suffix: str | None  # a prior layer beside each image (e.g. _nlcd.tif), like labels


@dataclass
class SmpModelConfig:
    """Keys shared by the segmentation-models-pytorch architectures: the arguments of
    `smp.create_model` (in_channels and classes come from the data)."""

    arch: str
    encoder_name: str
    encoder_depth: int
    encoder_weights: str | None


@dataclass
class UnetConfig(SmpModelConfig):
    """`smp.Unet`."""

    decoder_channels: list[int]


@dataclass
class FPNConfig(SmpModelConfig):
    """`smp.FPN`."""

    decoder_pyramid_channels: int
    decoder_segmentation_channels: int
    decoder_dropout: float


@dataclass
class DeepLabV3PlusConfig(SmpModelConfig):
    """`smp.DeepLabV3Plus`."""

    decoder_channels: int
    encoder_output_stride: int


@dataclass
class SeedConfig:
    """The 2018 tutorial's network: no settings (its shape is fixed by the published models)."""

    arch: str


@dataclass
class PixelGBMConfig:
    """Per-pixel gradient boosting: `HistGradientBoostingClassifier` arguments and a sample."""

    arch: str
    max_iter: int
    learning_rate: float
    max_leaf_nodes: int
    l2_regularization: float
    samples: int


MODEL_SCHEMAS: dict[str, type] = {
    "unet": UnetConfig,
    "fpn": FPNConfig,
    "deeplabv3plus": DeepLabV3PlusConfig,
    "seed": SeedConfig,
    "pixel_gbm": PixelGBMConfig,
}


@dataclass
class EarlyStoppingConfig:
    """Stop after `patience` epochs without an improvement of more than `min_delta`."""

    patience: int | None
    min_delta: float


@dataclass
class TrainerConfig:
    """The fit loop (`conf/trainer/`)."""

    max_epochs: int
    device: str  # auto | cpu | cuda | cuda:N
    precision: Precision
    channels_last: bool
    deterministic: bool
    monitor: str
    monitor_mode: Direction
    early_stopping: EarlyStoppingConfig
    checkpoint_dir: str
    keep_epoch_checkpoints: int
    resume_from: str | None
    keep_start: bool
    num_panels: int
    progress: bool
    limit_train_batches: int | None
    limit_val_batches: int | None
    compile: bool
    num_threads: int | None


@dataclass
class LossConfig:
    """The training loss (`loss:` of conf/train.yaml): the weight of each term, class weights."""

    cross_entropy: float
    dice: float
    focal: float
    lovasz: float
    class_weights: Any  # null | auto | {class name: weight}
    auto_weight_clip: float
    label_smoothing: float
    focal_gamma: float


@dataclass
class InitConfig:
    """Where training starts (`init:` of conf/train.yaml): another model's weights, re-mapped
    by class (landcover.models.transfer), and the modules held back while fine-tuning."""

    model: str | None  # any model reference: run id, runs:/, models:/name@alias, checkpoint
    freeze: list[str]  # `encoder` or state_dict prefixes (net.encoder.layer1)
    frozen_lr_scale: float  # 0: frozen; > 0: those modules learn at lr x this
    class_map: dict[str, list[str]] | None  # {new class: [source classes]}; default: by codes


@dataclass
class PriorConfig:
    """A low-resolution land cover layer fused into the model's maps (`prior:` of
    conf/train.yaml, landcover.predict.prior): what share of each class a layer code means,
    and the share the network assumes where the layer says nothing."""

    name: str | None
    layer: str | None  # what the layer is, e.g. NLCD 2011 class codes
    reference: dict[str, float]  # {class: share}
    codes: dict[int, dict[str, float]]  # {layer code: {class: share}}


@dataclass
class TrackingConfig:
    """Where and how runs are recorded in MLflow (`conf/tracking/`)."""

    uri: str
    experiment: str
    run_name: str | None
    log_model: bool
    tags: dict[str, str]
    system_metrics: bool
    system_metrics_interval: float


@dataclass
class PredictSettings:
    """Tiled prediction, shared by landcover-predict and landcover-evaluate
    (`conf/predict/default.yaml` holds the values and says what each one does)."""

    tile_size: int
    overlap: int
    mode: str
    batch_size: int
    confidence: bool
    probabilities: bool
    vectorize: bool
    vectorize_min_area: float
    vectorize_simplify: float
    progress: bool
    gdal_cache_mb: int
    pixel_size_tolerance: float
    backend: str  # auto | torch | onnxruntime (landcover.predict.backends)
    precision: str  # auto | fp32 | bf16 | fp16
    tta: str  # none | flips | d4 (landcover.predict.tta)
    use_prior: bool  # fuse the model's prior layer (landcover.predict.prior) where it has one
    prior_layer: str | None  # that layer's raster; {stem} and {dir} name the input's

    @classmethod
    def defaults(cls, **changes: Any) -> PredictSettings:
        """The configured defaults with `changes`, for callers outside a Hydra command."""
        values = OmegaConf.merge(
            OmegaConf.structured(cls), OmegaConf.load(PREDICT_DEFAULTS), changes
        )
        return cls(**OmegaConf.to_container(values))  # type: ignore[arg-type]


@dataclass
class EngineConfig:
    """Where a mapping job computes: this process, or a pool of Ray actors."""

    name: str  # local | ray
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int | None
    address: str | None
    max_restarts: int
    placement_timeout: float
    carry_env: list[str]


@dataclass
class PredictCommandConfig:
    """landcover-predict: a mapping job."""

    model: str
    input: Any
    output: str
    asset: str | None
    device: str
    predict: PredictSettings
    engine: EngineConfig
    retries: int
    log_to_mlflow: bool
    per_input_runs: bool
    quicklook_size: int
    tracking: TrackingConfig


@dataclass
class EvaluateSettings:
    """What landcover-evaluate lists and draws besides the scores."""

    confidence_threshold: float
    min_region_pixels: int
    max_regions: int
    max_panels: int


@dataclass
class EvaluateCommandConfig:
    """landcover-evaluate."""

    model: str
    split: str
    device: str
    output_dir: str
    predict: PredictSettings
    evaluate: EvaluateSettings
    data: DataConfig
    tracking: TrackingConfig


@dataclass
class ExportCommandConfig:
    """landcover-export."""

    model: str
    output: str
    opset: int
    tolerance: float
    min_agreement: float
    log_to_mlflow: bool
    tracking: TrackingConfig


@dataclass
class PackageCommandConfig:
    """landcover-package."""

    model: str
    output: str
    name: str | None
    tile: int
    resolution_cm: float
    tracking: TrackingConfig


@dataclass
class PromoteFilters:
    """Which runs landcover-promote may choose among."""

    min_epochs: int
    tags: dict[str, str]
    where: str


@dataclass
class RegistryConfig:
    """The registered model and the aliases landcover-promote moves."""

    name: str
    alias: str
    previous_alias: str


@dataclass
class PromoteCommandConfig:
    """landcover-promote."""

    experiment: str
    sweep: str | None
    metric: str
    direction: str
    run: str | None
    filters: PromoteFilters
    registry: RegistryConfig
    against: str | None
    force: bool
    reason: str
    package: bool
    tracking: TrackingConfig


@dataclass
class ChampionCommandConfig:
    """landcover-champion."""

    action: str
    to: str | None
    reason: str
    metric: str
    force: bool
    package: bool
    registry: RegistryConfig
    tracking: TrackingConfig


@dataclass
class ImportCntkCommandConfig:
    """landcover-import-cntk."""

    file: str
    schema: str
    band_names: list[str]
    normalize: NormalizeConfig
    evaluate_split: str | None
    output_dir: str
    data: DataConfig
    tracking: TrackingConfig


COMMAND_SCHEMAS: dict[str, type] = {
    "predict": PredictCommandConfig,
    "evaluate": EvaluateCommandConfig,
    "export": ExportCommandConfig,
    "package": PackageCommandConfig,
    "promote": PromoteCommandConfig,
    "champion": ChampionCommandConfig,
    "import_cntk": ImportCntkCommandConfig,
}


@dataclass
class TrialConfig:
    """Set by the Optuna sweeper on each job it launches (`++trial.number=3 ...`): which
    trial of which study the job is, so it can re-attach through the storage in any process."""

    study: str
    storage: str
    number: int
    heartbeat_interval: int  # the sweeper passes its own settings
    grace_period: int


@dataclass
class TrainConfig:
    """landcover-train. `optimizer` and `scheduler` are `_target_` configs: their keys are the
    arguments of the class they name, checked against its signature by `validate_config`.
    A sweep job also has `trial` (TrialConfig), added by the sweeper's `++trial.*` overrides
    and typed by `validate_config`."""

    seed: int
    data: DataConfig
    model: Any  # typed by the schema its `arch` selects (MODEL_SCHEMAS)
    trainer: TrainerConfig
    optimizer: Any
    scheduler: Any
    loss: LossConfig
    init: InitConfig
    prior: PriorConfig
    tracking: TrackingConfig


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore, where `conf/` names them in its defaults lists,
    so composition itself checks every key and type (`--cfg job` shows a typed config)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_types", node=TrainConfig)
    for name, schema in COMMAND_SCHEMAS.items():
        store.store(name=f"{name}_types", node=schema)
    # in a group of their own: the commands' tree has no `model` group (model= is a reference)
    store.store(group="types", name="data", node=DataConfig)
    store.store(group="types", name="trainer", node=TrainerConfig)
    store.store(group="types", name="tracking", node=TrackingConfig)
    for arch, schema in MODEL_SCHEMAS.items():
        store.store(group="types/model", name=arch, node=schema)


def plain_dict(node: Any, resolve: bool = True) -> dict[str, Any]:
    """An OmegaConf mapping as a plain dict (OmegaConf's own return type is any container)."""
    value = OmegaConf.to_container(node, resolve=resolve)
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    return cast(dict[str, Any], value)


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
            _check_finite(node[key], f"{prefix}{key!s}.")
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
    if not DEVICE.match(cfg.trainer.device):
        raise ConfigError(
            f"config value trainer.device={cfg.trainer.device!r} is not auto, cpu, cuda or cuda:N"
        )
    if cfg.trainer.keep_epoch_checkpoints < 0:
        raise ConfigError(
            f"config value trainer.keep_epoch_checkpoints={cfg.trainer.keep_epoch_checkpoints} "
            "must be >= 0"
        )
    if cfg.init.frozen_lr_scale < 0:
        raise ConfigError(
            f"config value init.frozen_lr_scale={cfg.init.frozen_lr_scale} must be >= 0"
        )
    if cfg.loss.auto_weight_clip < 1:
        raise ConfigError(
            f"config value loss.auto_weight_clip={cfg.loss.auto_weight_clip} must be >= 1"
        )
    if not 0 <= cfg.loss.label_smoothing < 1:
        raise ConfigError(
            f"config value loss.label_smoothing={cfg.loss.label_smoothing} must be in [0, 1)"
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


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_target_arguments(node: Any, key: str, passed_by_code: set[str]) -> None:
    """A `_target_` config's keys must be arguments of the class it names: `optimizer.momentm`
    is one ConfigError naming the key before any work, not a TypeError mid-run."""
    import inspect

    from hydra.utils import get_class

    if node is None or node.get("_target_") is None:
        return
    try:
        target = get_class(node["_target_"])
    except Exception as err:  # Hydra wraps import errors of every kind
        raise ConfigError(f"config value {key}._target_={node['_target_']!r}: {err}") from err
    parameters = inspect.signature(target).parameters
    accepted = set(parameters) - passed_by_code
    for name, value in node.items():
        if str(name).startswith("_"):
            continue
        if name not in accepted:
            raise ConfigError(
                f"config value {key}.{name} is not an argument of {node['_target_']} "
                f"(it takes {sorted(accepted)})"
            )
        default = parameters[name].default
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(
                f"config value {key}.{name}={value!r} must be a number "
                f"(an argument of {node['_target_']})"
            )


def validate_model_config(model: Any) -> DictConfig:
    """The `model` node typed by the schema its `arch` selects (each has its own keys)."""
    if model is None or "arch" not in model:
        raise ConfigError(
            "config value model.arch is missing: choose model=unet|fpn|deeplabv3plus|seed|pixel_gbm"
        )
    arch = model["arch"]
    if arch not in MODEL_SCHEMAS:
        raise ConfigError(f"config value model.arch={arch!r} is not one of {list(MODEL_SCHEMAS)}")
    try:
        return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(MODEL_SCHEMAS[arch]), model))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{one_line(err, 'model.')} (model.arch={arch})") from err


def one_line(err: OmegaConfBaseException, prefix: str = "") -> str:
    """`config value predict.tile_size: Value 'abc' ... Integer`: OmegaConf's message on one
    line, naming the key."""
    key = getattr(err, "full_key", None)
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    message += did_you_mean(err)
    return f"config value {prefix}{key}: {message}" if key else f"bad config: {message}"


def did_you_mean(err: OmegaConfBaseException) -> str:
    """` (did you mean max_epochs?)` for a key the schema does not have, when one is close."""
    import dataclasses
    import difflib

    key, schema = getattr(err, "key", None), getattr(err, "object_type", None)
    if not isinstance(key, str) or schema is None or not dataclasses.is_dataclass(schema):
        return ""
    names = [field.name for field in dataclasses.fields(schema)]
    if key in names:
        return ""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def validate_command_config(cfg: DictConfig, name: str) -> DictConfig:
    """A command's composed config, checked against its schema before any work: an unknown
    key, a wrong type or a missing value is one ConfigError naming the key."""
    raw = plain_dict(cfg, resolve=False)
    raw.pop("hydra", None)
    return _typed(COMMAND_SCHEMAS[name], raw, "model=<run id> input=scene.tif")


def _typed(schema: type, raw: dict, example: str) -> DictConfig:
    """`raw` merged onto `schema`, resolved, complete and finite, or one ConfigError."""
    try:
        typed = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema), raw))
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
    raw = plain_dict(cfg, resolve=False)
    model = raw.pop("model", None)
    trial = raw.pop("trial", None)
    raw.pop("hydra", None)
    raw["model"] = plain_dict(validate_model_config(model), resolve=False)
    typed = _typed(TrainConfig, raw, "data.root=/path/to/scenes")
    typed.model = validate_model_config(model)  # typed by its architecture's schema
    with open_dict(typed):
        typed.trial = None if trial is None else _typed(TrialConfig, trial, "++trial.number=0")
    check_target_arguments(typed.optimizer, "optimizer", {"params"})
    check_target_arguments(typed.scheduler, "scheduler", {"optimizer"})
    _check_ranges(typed)
    _check_prior(typed)
    return typed


def train_settings(cfg: DictConfig) -> TrainConfig:
    """The validated config as its schema's objects, made once where the job starts.

    What the job hands down is then typed (mypy checks `settings.trainer.max_epochs` where it is
    used, not only where it is declared); the DictConfig stays for what records the config as
    written (run params, the checkpoint's YAML). A sweep trial's `trial:` block is the
    sweeper's, read from the DictConfig."""
    plain = cfg.copy()
    with open_dict(plain):
        plain.pop("trial", None)
        plain.pop("hydra", None)
    settings = OmegaConf.to_object(plain)
    if not isinstance(settings, TrainConfig):
        raise ConfigError(f"not a training config (it is {type(settings).__name__}): validate it")
    return settings


def _check_prior(cfg: DictConfig) -> None:
    """A prior table must name the data's classes with shares in range, before any training."""
    from landcover.data.schema import ClassSchema
    from landcover.predict.prior import PriorLayer

    if cfg.prior.codes:
        PriorLayer.from_metadata(
            plain_dict(cfg.prior), ClassSchema.from_config(plain_dict(cfg.data.schema))
        )


register_schemas()  # importing this module is enough for Hydra to find them
