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
from omegaconf import DictConfig

from landcover.artifacts.cntk_graph import import_cntk_seed
from landcover.artifacts.reference import from_module
from landcover.artifacts.tutorial_model import load_schema, tutorial_metadata, tutorial_model
from landcover.data.loaders import split_scenes
from landcover.data.scenes import dataset_fingerprint
from landcover.data.schema import ClassSchema
from landcover.errors import ConfigError
from landcover.metrics import scores_from_matrix
from landcover.predict.predictor import PredictSettings
from landcover.tracking import runs as tracking

log = logging.getLogger("landcover.import_cntk")


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
    metadata = tutorial_metadata(
        schema, source, digest, cfg.band_names, cfg.normalize.mean, cfg.normalize.std
    )
    model = tutorial_model(imported.net, cfg.normalize.mean, cfg.normalize.std)
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
