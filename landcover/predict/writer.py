"""Write class maps that a GIS opens: Cloud Optimized GeoTIFF, colour table, class names.

Rows arrive strip by strip and go into a tiled temporary GeoTIFF beside the output; at the end
it is converted to a COG (tiled, deflate, nearest-neighbour overviews) and renamed into place.
An interrupted run therefore never leaves a partial file at the output path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from landcover.atomic import naming_full_disk, staging_dir, write_text
from landcover.data.schema import IGNORE_INDEX, ClassSchema, hex_to_rgb
from landcover.errors import LandcoverError

NODATA = 255
BLOCK = 512


class OutputError(LandcoverError):
    """The output cannot be written where it was asked for."""


def check_writable(path: Path) -> None:
    """Fail before any work if the output cannot be created (also on read-only mounts, where
    permission bits alone would not tell)."""
    directory = path.parent
    if not directory.exists():
        raise OutputError(f"{path}: output directory {directory} does not exist")
    if not directory.is_dir():
        raise OutputError(f"{path}: {directory} is not a directory")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file name")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OutputError(f"{path}: output directory {directory} is not writable ({err})") from err


def class_codes(schema: ClassSchema) -> np.ndarray:
    """Class index -> the code written to the map (each class's first raw code)."""
    codes = np.full(256, NODATA, dtype=np.uint8)
    for index, info in enumerate(schema.classes):
        codes[index] = info.codes[0] if info.codes else index
    return codes


def class_indices_of_codes(schema: ClassSchema) -> np.ndarray:
    """The inverse of `class_codes`: a written map's code -> class index (IGNORE_INDEX else),
    for reading maps back."""
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for index, info in enumerate(schema.classes):
        if info.codes:
            lookup[info.codes[0]] = index
    return lookup


def colormap(schema: ClassSchema) -> dict[int, tuple[int, int, int, int]]:
    """The schema's colours as a GDAL colour map, so a GIS shows classes in their colours."""
    table = {NODATA: (0, 0, 0, 0)}
    for info in schema.classes:
        if info.codes:
            table[info.codes[0]] = (*hex_to_rgb(info.color), 255)
    return table


def category_names_pam(schema: ClassSchema) -> str:
    """GDAL's PAM sidecar (`<map>.tif.aux.xml`) naming every written code, so QGIS, ArcGIS and
    `gdalinfo` ("Categories:") show class labels. GeoTIFF has no tag for category names; GDAL
    itself keeps them in this file."""
    from xml.sax.saxutils import escape

    names = [""] * 256
    for info in schema.classes:
        if info.codes:
            names[info.codes[0]] = info.name
    names[NODATA] = "no data"
    last = max(i for i, name in enumerate(names) if name)
    categories = "".join(f"      <Category>{escape(n)}</Category>\n" for n in names[: last + 1])
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        "    <CategoryNames>\n"
        f"{categories}"
        "    </CategoryNames>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


@dataclass
class AreaTable:
    """Pixel count, area and share of each class in the mapped (non-nodata) region."""

    names: list[str]
    codes: list[int]
    counts: np.ndarray
    pixel_area_m2: float | None

    def rows(self) -> list[dict]:
        """Per-class pixels, square metres and shares, in class order."""
        total = int(self.counts.sum())
        return [
            {
                "class": name,
                "code": code,
                "pixels": int(count),
                "area_m2": None if self.pixel_area_m2 is None else count * self.pixel_area_m2,
                "area_ha": None if self.pixel_area_m2 is None else count * self.pixel_area_m2 / 1e4,
                "share_percent": 100.0 * count / total if total else 0.0,
            }
            for name, code, count in zip(self.names, self.codes, self.counts, strict=True)
        ]

    def to_csv(self) -> str:
        """The table as CSV (for spreadsheets)."""
        lines = ["class,code,pixels,area_m2,area_ha,share_percent"]
        for row in self.rows():
            area = "" if row["area_m2"] is None else f"{row['area_m2']:.1f}"
            hectares = "" if row["area_ha"] is None else f"{row['area_ha']:.4f}"
            lines.append(
                f"{row['class']},{row['code']},{row['pixels']},{area},{hectares},"
                f"{row['share_percent']:.4f}"
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """The table as JSON (for tools)."""
        return json.dumps({"pixel_area_m2": self.pixel_area_m2, "classes": self.rows()}, indent=2)


class StagedRaster:
    """One output raster written into a private temporary folder and published as a COG.

    Nothing appears at `target` until `publish`; `discard` removes every trace.
    """

    def __init__(
        self,
        target: Path,
        workdir: Path,
        profile: dict,
        *,
        count: int = 1,
        nodata: int | None = None,
        colormap: dict | None = None,
        tags: dict[str, str] | None = None,
        descriptions: list[str] | None = None,
        scale: float | None = None,
    ) -> None:
        self.target = Path(target)
        self.staging = workdir / f"{self.target.stem}.staging.tif"
        options = {"count": count, "dtype": "uint8", **profile}
        if colormap is not None:
            options["photometric"] = "palette"
        else:
            # numbers, not colours: 3 or 4 uint8 bands would otherwise be read as RGB(A), and a
            # GIS would draw the last class's probability as transparency
            options["photometric"] = "minisblack"
        if nodata is not None:
            options["nodata"] = nodata
        self.dataset = rasterio.open(self.staging, "w", **options)
        self.shape = (count, int(profile["height"]), int(profile["width"]))
        if colormap is not None:
            self.dataset.write_colormap(1, colormap)
        if tags:
            self.dataset.update_tags(**tags)
        for band, text in enumerate(descriptions or [], start=1):
            self.dataset.set_band_description(band, text)
        if colormap is None:
            self.dataset.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * (count - 1)
        if scale is not None:  # stored bytes x scale = the value (a probability from 0 to 1)
            self.dataset.scales = [scale] * count
            self.dataset.offsets = [0.0] * count

    def write(self, data: np.ndarray, window: Window) -> None:
        """Write rows into the staging file (nothing is visible at the output path yet)."""
        with naming_full_disk(self.target):
            self.dataset.write(data if data.ndim == 3 else data[None], window=window)

    def stage_cog(self) -> Path:
        """Convert the staging file to a COG beside the output, still under a temporary name."""
        self.dataset.close()
        cog = self.staging.with_suffix(".cog.tif")
        rasterio.shutil.copy(
            self.staging,
            cog,
            driver="COG",
            compress="DEFLATE",
            blocksize=BLOCK,
            overview_resampling="NEAREST",
            bigtiff="IF_SAFER",
            # the model is done by now: compress on every core (about 40 % less time here)
            num_threads="ALL_CPUS",
        )
        return cog

    def discard(self) -> None:
        """Remove the staging files: a failed map leaves nothing half-written."""
        if not self.dataset.closed:
            self.dataset.close()


def verify_raster(path: Path, target: Path, shape: tuple[int, int, int]) -> None:
    """Open `path` and read every block of every band; its bands and size must be `shape`.

    GDAL reports some write failures (a full disk while it writes the TIFF directory) only in
    its log and still closes the file: reading it back is the one sure test. Raises a
    LandcoverError naming `target` (a DiskFullError where the disk is full)."""
    try:
        with rasterio.open(path) as src:
            found = (src.count, src.height, src.width)
            if found != shape:
                raise LandcoverError(
                    f"{target}: written with {found} bands x rows x columns, not {shape}"
                )
            for band in range(1, src.count + 1):
                for _, window in src.block_windows(band):
                    src.read(band, window=window)
    except rasterio.errors.RasterioError as err:
        raise LandcoverError(
            f"{target}: the written raster does not read back ({err}); nothing was published"
        ) from err


def grid_profile(profile: dict) -> dict:
    """The pixel grid of an input (size, CRS, transform) as a tiled GeoTIFF profile."""
    base = {
        "driver": "GTiff",
        "width": profile["width"],
        "height": profile["height"],
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
    }
    if profile.get("crs") is not None:
        base["crs"] = profile["crs"]
    if profile.get("crs") is not None or profile["transform"] != Affine.identity():
        # an input without georeferencing gives an output without one (no identity transform)
        base["transform"] = profile["transform"]
    return base


class OutputSet:
    """Several rasters published together (all or none), e.g. a map and its confidence."""

    def __init__(self, anchor: Path) -> None:
        check_writable(anchor)
        self.workdir = staging_dir(anchor.parent)
        self.rasters: dict[str, StagedRaster] = {}
        self.staged: dict[str, Path] = {}  # name -> its verified file, before the rename

    def add(self, name: str, target: Path, profile: dict, **options) -> StagedRaster:
        """Stage one more output that is published with the others or not at all."""
        check_writable(target)
        self.rasters[name] = StagedRaster(target, self.workdir, grid_profile(profile), **options)
        return self.rasters[name]

    def verify(self) -> None:
        """Write every staged output whole and read it back: the step that needs disk space
        and can fail. A caller that must record something else with the rasters (the studio's
        edit log) does so between this and `publish`, whose renames need none."""
        if self.staged:
            return
        with naming_full_disk(next(iter(self.rasters.values())).target):
            staged = {name: raster.stage_cog() for name, raster in self.rasters.items()}
            for name, path in staged.items():
                verify_raster(path, self.rasters[name].target, self.rasters[name].shape)
        self.staged = staged

    def publish(self) -> dict[str, Path]:
        """Verify every staged output (if not done yet), then rename each into place (each
        rename atomic) and return the paths. A file GDAL could not write whole (a full disk
        reported only in its log) is never published."""
        try:
            self.verify()
            with naming_full_disk(next(iter(self.rasters.values())).target):
                for name, path in self.staged.items():
                    os.replace(path, self.rasters[name].target)
            return {name: raster.target for name, raster in self.rasters.items()}
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def discard(self) -> None:
        """Drop every staged output."""
        for raster in self.rasters.values():
            raster.discard()
        shutil.rmtree(self.workdir, ignore_errors=True)


def pixel_area(transform: Affine) -> float:
    """Ground area of one pixel in the CRS's units squared: the transform's determinant, right
    for rotated grids too. Meaningless without a CRS: callers check that first."""
    return abs(transform.a * transform.e - transform.b * transform.d)


def sibling(path: Path, what: str) -> Path:
    """`<stem>_<suffix>.tif` beside an output (confidence, probabilities)."""
    return path.with_name(f"{path.stem}_{what}{path.suffix}")


class ClassMapWriter:
    """Context manager: `write_rows` strip by strip; leaving it publishes, an exception discards."""

    def __init__(
        self,
        output: Path,
        *,
        profile: dict,
        schema: ClassSchema,
        confidence: bool = False,
        probabilities: bool = False,
    ) -> None:
        self.output = Path(output)
        self.schema = schema
        self.codes = class_codes(schema)
        self.counts = np.zeros(schema.num_classes, dtype=np.int64)
        transform = profile["transform"]
        self.pixel_area = pixel_area(transform) if profile.get("crs") is not None else None
        self.outputs: dict[str, Path] = {}
        self.set = OutputSet(self.output)
        self.set.add(
            "classes",
            self.output,
            profile,
            nodata=NODATA,
            colormap=colormap(schema),
            tags={
                "class_names": json.dumps(schema.names),
                "class_codes": json.dumps([int(self.codes[i]) for i in range(schema.num_classes)]),
            },
            descriptions=["land cover class"],
        )
        if confidence:
            self.set.add(
                "confidence",
                sibling(self.output, "confidence"),
                profile,
                nodata=0,
                descriptions=["confidence: the winning class's probability (bytes / 255)"],
                scale=1 / 255,
            )
        if probabilities:
            self.set.add(
                "probabilities",
                sibling(self.output, "probabilities"),
                profile,
                count=schema.num_classes,
                descriptions=list(schema.names),  # one band per class, named by the class
                tags={"values": "probability of the band's class, bytes / 255"},
                scale=1 / 255,
            )

    def write_rows(
        self,
        row: int,
        classes: np.ndarray,
        confidence: np.ndarray | None = None,
        probabilities: np.ndarray | None = None,
    ) -> None:
        """classes: (rows, width) class indices, IGNORE_INDEX where there is no data."""
        height, width = classes.shape
        window = Window(0, row, width, height)
        valid = classes != IGNORE_INDEX
        self.counts += np.bincount(classes[valid].ravel(), minlength=self.schema.num_classes)[
            : self.schema.num_classes
        ]
        rasters = self.set.rasters
        rasters["classes"].write(self.codes[classes], window)
        if "confidence" in rasters and confidence is not None:
            rasters["confidence"].write(np.where(valid, confidence, 0).astype(np.uint8), window)
        if "probabilities" in rasters and probabilities is not None:
            rasters["probabilities"].write(probabilities * valid, window)

    def area_table(self) -> AreaTable:
        """Area per class of what was written, in the raster's units."""
        return AreaTable(
            self.schema.names,
            [int(self.codes[i]) for i in range(self.schema.num_classes)],
            self.counts.copy(),
            self.pixel_area,
        )

    def __enter__(self) -> ClassMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.outputs = self.set.publish()
            write_text(f"{self.output}.aux.xml", category_names_pam(self.schema))
            from landcover.predict.style import write_style_of

            write_style_of(self.output)  # QGIS opens the map with its classes' colours and names
        else:
            self.set.discard()
