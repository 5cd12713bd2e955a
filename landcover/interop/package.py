"""`landcover-package`: a model for the tools maps are made with, in one folder.

    landcover-package model=models:/landcover@champion output=packages/champion/

writes
    qgis/<name>.onnx     for QGIS's Deepness plugin: a fixed tile in, class probabilities out,
                         with the metadata Deepness reads (class names, tile size, overlap,
                         resolution, the input scaling that hands the graph digital numbers)
    qgis/<name>.qml      a paletted style for the class raster Deepness computes
    <name>.stac.json     a STAC Item with the Machine Learning Model extension (MLM 1.4): the
                         graph's bands, tile, classes and colours, framework, size, training
                         settings, checksum, and links to its MLflow run and registry version
    arcgis/<name>.dlpk   for ArcGIS Pro ("Classify Pixels Using Deep Learning"): the Esri
                         model definition, its graph (tiles padded with the scene) and
                         its raster function
Every graph is checked before it is kept: its classes against PyTorch's on a random tile.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from landcover import artifacts
from landcover.artifacts.onnx_file import METADATA_KEY
from landcover.atomic import write_text
from landcover.errors import LandcoverError
from landcover.interop.deepness import deepness_properties, qml_style
from landcover.interop.esri import model_definition, write_dlpk
from landcover.interop.gis_graph import TileGraph, class_agreement, export_tile_graph, tiling
from landcover.interop.stac_model_item import Provenance, model_item
from landcover.registry.promotion import MODEL_URI, resolve_version

if TYPE_CHECKING:
    import torch

log = logging.getLogger("landcover.package")
MIN_AGREEMENT = 0.999  # of a random tile's pixels, graph vs PyTorch


@dataclass(frozen=True)
class Package:
    """What was written, and the check it passed."""

    folder: Path
    graph: TileGraph
    style: Path
    dlpk: Path
    agreement: float
    item: Path


HYPERPARAMETER_PREFIXES = ("model.", "optimizer.", "scheduler.", "loss.", "trainer.max_epochs",
                           "data.batch_size", "data.patch_size", "seed")  # fmt: skip


def provenance_of(reference: str, run_id: str | None, tracking_uri: str | None) -> Provenance:
    """The run and registry version a reference came from, and the run's training settings
    (what the MLM Item links to and records); a file reference has neither."""
    if run_id is None:
        return Provenance(reference)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    params = run.data.params
    dataset = run.data.tags.get("data")
    hyper = {k: v for k, v in sorted(params.items()) if k.startswith(HYPERPARAMETER_PREFIXES)}
    found = resolve_version(client, str(reference)) if MODEL_URI.match(str(reference)) else None
    if found is None:
        return Provenance(reference, run_id, tracking_uri, hyperparameters=hyper, dataset=dataset)
    version = str(found.version)
    return Provenance(reference, run_id, tracking_uri, found.name, version, hyper, dataset)


def package_name(reference: str) -> str:
    """A file name from a model reference (`models:/landcover@champion` -> landcover_champion)."""
    name = re.sub(r"^(models|runs):/", "", str(reference)).strip("/")
    name = Path(name).stem if Path(name).suffix in (".pt", ".model", ".onnx") else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "model"


def package_model(
    reference: str,
    folder: Path,
    *,
    tracking_uri: str | None = None,
    tile: int = 512,
    resolution_cm: float = 100.0,
    name: str | None = None,
) -> Package:
    """Write the QGIS and ArcGIS packages of the model `reference` names into `folder`."""
    model = artifacts.load(str(reference), tracking_uri=tracking_uri, device="cpu")
    if model.torch_module is None or getattr(model.torch_module, "fitted_once", False):
        raise LandcoverError(f"{reference}: only networks can be packaged (ONNX from PyTorch)")
    metadata = {**model.metadata, "source_reference": model.reference}
    name = name or package_name(reference)
    tile, context = tiling(metadata, tile)
    properties = deepness_properties(metadata, tile, context, resolution_cm)
    properties[METADATA_KEY] = json.dumps(metadata, default=str)
    (folder / "qgis").mkdir(parents=True, exist_ok=True)
    (folder / "arcgis").mkdir(parents=True, exist_ok=True)
    graph = export_tile_graph(
        model.torch_module, metadata, folder / "qgis" / f"{name}.onnx", tile, properties=properties
    )
    agreement = class_agreement(model.torch_module, graph)
    if agreement < MIN_AGREEMENT:
        graph.path.unlink(missing_ok=True)
        raise LandcoverError(
            f"{reference}: the packaged graph's classes agree with PyTorch's on {agreement:.4%} "
            f"of a tile's pixels (at least {MIN_AGREEMENT:.1%} required); nothing was written"
        )
    style = folder / "qgis" / f"{name}.qml"
    write_text(style, qml_style(metadata))
    with tempfile.TemporaryDirectory(dir=folder / "arcgis") as scratch:
        padded = _padded_graph(model.torch_module, metadata, graph, Path(scratch) / graph.path.name)
        dlpk = write_dlpk(
            folder / "arcgis" / f"{name}.dlpk",
            model_definition(metadata, padded, name),
            padded,
            name,
        )
    item_path = folder / f"{name}.stac.json"
    item = model_item(
        metadata,
        graph,
        item_path,
        sum(p.numel() for p in model.torch_module.parameters()),
        provenance_of(str(reference), model.source_run_id, tracking_uri),
        name,
    )
    write_text(item_path, json.dumps(item.to_dict(include_self_link=False), indent=2))
    log.info(
        "packaged %s: %s (tile %d, overlap %d px; classes agree with PyTorch on %.4f%%), %s",
        reference,
        graph.path,
        graph.tile,
        2 * graph.context,
        100 * agreement,
        dlpk,
    )
    return Package(folder, graph, style, dlpk, agreement, item_path)


def _padded_graph(
    network: torch.nn.Module, metadata: dict[str, Any], graph: TileGraph, path: Path
) -> TileGraph:
    """The graph for a tool that pads each tile with the scene itself (ArcGIS's ModelPadding):
    the network on the tile as given, its margin cut, checked as Deepness's."""
    padded = export_tile_graph(network, metadata, path, graph.tile, mirror=False)
    agreement = class_agreement(network, padded)
    if agreement < MIN_AGREEMENT:
        raise LandcoverError(
            f"the ArcGIS graph's classes agree with PyTorch's on {agreement:.4%} of a tile's "
            f"pixels (at least {MIN_AGREEMENT:.1%} required); nothing was written"
        )
    return padded


def run_package(cfg: DictConfig) -> Package:
    """`landcover-package`."""
    if float(cfg.resolution_cm) <= 0:
        raise LandcoverError(f"resolution_cm={cfg.resolution_cm} must be a positive size")
    return package_model(
        str(cfg.model),
        Path(cfg.output),
        tracking_uri=cfg.tracking.uri,
        tile=int(cfg.tile),
        resolution_cm=float(cfg.resolution_cm),
        name=cfg.name,
    )
