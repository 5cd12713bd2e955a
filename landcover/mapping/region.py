"""What a whole job adds up to: a mosaic per CRS, area totals per CRS, a quicklook.

The mosaic is a GDAL VRT over the job's maps (no pixels copied): QGIS or `gdal_translate`
open the region as one raster, with the maps' colours and class names. Maps in different CRSs
get one mosaic each; maps without a CRS cannot be placed and are left out of mosaics. A VRT
only points at the maps, so what travels (the job's MLflow run) is an overview instead: the
region downsampled to a COG of its own, with its colours, class names and QGIS style.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from matplotlib.figure import Figure

from landcover.atomic import atomic_target, naming_full_disk, write_text
from landcover.predict.style import write_style_of
from landcover.predict.writer import NODATA


def _crs_label(crs: str, index: int, count: int) -> str:
    if count == 1:
        return ""
    code = crs.split(":")[-1] if crs.upper().startswith("EPSG:") else str(index)
    return f"_{code}"


def by_crs(maps: Sequence[Path]) -> dict[str, list[Path]]:
    """Maps grouped by CRS (maps without one are dropped: they have no place on the ground)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in maps:
        with rasterio.open(path) as src:
            if src.crs is not None:
                groups[src.crs.to_string()].append(path)
    return dict(groups)


def write_mosaics(folder: Path, groups: dict[str, list[Path]]) -> dict[str, Path]:
    """`mosaic.vrt` (or `mosaic_<epsg>.vrt` per CRS) over the maps grouped `by_crs`; CRS -> VRT
    path."""
    written = {}
    for index, (crs, paths) in enumerate(sorted(groups.items())):
        target = folder / f"mosaic{_crs_label(crs, index, len(groups))}.vrt"
        write_text(target, mosaic_vrt(paths, target.parent))
        write_style_of(paths[0], target)  # the maps' style, for the mosaic too
        written[crs] = target
    return written


def mosaic_vrt(paths: Sequence[Path], relative_to: Path) -> str:
    """A VRT placing every map on one grid (the first map's pixel size, the union of bounds)."""
    with rasterio.open(paths[0]) as first:
        res_x, res_y = first.res
        wkt = first.crs.to_wkt()
        colors = first.colormap(1)
    sources, lefts, tops, rights, bottoms = [], [], [], [], []
    for path in paths:
        with rasterio.open(path) as src:
            left, bottom, right, top = src.bounds
            sources.append((path, src.width, src.height, left, top, src.res))
            lefts.append(left)
            rights.append(right)
            tops.append(top)
            bottoms.append(bottom)
    min_x, max_y = min(lefts), max(tops)
    width = math.ceil(round((max(rights) - min_x) / res_x, 6))
    height = math.ceil(round((max_y - min(bottoms)) / res_y, 6))
    entries = "".join(
        f'      <Entry c1="{r}" c2="{g}" c3="{b}" c4="{a}"/>\n'
        for _, (r, g, b, a) in sorted(colors.items())
    )
    sidecar = Path(f"{paths[0]}.aux.xml")  # the map's class names, as the writer put them
    names = category_names(sidecar) if sidecar.is_file() else []
    categories = "".join(f"      <Category>{escape(n)}</Category>\n" for n in names)
    blocks = []
    for path, w, h, left, top, (sx, sy) in sources:
        x_off = round((left - min_x) / res_x, 6)
        y_off = round((max_y - top) / res_y, 6)
        blocks.append(
            "    <ComplexSource>\n"
            f'      <SourceFilename relativeToVRT="1">{escape(_relative(path, relative_to))}'
            "</SourceFilename>\n"
            "      <SourceBand>1</SourceBand>\n"
            f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>\n'
            f'      <DstRect xOff="{x_off}" yOff="{y_off}" xSize="{w * sx / res_x}" '
            f'ySize="{h * sy / res_y}"/>\n'
            f"      <NODATA>{NODATA}</NODATA>\n"
            "    </ComplexSource>\n"
        )
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f"  <SRS>{escape(wkt)}</SRS>\n"
        f"  <GeoTransform>{min_x!r}, {res_x!r}, 0.0, {max_y!r}, 0.0, {-res_y!r}</GeoTransform>\n"
        '  <VRTRasterBand dataType="Byte" band="1">\n'
        f"    <NoDataValue>{NODATA}</NoDataValue>\n"
        "    <ColorInterp>Palette</ColorInterp>\n"
        f"    <ColorTable>\n{entries}    </ColorTable>\n"
        + (f"    <CategoryNames>\n{categories}    </CategoryNames>\n" if names else "")
        + "".join(blocks)
        + "  </VRTRasterBand>\n</VRTDataset>\n"
    )


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())


def category_names(xml_file: Path) -> list[str]:
    """The `<Category>` names of a GDAL XML file (a map's .aux.xml, or a VRT), by code."""
    import xml.etree.ElementTree as ElementTree

    return [c.text or "" for c in ElementTree.parse(xml_file).iter("Category")]


def area_totals(rows: Sequence[tuple[str, str]]) -> dict[str, list[dict]]:
    """Per-class pixels and area summed over the job's maps, per CRS.

    `rows`: (CRS, the map's area table JSON). Maps without a CRS are summed under "none"
    (pixels only: their area is unknown).
    """
    totals: dict[str, dict[tuple[str, int], list[float]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0.0])
    )
    for crs, text in rows:
        for entry in json.loads(text)["classes"]:
            summed = totals[crs or "none"][(entry["class"], entry["code"])]
            summed[0] += entry["pixels"]
            summed[1] += entry["area_m2"] or 0
    result = {}
    for crs, classes in totals.items():
        grand = sum(p for p, _ in classes.values()) or 1
        result[crs] = [
            {
                "class": name,
                "code": code,
                "pixels": int(pixels),
                "area_m2": None if crs == "none" else area,
                "area_ha": None if crs == "none" else area / 1e4,
                "share_percent": 100.0 * pixels / grand,
            }
            for (name, code), (pixels, area) in classes.items()
        ]
    return result


def totals_csv(totals: dict[str, list[dict]]) -> str:
    """Area totals as one CSV, a block of rows per CRS."""
    lines = ["crs,class,code,pixels,area_m2,area_ha,share_percent"]
    for crs, rows in totals.items():
        for row in rows:
            area = "" if row["area_m2"] is None else f"{row['area_m2']:.1f}"
            hectares = "" if row["area_ha"] is None else f"{row['area_ha']:.4f}"
            lines.append(
                f"{crs},{row['class']},{row['code']},{row['pixels']},{area},{hectares},"
                f"{row['share_percent']:.4f}"
            )
    return "\n".join(lines) + "\n"


def mosaic_quicklook(mosaic: Path, size: int, title: str) -> Figure:
    """A small picture of the whole region, in the maps' colours, with class names, at its
    ground shape and with a scale bar where the CRS is in metres."""
    from landcover.tracking.figures import quicklook_figure

    with rasterio.open(mosaic) as src:
        scale = max(src.width, src.height) / size
        shape = (max(1, int(src.height / max(scale, 1))), max(1, int(src.width / max(scale, 1))))
        codes = src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
        colors = src.colormap(1)
        left, bottom, right, top = src.bounds
        metres = bool(src.crs and src.crs.is_projected and is_metres(src.crs.linear_units))
    names = dict(enumerate(category_names(mosaic)))
    names = {code: name for code, name in names.items() if name and code != NODATA}
    return quicklook_figure(
        np.asarray(codes, dtype=np.uint8),
        colors,
        names,
        title,
        extent=(left, right, bottom, top),
        metres=metres,
    )


def is_metres(units: str | None) -> bool:
    """Whether a CRS's linear units are metres (GDAL spells them several ways)."""
    return (units or "").lower() in ("metre", "meter", "metres", "meters", "m")


def write_overview(mosaic: Path, first_map: Path, max_size: int) -> Path:
    """`<mosaic>_overview.tif`: the region at most `max_size` pixels on its longer side, as a
    COG that opens on its own (colour table, class names, QML beside it), each pixel the most
    frequent class under it (GDAL's mode: classes are not averaged)."""
    from affine import Affine

    target = mosaic.with_name(f"{mosaic.stem}_overview.tif")
    with rasterio.open(mosaic) as src:
        step = max(1, math.ceil(max(src.width, src.height) / max_size))
        shape = (max(1, src.height // step), max(1, src.width // step))
        codes = src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.mode)
        transform = src.transform * Affine.scale(src.width / shape[1], src.height / shape[0])
        profile = {
            "driver": "GTiff",
            "width": shape[1],
            "height": shape[0],
            "count": 1,
            "dtype": "uint8",
            "crs": src.crs,
            "transform": transform,
            "nodata": NODATA,
            "photometric": "palette",
        }
        colors = src.colormap(1)
    with rasterio.open(first_map) as model_map:
        tags = {k: v for k, v in model_map.tags().items() if k.startswith("class_")}
    with naming_full_disk(target), atomic_target(target) as staged:
        plain = Path(f"{staged}.plain.tif")
        try:
            with rasterio.open(plain, "w", **profile) as dst:
                dst.write_colormap(1, colors)  # before the pixels: GDAL fixes the palette then
                dst.update_tags(**tags, source=mosaic.name, downsampled_by=str(step))
                dst.write(codes, 1)
            rasterio.shutil.copy(
                plain, staged, driver="COG", compress="DEFLATE", overview_resampling="MODE"
            )
        finally:
            plain.unlink(missing_ok=True)
    sidecar = Path(f"{first_map}.aux.xml")  # the class names, as the writer put them
    if sidecar.is_file():
        with atomic_target(Path(f"{target}.aux.xml")) as staged:
            shutil.copyfile(sidecar, staged)
    write_style_of(first_map, target)
    return target
