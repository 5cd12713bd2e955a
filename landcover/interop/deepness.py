"""What QGIS's Deepness plugin reads from an ONNX file, and a QGIS style for what it draws.

Deepness (PUTvision's "Deep Neural Remote Sensing" plugin) takes a Segmentor's tile size,
overlap, class names, resolution and input scaling from the ONNX file's metadata
(`model_base.py`), divides the pixels by 255 and then standardises them with the file's
`standardization_mean`/`std` (`preprocessing_utils.py`) before the graph sees them. Our graph
expects digital numbers, so the mean is 0 and the std 1/255: Deepness's own scaling then hands
the graph exactly what it was trained on.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import quoteattr

from landcover.data.schema import hex_to_rgb
from landcover.interop.gis_graph import TileGraph


def overlap_percent(tile: int, context: int) -> int:
    """The overlap in Deepness's whole percent of the tile (it reads an int) whose pixels, as
    Deepness rounds them (`ProcessingOverlap.get_overlap_px`), are at least twice the context:
    every pixel inside the scene is then answered by a tile's centre."""
    percent = 0
    while int(tile * percent / 100 * 2) // 2 < 2 * context:
        percent += 1
    return percent


def deepness_properties(
    metadata: dict[str, Any], tile: int, context: int, resolution_cm: float
) -> dict[str, str]:
    """The ONNX metadata entries Deepness reads (each value JSON, as it parses them)."""
    bands = int(metadata["bands"])
    classes = metadata["schema"]["classes"]
    entries: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(i): str(c["name"]) for i, c in enumerate(classes)},
        "resolution": float(resolution_cm),
        "tiles_size": int(tile),  # the name in Deepness's documentation
        "tile_size": int(tile),  # the name its code reads (model_base.get_metadata_tile_size)
        "tiles_overlap": overlap_percent(tile, context),
        "standardization_mean": [0.0] * bands,
        "standardization_std": [1.0 / 255.0] * bands,
        "seg_thresh": 0.0,  # every pixel gets its most probable class, as landcover-predict's
        "seg_small_segment": 0,  # no smoothing: the map is the model's
    }
    return {key: json.dumps(value) for key, value in entries.items()}


def check_graph(graph: TileGraph) -> None:
    """Deepness's own conditions on a segmentation graph (one input, a square tile, as many
    output channels as class names)."""
    if graph.tile % 2 or graph.context % 2:
        raise ValueError(f"Deepness needs an even tile and overlap ({graph.tile}, {graph.context})")


def qml_style(metadata: dict[str, Any]) -> str:
    """A paletted QGIS style for the class raster Deepness computes (value = class number + 1,
    Deepness's own numbering, 0 where nothing was classified): each class in its colour and name."""
    entries = []
    for i, info in enumerate(metadata["schema"]["classes"]):
        r, g, b = hex_to_rgb(str(info["color"]))
        entries.append(
            f'        <paletteEntry value="{i + 1}" color="#{r:02x}{g:02x}{b:02x}" alpha="255"'
            f" label={quoteattr(str(info['name']))}/>"
        )
    palette = "\n".join(entries)
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.22" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">
      <colorPalette>
{palette}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""
