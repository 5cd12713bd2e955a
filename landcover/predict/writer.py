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
from rasterio.windows import Window

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


def colormap(schema: ClassSchema) -> dict[int, tuple[int, int, int, int]]:
    table = {NODATA: (0, 0, 0, 0)}
    for info in schema.classes:
        if info.codes:
            table[info.codes[0]] = (*hex_to_rgb(info.color), 255)
    return table


@dataclass
class AreaTable:
    """Pixel count, area and share of each class in the mapped (non-nodata) region."""

    names: list[str]
    codes: list[int]
    counts: np.ndarray
    pixel_area_m2: float | None

    def rows(self) -> list[dict]:
        total = int(self.counts.sum())
        return [
            {
                "class": name,
                "code": code,
                "pixels": int(count),
                "area_m2": None if self.pixel_area_m2 is None else count * self.pixel_area_m2,
                "share_percent": 100.0 * count / total if total else 0.0,
            }
            for name, code, count in zip(self.names, self.codes, self.counts, strict=True)
        ]

    def to_csv(self) -> str:
        lines = ["class,code,pixels,area_m2,share_percent"]
        for row in self.rows():
            area = "" if row["area_m2"] is None else f"{row['area_m2']:.1f}"
            lines.append(
                f"{row['class']},{row['code']},{row['pixels']},{area},{row['share_percent']:.4f}"
            )
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"pixel_area_m2": self.pixel_area_m2, "classes": self.rows()}, indent=2)


class ClassMapWriter:
    """Context manager: `write_rows` strip by strip, `close` publishes, an exception discards."""

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
        check_writable(self.output)
        self.schema = schema
        self.codes = class_codes(schema)
        self.counts = np.zeros(schema.num_classes, dtype=np.int64)
        self.workdir = Path(tempfile.mkdtemp(prefix=".landcover-", dir=self.output.parent))
        base = {
            "driver": "GTiff",
            "width": profile["width"],
            "height": profile["height"],
            "crs": profile.get("crs"),
            "transform": profile["transform"],
            "tiled": True,
            "blockxsize": BLOCK,
            "blockysize": BLOCK,
            "dtype": "uint8",
        }
        if base["crs"] is None:
            base.pop("crs")
        self.has_crs = profile.get("crs") is not None
        transform = profile["transform"]
        self.pixel_area = (
            abs(transform.a * transform.e - transform.b * transform.d) if self.has_crs else None
        )
        self.datasets: dict[str, rasterio.io.DatasetWriter] = {}
        self.targets: dict[str, Path] = {"classes": self.output}
        self.datasets["classes"] = rasterio.open(
            self.workdir / "classes.tif", "w", count=1, nodata=NODATA, photometric="palette", **base
        )
        self.datasets["classes"].write_colormap(1, colormap(schema))
        self.datasets["classes"].update_tags(
            class_names=json.dumps(schema.names),
            class_codes=json.dumps([int(self.codes[i]) for i in range(schema.num_classes)]),
        )
        self.datasets["classes"].set_band_description(1, "land cover class")
        if confidence:
            self.targets["confidence"] = self.sibling("confidence")
            self.datasets["confidence"] = rasterio.open(
                self.workdir / "confidence.tif", "w", count=1, nodata=0, **base
            )
            self.datasets["confidence"].set_band_description(1, "max class probability x 255")
        if probabilities:
            self.targets["probabilities"] = self.sibling("probabilities")
            self.datasets["probabilities"] = rasterio.open(
                self.workdir / "probabilities.tif", "w", count=schema.num_classes, **base
            )
            for band, name in enumerate(schema.names, start=1):
                self.datasets["probabilities"].set_band_description(band, f"P({name}) x 255")

    def sibling(self, what: str) -> Path:
        return self.output.with_name(f"{self.output.stem}_{what}{self.output.suffix}")

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
        self.datasets["classes"].write(self.codes[classes], 1, window=window)
        if "confidence" in self.datasets and confidence is not None:
            self.datasets["confidence"].write(np.where(valid, confidence, 0), 1, window=window)
        if "probabilities" in self.datasets and probabilities is not None:
            self.datasets["probabilities"].write(probabilities * valid, window=window)

    def area_table(self) -> AreaTable:
        return AreaTable(
            self.schema.names,
            [int(self.codes[i]) for i in range(self.schema.num_classes)],
            self.counts.copy(),
            self.pixel_area,
        )

    def close(self) -> dict[str, Path]:
        """Convert each temporary raster to a COG and move all of them into place."""
        try:
            staged = {}
            for name, dataset in self.datasets.items():
                dataset.close()
                staged[name] = self.workdir / f"{name}.cog.tif"
                rasterio.shutil.copy(
                    dataset.name,
                    staged[name],
                    driver="COG",
                    compress="DEFLATE",
                    blocksize=BLOCK,
                    overview_resampling="NEAREST",
                    bigtiff="IF_SAFER",
                )
            for name, path in staged.items():
                os.replace(path, self.targets[name])
            return dict(self.targets)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def abort(self) -> None:
        for dataset in self.datasets.values():
            if not dataset.closed:
                dataset.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ClassMapWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.outputs = self.close()
        else:
            self.abort()
