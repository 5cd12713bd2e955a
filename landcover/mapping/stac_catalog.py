"""A mapping job's maps as a STAC Collection: one Item per map (where it lies, its grid, its
classes and colours, the image it was made from, the model that made it), so that a STAC
browser, pystac or a catalog server finds the job's maps the way they find imagery.

Written by the job into `<folder>/stac/` after its maps are verified, from the maps' own files
(their grid, colour table and class names), never from what the job meant to write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pystac
import rasterio
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds, transform_geom

from landcover.atomic import write_text
from landcover.mapping.region import category_names

GEOTIFF = "image/tiff; application=geotiff"


@dataclass(frozen=True)
class MappedRaster:
    """One map of the job and the image it was made from."""

    source: str  # the input as the job was given it (a path, a URL, a STAC item's asset)
    map_path: Path


@dataclass(frozen=True)
class ModelLink:
    """What made the maps: a models:/ or runs:/ reference, and its MLM Item when it has one."""

    reference: str
    item_href: str | None = None


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def _classes(path: Path, colormap: dict[int, tuple[int, ...]] | None) -> list[Classification]:
    """The map's classes as its own files name them (the .aux.xml categories, the colour
    table): code, name, colour."""
    aux = Path(f"{path}.aux.xml")
    names = category_names(aux) if aux.exists() else []
    classes = []
    for code, name in enumerate(names):
        if not name:
            continue
        colour = None
        if colormap and code in colormap:
            colour = "".join(f"{c:02X}" for c in colormap[code][:3])
        classes.append(Classification.create(value=code, name=name, color_hint=colour))
    return classes


def map_item(raster: MappedRaster, folder: Path, when: datetime, model: ModelLink) -> pystac.Item:
    """The Item of one map: footprint in WGS 84 (none for a map without a CRS), projection,
    raster band, classification, `derived_from` its input and a link to the model."""
    with rasterio.open(raster.map_path) as src:
        crs, bounds, transform = src.crs, src.bounds, src.transform
        shape, dtype, nodata = [src.height, src.width], src.dtypes[0], src.nodata
        try:
            colormap = src.colormap(1)
        except ValueError:  # no colour table
            colormap = None
    geometry = bbox = None
    if crs is not None:
        footprint = {
            "type": "Polygon",
            "coordinates": [[
                [bounds.left, bounds.bottom], [bounds.right, bounds.bottom],
                [bounds.right, bounds.top], [bounds.left, bounds.top],
                [bounds.left, bounds.bottom],
            ]],
        }  # fmt: skip
        geometry = transform_geom(crs, "EPSG:4326", footprint)
        bbox = list(transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21))
    item = pystac.Item(
        id=raster.map_path.stem,
        geometry=geometry,
        bbox=bbox,
        datetime=when,
        properties={"landcover:model": model.reference},
    )
    asset = pystac.Asset(
        href=_relative(raster.map_path, folder),
        media_type=GEOTIFF,
        roles=["data"],
        title=f"land cover of {Path(raster.source).name}",
    )
    item.add_asset("map", asset)
    projection = ProjectionExtension.ext(item, add_if_missing=True)
    projection.apply(
        epsg=crs.to_epsg() if crs is not None else None,
        wkt2=None if crs is None or crs.to_epsg() else crs.to_wkt(),
        shape=shape,
        transform=list(transform)[:6],
        bbox=list(bounds) if crs is not None else None,
    )
    RasterExtension.ext(asset, add_if_missing=True).apply(
        [
            RasterBand.create(
                data_type=DataType(dtype), nodata=nodata, spatial_resolution=transform.a
            )
        ]
    )
    ClassificationExtension.ext(asset, add_if_missing=True).apply(
        classes=_classes(raster.map_path, colormap)
    )
    source = raster.source
    href = source if "://" in source else Path(source).resolve().as_posix()
    item.add_link(pystac.Link("derived_from", href, title="the image it was mapped from"))
    title = "the model's MLM Item" if model.item_href else "the model that made it"
    item.add_link(pystac.Link("via", model.item_href or model.reference, title=title))
    return item


def write_collection(
    folder: Path,
    rasters: Sequence[MappedRaster],
    model: ModelLink,
    when: datetime | None = None,
    title: str = "",
) -> Path:
    """`<folder>/collection.json` and one Item per map beside it, every href relative, each
    file written whole. Returns the Collection's path."""
    folder.mkdir(parents=True, exist_ok=True)
    when = when or datetime.now(UTC)
    items = [map_item(raster, folder, when, model) for raster in rasters]
    boxes = [item.bbox for item in items if item.bbox]
    spatial = (
        [min(b[0] for b in boxes), min(b[1] for b in boxes),
         max(b[2] for b in boxes), max(b[3] for b in boxes)]
        if boxes else [-180.0, -90.0, 180.0, 90.0]
    )  # fmt: skip
    collection = pystac.Collection(
        id=folder.parent.name or "maps",
        description=title or f"land cover maps made by {model.reference}",
        extent=pystac.Extent(
            pystac.SpatialExtent([spatial]), pystac.TemporalExtent([[when, when]])
        ),
        license="other",
        title=title or None,
    )
    collection.add_link(pystac.Link("via", model.item_href or model.reference, title="the model"))
    for item in items:
        collection.add_link(pystac.Link("item", f"./{item.id}.json", pystac.MediaType.GEOJSON))
        document = item.to_dict(include_self_link=False)
        document["collection"] = collection.id
        document["links"].append({"rel": "collection", "href": "./collection.json"})
        document["links"].append({"rel": "parent", "href": "./collection.json"})
        write_text(folder / f"{item.id}.json", json.dumps(document, indent=2))
    target = folder / "collection.json"
    write_text(target, json.dumps(collection.to_dict(include_self_link=False), indent=2))
    return target
