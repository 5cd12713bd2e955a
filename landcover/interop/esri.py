"""An Esri deep learning package (`.dlpk`) for ArcGIS Pro's "Classify Pixels Using Deep
Learning": the model definition (`.emd`), the fixed-tile ONNX graph and the raster function
that runs it with ONNX Runtime and numpy (`esri_function/landcover_classifier.py`).

The `.emd` follows Esri's "writing a model definition" (raster-deep-learning): the classes'
`Value` is the code `landcover-predict` writes for each class, so a map made in ArcGIS Pro and
one made here carry the same numbers, names and colours.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from landcover.atomic import atomic_target
from landcover.data.schema import hex_to_rgb
from landcover.interop.gis_graph import TileGraph

FRAMEWORK = "ONNX"
CONFIGURATION = "landcover_classifier"
FUNCTION = Path(__file__).parent / "esri_function" / f"{CONFIGURATION}.py"


def model_definition(metadata: dict[str, Any], graph: TileGraph, name: str) -> dict[str, Any]:
    """The `.emd` document for the graph."""
    classes = []
    for info in metadata["schema"]["classes"]:
        codes = info.get("codes") or []
        if not codes:
            continue
        classes.append(
            {
                "Value": int(codes[0]),
                "Name": str(info["name"]),
                "Color": list(hex_to_rgb(str(info["color"]))),
            }
        )
    if len(classes) != graph.classes:
        raise ValueError("every class of the model needs a label code to be mapped in ArcGIS")
    return {
        "Framework": FRAMEWORK,
        "ModelConfiguration": CONFIGURATION,
        "ModelType": "ImageClassification",
        "ModelFile": graph.path.name,
        "ExtractBands": list(range(graph.bands)),
        "DataRange": [0, 255],
        "ImageHeight": graph.tile,
        "ImageWidth": graph.tile,
        "ModelPadding": graph.context,
        "BatchSize": 1,
        "Classes": classes,
        "ModelName": name,
        "Version": "2026.12",
    }


def write_dlpk(target: Path, emd: dict[str, Any], graph: TileGraph, name: str) -> Path:
    """The package: `<name>.emd`, the ONNX graph and `ONNX/landcover_classifier.py`, written
    whole or not at all."""
    with atomic_target(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as pack:
        pack.writestr(f"{name}.emd", json.dumps(emd, indent=2))
        pack.write(graph.path, graph.path.name)
        pack.write(FUNCTION, f"{FRAMEWORK}/{CONFIGURATION}.py")
    return target
