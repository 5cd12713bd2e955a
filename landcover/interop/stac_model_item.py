"""A model as a STAC Item with the Machine Learning Model extension (MLM), so that a STAC
catalog (and tools that read one: STAC browsers, pystac, stac-model) knows what the packaged
graph takes and gives: bands, tile shape, value scaling, the classes with their colours, the
framework, its size, how it was trained, and where it came from (the MLflow run and registry
version).

Built with stac-model (the MLM extension's own pydantic models), so what is written is what the
extension's maintainers validate; `validate_item` checks an Item offline (STAC core from the
schemas pystac ships, MLM with stac-model), as a catalog without network access must.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
from pystac.extensions.file import FileExtension
from stac_model.base import ProcessingExpression
from stac_model.input import InputStructure, ModelInput
from stac_model.output import MLMClassification, ModelOutput, ModelResult
from stac_model.schema import MLModelExtension, MLModelProperties

from landcover.interop.gis_graph import TileGraph

ONNX_MEDIA_TYPE = "application/octet-stream; framework=onnx; profile=onnx"
TASK = "semantic-segmentation"


@dataclass(frozen=True)
class Provenance:
    """Where a packaged model came from: what the Item links to."""

    reference: str  # what the package was made from (a run id, models:/..., a file)
    run_id: str | None = None
    tracking_uri: str | None = None
    registered_name: str | None = None
    version: str | None = None
    hyperparameters: Mapping[str, Any] | None = None
    dataset: str | None = None  # the training data's name (the run's `data` tag)


def multihash_sha256(path: Path) -> str:
    """`file:checksum` as the File extension writes it: a multihash (0x12 = sha2-256, 0x20 =
    32 bytes) in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "1220" + digest.hexdigest()


def _classes(metadata: dict[str, Any]) -> list[MLMClassification]:
    """The output channels: value = channel (what argmax gives), with the label code
    landcover-predict writes for it, its name and colour."""
    classes = []
    for channel, info in enumerate(metadata["schema"]["classes"]):
        codes = info.get("codes") or []
        code = f"; map code {codes[0]}" if codes else ""
        classes.append(
            MLMClassification(
                value=channel,
                name=str(info["name"]),
                description=f"{info['name']} (output channel {channel}{code})",
                color_hint=str(info["color"]).lstrip("#").upper(),
            )
        )
    return classes


def _properties(
    metadata: dict[str, Any], graph: TileGraph, parameters: int, provenance: Provenance
) -> MLModelProperties:
    model = metadata.get("model") or {}
    architecture = str(metadata.get("arch", "network"))
    if model.get("encoder_name"):
        architecture += f" ({model['encoder_name']})"
    bands = [str(b) for b in metadata.get("band_names") or range(graph.bands)]
    normalize = metadata.get("normalize") or {}
    scaling = "" if not normalize else f" and standardises them (mean {normalize.get('mean')}, " \
        f"std {normalize.get('std')})"  # fmt: skip
    model_input = ModelInput(
        name="tile of digital numbers",
        bands=bands,
        input=InputStructure(
            shape=[1, graph.bands, graph.tile, graph.tile],
            dim_order=["batch", "bands", "height", "width"],
            data_type="float32",
        ),
        # the graph takes the imagery's digital numbers as read: it scales them itself
        value_scaling=None,
        resize_type=None,
        pre_processing_function=None,
        description=f"the imagery's digital numbers as read (0-255 for NAIP); the graph "
        f"mirrors the tile's edge{scaling}",
    )
    output = ModelOutput(
        name="class probabilities",
        tasks={TASK},
        classes=_classes(metadata),
        result=ModelResult(
            shape=[1, graph.classes, graph.output, graph.output],
            dim_order=["batch", "channel", "height", "width"],
            data_type="float32",
        ),
        post_processing_function=ProcessingExpression(
            format="python", expression="numpy.argmax(probabilities, axis=1)"
        ),
    )
    return MLModelProperties(
        name=str(metadata.get("name") or architecture),
        architecture=architecture,
        tasks={TASK},
        framework="ONNX",
        framework_version="opset 17",
        accelerator="amd64",
        accelerator_constrained=False,
        accelerator_summary="any CPU; ONNX Runtime or any ONNX engine",
        total_parameters=int(parameters),
        pretrained=True,
        pretrained_source=f"{provenance.dataset or 'its training data'} (dataset fingerprint "
        f"{metadata.get('dataset_fingerprint') or 'unknown'})",
        input=[model_input],
        output=[output],
        hyperparameters=dict(provenance.hyperparameters or {}) or None,
    )


def model_item(
    metadata: dict[str, Any],
    graph: TileGraph,
    item_path: Path,
    parameters: int,
    provenance: Provenance,
    item_id: str,
) -> pystac.Item:
    """The MLM Item of a packaged graph, its asset href relative to `item_path`'s folder."""
    item = pystac.Item(
        id=item_id,
        geometry=None,
        bbox=None,
        datetime=datetime.now(UTC),
        properties={
            "description": f"landcover model {provenance.reference}, packaged for GIS tools",
            "landcover:reference": provenance.reference,
            "landcover:dataset_fingerprint": metadata.get("dataset_fingerprint"),
            "landcover:tile_context": graph.context,
        },
    )
    if provenance.run_id:
        item.properties["landcover:mlflow_run_id"] = provenance.run_id
        item.add_link(
            pystac.Link("via", f"runs:/{provenance.run_id}", title="the MLflow run that trained it")
        )
    if provenance.registered_name and provenance.version:
        uri = f"models:/{provenance.registered_name}/{provenance.version}"
        item.properties["landcover:registered_model"] = provenance.registered_name
        item.properties["landcover:model_version"] = str(provenance.version)
        item.add_link(pystac.Link("via", uri, title="its MLflow registry version"))
    if (provenance.tracking_uri or "").startswith(("http://", "https://")):
        item.add_link(
            pystac.Link("via", str(provenance.tracking_uri), title="the MLflow tracking server")
        )
    fields = _properties(metadata, graph, parameters, provenance).model_dump(
        by_alias=True, exclude_unset=True, exclude_defaults=True
    )
    MLModelExtension.ext(item, add_if_missing=True).apply(fields)
    for model_input in item.properties["mlm:input"]:
        model_input["value_scaling"] = None  # said, not left out: the graph scales itself
    href = Path(graph.path).resolve()
    relative = Path(os.path.relpath(href, item_path.parent.resolve())).as_posix()
    asset = pystac.Asset(
        href=relative,
        title="ONNX graph: a tile of digital numbers in, class probabilities out",
        media_type=ONNX_MEDIA_TYPE,
        roles=["mlm:model", "data"],
        extra_fields={"mlm:artifact_type": "onnx"},
    )
    item.add_asset("model", asset)
    files = FileExtension.ext(asset, add_if_missing=True)
    files.checksum = multihash_sha256(href)
    files.size = href.stat().st_size
    return item


class StacValidationError(ValueError):
    """The Item does not follow STAC core or the MLM extension."""


def validate_core(document: dict[str, Any], kind: str = "item") -> None:
    """Check a STAC Item, Catalog or Collection against STAC core's schemas as pystac ships
    them (no network); the first failure names where."""
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import best_match
    from pystac.validation.local_validator import get_local_schema_cache
    from referencing import Registry, Resource

    cache = get_local_schema_cache()
    uri = next(uri for uri in cache if uri.endswith(f"{kind}-spec/json-schema/{kind}.json"))
    registry: Registry = Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in cache.items()
    )
    error = best_match(Draft7Validator(cache[uri], registry=registry).iter_errors(document))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the document"
        raise StacValidationError(f"not a STAC {kind}: {where}: {error.message[:200]}")


def validate_item(document: dict[str, Any]) -> MLModelProperties:
    """Check an MLM Item offline: STAC core against the schemas pystac ships (no network),
    the MLM fields with stac-model's models; each failure names the field."""
    from pydantic import ValidationError

    validate_core(document, "item")
    mlm = {k[4:]: v for k, v in document.get("properties", {}).items() if k.startswith("mlm:")}
    try:
        return MLModelProperties.model_validate(mlm)
    except ValidationError as err:
        first = err.errors()[0]
        where = "/".join(str(part) for part in first["loc"])
        raise StacValidationError(f"MLM field mlm:{where}: {first['msg'][:200]}") from err
