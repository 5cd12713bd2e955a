"""From a data config to validated scenes and DataLoaders: the one door into training data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from landcover.config import plain_dict
from landcover.data.reader import SceneReader
from landcover.data.sampling import GridPatchDataset, RandomPatchDataset, RareClassSampling
from landcover.data.scenes import Scene, dataset_fingerprint, find_pairs, load_scenes
from landcover.data.schema import ClassSchema
from landcover.data.synthetic import SyntheticSpec, generate
from landcover.errors import ConfigError
from landcover.training.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    GlobalBatchShard,
    StridedShard,
)


@dataclass
class TrainingData:
    """Everything the fit loop reads: the scenes, their datasets and loaders, the class schema and
    the data fingerprint runs are compared by."""

    schema: ClassSchema
    train_scenes: list[Scene]
    val_scenes: list[Scene]
    train_dataset: RandomPatchDataset
    val_dataset: GridPatchDataset
    train_loader: DataLoader
    val_loader: DataLoader
    fingerprint: str


def schema_from_config(data_cfg: DictConfig) -> ClassSchema:
    """The class schema of `data.schema`, or a ConfigError naming what is wrong with it."""
    try:
        return ClassSchema.from_config(plain_dict(data_cfg.schema))
    except ValueError as err:
        raise ConfigError(f"config value data.schema: {err}") from err


def ensure_synthetic(data_cfg: DictConfig) -> None:
    """Generate the synthetic dataset under data.root when the config asks for one."""
    if data_cfg.synthetic is None:
        return
    spec = SyntheticSpec(
        scenes=dict(data_cfg.synthetic.scenes),
        size=int(data_cfg.synthetic.size),
        seed=int(data_cfg.synthetic.seed),
    )
    generate(Path(data_cfg.root), spec)


def split_scenes(data_cfg: DictConfig, split: str, schema: ClassSchema) -> list[Scene]:
    """The checked scenes of one split (image/label pairs), in a stable order so that runs are
    reproducible."""
    if split not in data_cfg.splits:
        raise ConfigError(
            f"config value data.splits has no {split!r} split (has {list(data_cfg.splits)})"
        )
    split_cfg = data_cfg.splits[split]
    pairs = find_pairs(
        pattern=split_cfg.pattern,
        manifest=split_cfg.manifest,
        image_suffix=data_cfg.image_suffix,
        label_suffix=data_cfg.label_suffix,
    )
    if not pairs:
        where = split_cfg.manifest or split_cfg.pattern
        raise ConfigError(
            f"data split {split!r} of data={data_cfg.name} found no scenes at {where!r} "
            f"(data.root={data_cfg.root}); point data.root at the data or fix the pattern"
        )
    scenes = load_scenes(
        pairs, bands=data_cfg.bands, schema=schema, check_label_codes=data_cfg.check_label_codes
    )
    if all(scene.labelled_pixels == 0 for scene in scenes):
        files = [scene.label_path for scene in scenes][:5]
        raise ConfigError(
            f"data split {split!r} has no labelled pixel: every label in {files}"
            f"{' ...' if len(scenes) > 5 else ''} is an ignored or no-data code of schema "
            f"{schema.name!r}; nothing to train or score on"
        )
    return scenes


def build_training_data(
    data_cfg: DictConfig,
    *,
    seed: int,
    output_margin: int,
    pin_memory: bool = False,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> TrainingData:
    """Scenes, datasets and loaders; with several processes each loader yields this rank's
    share (its block of every global batch, every N-th validation tile)."""
    ensure_synthetic(data_cfg)
    schema = schema_from_config(data_cfg)
    train_scenes = split_scenes(data_cfg, "train", schema)
    val_scenes = split_scenes(data_cfg, "val", schema)
    lut = schema.lookup_table()
    rare = None
    if data_cfg.rare_sampling is not None and data_cfg.rare_sampling.classes:
        try:
            indices = schema.class_indices(list(data_cfg.rare_sampling.classes))
        except ValueError as err:
            raise ConfigError(f"config value data.rare_sampling.classes: {err}") from err
        rare = RareClassSampling(
            class_indices=tuple(indices),
            min_fraction=float(data_cfg.rare_sampling.min_fraction),
            keep_probability=float(data_cfg.rare_sampling.keep_probability),
        )
    try:
        train_dataset = RandomPatchDataset(
            SceneReader(train_scenes, lut, data_cfg.cache_max_pixels),
            patch_size=data_cfg.patch_size,
            length=data_cfg.patches_per_epoch,
            seed=seed,
            rare=rare,
            flips=data_cfg.augment.flips,
            rot90=data_cfg.augment.rot90,
            color_jitter=data_cfg.augment.color_jitter,
        )
    except ValueError as err:
        raise ConfigError(f"config value data.patch_size={data_cfg.patch_size}: {err}") from err
    val_tile = data_cfg.patch_size - 2 * output_margin if output_margin else data_cfg.val_tile
    if val_tile <= 0:
        raise ConfigError(
            f"config value data.patch_size={data_cfg.patch_size} leaves no output "
            f"for a model with a {output_margin} px margin"
        )
    val_dataset = GridPatchDataset(
        SceneReader(val_scenes, lut, data_cfg.cache_max_pixels),
        tile=val_tile,
        margin=output_margin,
    )
    workers = data_cfg.num_workers
    common = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0}
    generator = torch.Generator().manual_seed(seed)
    try:
        shard = GlobalBatchShard(len(train_dataset), data_cfg.batch_size, distributed)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    train_loader = DataLoader(
        train_dataset,
        batch_size=shard.local_batch,
        sampler=shard,
        drop_last=True,
        generator=generator,
        **common,
    )
    val_loader = DataLoader(
        val_dataset,
        batch_size=data_cfg.val_batch_size,
        sampler=StridedShard(len(val_dataset), distributed),
        **common,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"data.patches_per_epoch={data_cfg.patches_per_epoch} is smaller than "
            f"data.batch_size={data_cfg.batch_size}: an epoch would be empty"
        )
    return TrainingData(
        schema=schema,
        train_scenes=train_scenes,
        val_scenes=val_scenes,
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        train_loader=train_loader,
        val_loader=val_loader,
        fingerprint=dataset_fingerprint(train_scenes + val_scenes),
    )
