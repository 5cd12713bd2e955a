"""A QGIS style (`<map>.qml`) beside every class map and mosaic.

QGIS opens a raster with the style file of the same name beside it: the map then shows each
class in the model's colour under its name, with exactly the model's classes in the legend.
Without one, a GeoTIFF palette (always 256 entries for a byte band) lists 256 "classes",
250 of them black and nameless. The style is built from what the map itself records (its
`class_names` and `class_codes` tags and its colour table), so a mosaic gets the same style.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

from landcover.atomic import write_text


def qml(codes: Sequence[int], names: Sequence[str], colours: Mapping[int, Sequence[int]]) -> str:
    """A paletted-renderer QGIS style: one entry per class (no data is left transparent)."""
    entries = []
    for code, name in zip(codes, names, strict=True):
        red, green, blue = (list(colours.get(int(code), (128, 128, 128)))[:3] + [128] * 3)[:3]
        entries.append(
            f'        <paletteEntry value="{int(code)}" '
            f'color="#{red:02x}{green:02x}{blue:02x}" alpha="255" label={quoteattr(str(name))}/>'
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22.0" styleCategories="Symbology">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" '
        'nodataColor="">\n'
        "      <colorPalette>\n" + "\n".join(entries) + "\n      </colorPalette>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n"
    )


def style_path(raster: Path) -> Path:
    """Where QGIS looks for a raster's default style."""
    return raster.with_suffix(".qml")


def write_style_of(class_map: Path, target: Path | None = None) -> Path:
    """The style of a written class map (its tags and colour table), beside `target` (by
    default the map itself)."""
    import rasterio

    with rasterio.open(class_map) as src:
        tags = src.tags()
        colours = src.colormap(1)
    names = json.loads(tags["class_names"])
    codes = json.loads(tags["class_codes"])
    path = style_path(target or class_map)
    write_text(path, qml(codes, names, colours))
    return path
