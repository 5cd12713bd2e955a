"""Class polygons of a written map as a GeoPackage (`predict.vectorize=true`).

GIS users who want polygons of each class with their area (to join, clip, count, edit) get
them beside the map: `<map>.gpkg`, layer `classes`, one polygon per connected region of a
class (8-connected pixels are one region for GDAL's polygonize only when they share an edge:
4-connectivity, as rasterio's default), with `code`, `class`, `area_m2` and `area_ha`, in the
map's CRS. The map is read in strips (`rows` at a time), so memory follows the map's width,
not its area: a region that crosses a strip boundary becomes one polygon per strip (their
areas still add up to the raster's). `predict.vectorize_min_area` drops smaller polygons;
`predict.vectorize_simplify` simplifies edges (Douglas-Peucker, in map units; areas then
change a little). Built on GDAL's polygonize (rasterio.features.shapes), shapely and pyogrio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
from rasterio.features import shapes
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from landcover.atomic import atomic_target
from landcover.errors import LandcoverError

LAYER = "classes"
ROWS = 1024


def polygons_path(class_map: Path) -> Path:
    """Where a map's polygons go."""
    return class_map.with_suffix(".gpkg")


def vectorize_map(
    class_map: Path,
    *,
    min_area: float = 0.0,
    simplify: float = 0.0,
    nodata: int = 255,
    rows: int = ROWS,
) -> Path:
    """Write `<map>.gpkg` from a published class map; returns its path."""
    try:
        import pyogrio
        import shapely
    except ImportError as err:
        raise LandcoverError(
            "predict.vectorize=true needs pyogrio and shapely: pip install 'landcover[vector]'"
        ) from err
    target = polygons_path(class_map)
    with rasterio.open(class_map) as src:
        if src.crs is None:
            raise LandcoverError(f"{class_map}: no CRS, so its polygons would have no place")
        tags = src.tags()
        names = dict(
            zip(json.loads(tags["class_codes"]), json.loads(tags["class_names"]), strict=True)
        )
        crs = src.crs.to_wkt()
        with atomic_target(target) as staged:
            staged.unlink()  # pyogrio creates the GeoPackage itself
            written = False
            for top in range(0, src.height, rows):
                window = Window(0, top, src.width, min(rows, src.height - top))
                data = src.read(1, window=window)
                found = shapes(
                    data, mask=data != nodata, transform=window_transform(window, src.transform)
                )
                geometries, values = [], []
                for geometry, value in found:
                    polygon = shapely.geometry.shape(geometry)
                    if simplify > 0:
                        polygon = polygon.simplify(simplify, preserve_topology=True)
                    if polygon.is_empty or polygon.area < min_area:
                        continue
                    geometries.append(polygon)
                    values.append(int(value))
                if not geometries and written:
                    continue
                areas = np.array([g.area for g in geometries], dtype=np.float64)
                pyogrio.raw.write(
                    str(staged),
                    geometry=shapely.to_wkb(np.array(geometries, dtype=object)),
                    field_data=[
                        np.array(values, dtype=np.int32),
                        np.array([names.get(c, str(c)) for c in values], dtype=object),
                        areas,
                        areas / 1e4,
                    ],
                    fields=["code", "class", "area_m2", "area_ha"],
                    layer=LAYER,
                    driver="GPKG",
                    geometry_type="Polygon",
                    crs=crs,
                    append=written,
                )
                written = True
    return target
