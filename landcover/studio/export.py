"""A session's corrections for someone else: the edits in force as a GeoPackage layer with a
QGIS style, the corrections raster with its own, and the whole session zipped.

The session's `edits.gpkg` is a log (every stroke, the undone ones and the undo rows too), which
is what makes undo and replay exact but is not what a colleague opening it in QGIS wants to
see. The export keeps only what is in force, in the image's CRS, one feature per stroke and
class, coloured by class.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from landcover.atomic import atomic_target, write_text
from landcover.data.schema import hex_to_rgb
from landcover.studio.edits import EditLog, write_rows

EXPORT_FIELDS = ("stroke", "time", "author", "kind", "class_name", "class_code")
SKIPPED = {".edits.lock", ".studio.json", "export"}  # locks, the live token, earlier exports


@dataclass(frozen=True)
class Export:
    """What was written."""

    layer: Path  # corrections.gpkg, layer "corrections"
    style: Path  # corrections.qml (QGIS picks it up beside the GeoPackage)
    raster: Path  # the corrections raster, copied with its style
    archive: Path  # the session, zipped
    features: int


def vector_style(log: EditLog) -> str:
    """A categorized QGIS style: each class's strokes filled half-transparent in its colour
    and outlined in it, labelled with its name."""
    categories, symbols = [], []
    for number, info in enumerate(log.schema.classes):
        codes: tuple[int, ...] = info.codes or ()
        if info.ignore or not codes:
            continue
        r, g, b = hex_to_rgb(info.color)
        categories.append(
            f'      <category render="true" symbol="{number}" value="{int(codes[0])}" '
            f"label={quoteattr(info.name)}/>"
        )
        symbols.append(
            f"""      <symbol type="fill" name="{number}" alpha="1" clip_to_extent="1">
        <layer class="SimpleFill" enabled="1" pass="0" locked="0">
          <Option type="Map">
            <Option type="QString" name="color" value="{r},{g},{b},110"/>
            <Option type="QString" name="outline_color" value="{r},{g},{b},255"/>
            <Option type="QString" name="outline_width" value="0.5"/>
            <Option type="QString" name="style" value="solid"/>
          </Option>
        </layer>
      </symbol>"""
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22" styleCategories="Symbology">\n'
        '  <renderer-v2 type="categorizedSymbol" attr="class_code" symbollevels="0" '
        'enableorderby="0" forceraster="0">\n    <categories>\n'
        + "\n".join(categories)
        + "\n    </categories>\n    <symbols>\n"
        + "\n".join(symbols)
        + "\n    </symbols>\n  </renderer-v2>\n</qgis>\n"
    )


def _write_layer(log: EditLog, target: Path) -> int:
    """The active strokes into `target` (written whole); returns how many."""
    rows = log.active()
    with atomic_target(target) as staged:
        staged.unlink()  # GDAL creates the GeoPackage itself
        write_rows(staged, rows, EXPORT_FIELDS, "corrections", log.grid.crs)
    return len(rows)


def _zip_session(folder: Path, target: Path) -> None:
    """Every file of the session but its locks, live token and exports."""
    with atomic_target(target) as staged, zipfile.ZipFile(staged, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if relative.parts[0] in SKIPPED or not path.is_file() or path.is_symlink():
                continue
            z.write(path, Path(folder.name) / relative)


def export_session(log: EditLog, folder: Path) -> Export:
    """Write `<folder>/corrections.gpkg` (+ `.qml`), the corrections raster (+ its style) and
    `<folder>/<session>.zip`; each file whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    with log.locked():  # no stroke lands half in the export
        layer = folder / "corrections.gpkg"
        features = _write_layer(log, layer)
        style = layer.with_suffix(".qml")
        write_text(style, vector_style(log))
        raster = folder / log.raster.name
        for source in (log.raster, log.raster.with_suffix(".qml")):
            if source.exists():
                with atomic_target(folder / source.name) as staged:
                    shutil.copy2(source, staged)
        archive = folder / f"{log.folder.name}.zip"
        _zip_session(log.folder, archive)
    return Export(layer, style, raster, archive, features)
