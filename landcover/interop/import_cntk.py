"""`landcover-import-cntk path.model`: the 2018 tutorial's CNTK model as an MLflow model.

The imported network is logged like a trained one (PyTorch + pyfunc faces, the tutorial's
5-label schema, its input scaling of 1/256 with the network's own per-patch R, G, B centring,
the 64 px output margin), so predict, evaluate, export, serve and promote take it by run id or
registry name. With `evaluate_split=val` the import run also gets whole-scene `val/*` metrics
and the data's fingerprint, which makes it comparable with (and promotable against) runs
trained on the same data.

    landcover-import-cntk ../shared/models/seed-cntk/250epochs.model evaluate_split=val
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from landcover import tracking
from landcover.config import plain_dict
from landcover.data.loaders import split_scenes
from landcover.data.scenes import dataset_fingerprint
from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError
from landcover.interop.cntk_import import import_cntk_seed
from landcover.metrics import scores_from_matrix
from landcover.models import SegmentationModel
from landcover.models.seed import SeedNet
from landcover.paths import CONFIG_DIR
from landcover.predict.predictor import PredictSettings
from landcover.predict.reference import from_module

log = logging.getLogger("landcover.import_cntk")


def tutorial_metadata(cfg: DictConfig, schema: ClassSchema, source: Path, digest: str) -> dict:
    """The metadata a landcover model carries, for the 2018 network and its 5 labels."""
    return {
        "landcover_format": 2,
        "arch": "seed",
        "model": {"arch": "seed"},
        "schema": schema.to_dict(),
        "bands": 4,
        "band_names": list(cfg.band_names),
        "normalize": {"mean": list(cfg.normalize.mean), "std": list(cfg.normalize.std)},
        "input": "raw digital numbers, float32 (batch, bands, height, width), any height/width",
        "output_margin": SeedNet.output_margin,
        "size_divisor": SeedNet.size_divisor,
        "patch_size": 256,
        "source": f"CNTK {source.name} (sha256 {digest[:16]})",
    }


def tutorial_model(net: SeedNet, cfg: DictConfig) -> SegmentationModel:
    """The imported network behind the tutorial's input scaling and 64 px margin."""
    return SegmentationModel(
        net,
        mean=list(cfg.normalize.mean),
        std=list(cfg.normalize.std),
        output_margin=SeedNet.output_margin,
        size_divisor=SeedNet.size_divisor,
    ).eval()


def load_schema(name: str) -> ClassSchema:
    """A class schema by name from `conf/data/schema/`."""
    path = Path(CONFIG_DIR) / "data" / "schema" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"schema={name!r}: no {path}")
    return ClassSchema.from_config(plain_dict(OmegaConf.load(path)))


def evaluate_import(cfg: DictConfig, model, schema: ClassSchema) -> tuple[dict, str]:
    """Whole-scene scores on one split (the tutorial's 256 in / 128 out tiling)."""
    from landcover.evaluate import evaluate_scene

    data_cfg = cfg.data  # typed and resolved by validate_command_config
    # every split is read (and checked) once: all of them make the fingerprint, as in training
    by_split = {split: split_scenes(data_cfg, split, schema) for split in data_cfg.splits}
    split = str(cfg.evaluate_split)
    scenes = by_split.get(split) or split_scenes(data_cfg, split, schema)  # raises, naming it
    all_scenes = [scene for found in by_split.values() for scene in found]
    # 256 in: the tutorial's tiles; the predictor keeps their 128 px centres (the margin)
    settings = PredictSettings.defaults(tile_size=256, progress=False)
    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    matrix = np.sum([evaluate_scene(model, s, out, settings, 0.9, 16).matrix for s in scenes], 0)
    scores = scores_from_matrix(matrix, schema.scored_classes)
    metrics = scores.as_metrics(schema.names, schema.scored_classes, prefix="val/")
    return metrics, dataset_fingerprint(all_scenes)


def load_cntk_file(path: Path) -> tuple[SegmentationModel, dict]:
    """A 2018 tutorial CNTK model file as the network and metadata `landcover-import-cntk`
    logs, in memory, with the command's own defaults (5 labels, inputs / 256): any command that
    takes a model reference takes the file itself (`init.model=.../250epochs.model` starts a
    training run from it without an import run first)."""
    from landcover.paths import COMMANDS_CONFIG_DIR

    cfg = OmegaConf.load(Path(COMMANDS_CONFIG_DIR) / "import_cntk.yaml")
    assert isinstance(cfg, DictConfig)  # the command's config file is a mapping
    imported = import_cntk_seed(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    metadata = tutorial_metadata(cfg, load_schema(str(cfg.schema)), path, digest)
    return tutorial_model(imported.net, cfg), metadata


def run_import(cfg: DictConfig) -> str:
    """`landcover-import-cntk`: rebuild the 2018 model, optionally score it, and log it as a
    landcover model."""
    source = Path(str(cfg.file))
    imported = import_cntk_seed(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    schema = load_schema(str(cfg.schema))
    if len(schema.classes) != imported.net.head.out_channels:
        raise ConfigError(
            f"schema={cfg.schema} has {len(schema.classes)} classes; {source} predicts "
            f"{imported.net.head.out_channels}"
        )
    metadata = tutorial_metadata(cfg, schema, source, digest)
    model = tutorial_model(imported.net, cfg)
    tags = {
        "landcover.kind": "import",
        "model.arch": "seed",
        "source.file": str(source),
        "source.sha256": digest,
        **tracking.git_state(),
    }
    metrics: dict[str, float] = {}
    if cfg.evaluate_split:
        metrics, tags["dataset_fingerprint"] = evaluate_import(
            cfg, from_module(model, metadata, str(source)), schema
        )
        tags["data"] = str(cfg.data.name)
    tracker = tracking.Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    with tracker.start(
        run_name=cfg.tracking.run_name or f"cntk {source.stem}", tags=tags
    ) as run_id:
        assert run_id is not None  # a tracker that records
        tracker.log_params(
            {
                "source.file": source.name,
                "cntk.tensors": str(imported.cntk_tensors),
                "model.parameters": str(imported.parameters),
                "schema": str(cfg.schema),
                "evaluate_split": str(cfg.evaluate_split),
            }
        )
        tracker.log_text(json.dumps(imported.mapping, indent=1), "cntk/tensor_mapping.json")
        if metrics:
            tracker.log_metrics(metrics, step=0)
        tracker.log_model(torch.nn.Module.cpu(model), metadata=metadata)
    log.info(
        "imported %s: %d CNTK tensors -> %d PyTorch tensors (%d parameters); run %s%s",
        source,
        imported.cntk_tensors,
        len(imported.mapping),
        imported.parameters,
        run_id,
        f"; {cfg.evaluate_split} OA {metrics['val/overall_accuracy']:.4f}" if metrics else "",
    )
    return run_id
