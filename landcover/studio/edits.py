"""Corrections as an append-only log and the label raster it implies.

Every stroke a person makes is one or more rows appended to a GeoPackage (`edits.gpkg`, layer
`edits`: geometry on the image's grid, time, author, class, kind); an undo is one more row naming
the stroke it takes back. Nothing is ever rewritten in place, so two browser tabs (or two
people) editing the same scene only add rows, under one lock. The label raster
(`<image>_corrections.tif`: the class's label code where corrected, the schema's no-data code
elsewhere) is derived from the log: each change writes and verifies the new raster first (a full
disk fails there, before the log takes the row), then appends to the log, then renames the
raster into place; if a process dies between the last two, the next start sees the raster's
recorded row count disagree and replays the log. A browser that crashes loses at most the stroke
it had not sent.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape

from landcover.atomic import naming_full_disk
from landcover.data.schema import ClassSchema, hex_to_rgb
from landcover.studio.strokes import Area, EditError, area_of

if TYPE_CHECKING:
    from landcover.predict.writer import OutputSet

LAYER = "edits"
FIELDS = ["stroke", "time", "author", "tab", "kind", "class_name", "class_code", "undoes"]


@dataclass(frozen=True)
class Grid:
    """The image's pixel grid: corrections are drawn and stored on it."""

    width: int
    height: int
    transform: Affine
    crs: Any  # rasterio CRS or None (the real sample patches carry none)

    @classmethod
    def of(cls, path: str | Path) -> Grid:
        """The grid of a raster file."""
        with rasterio.open(path) as src:
            return cls(src.width, src.height, src.transform, src.crs)

    def to_map(self, geometry: shapely.Geometry) -> shapely.Geometry:
        """Pixel (col, row) coordinates -> the raster's own coordinates (its CRS, if any)."""
        t = self.transform
        return shapely.affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])


def nodata_code(schema: ClassSchema) -> int:
    """The label code meaning "not corrected": the schema's first ignored code."""
    if schema.ignore_codes:
        return int(schema.ignore_codes[0])
    for info in schema.classes:
        if info.ignore and info.codes:
            return int(info.codes[0])
    if 255 not in schema.known_codes:
        return 255
    raise EditError(f"class schema {schema.name!r} has no code left for 'not corrected'")


@dataclass(frozen=True)
class Row:
    """One row of the log."""

    stroke: str
    time: str
    author: str
    tab: str
    kind: str
    class_name: str
    class_code: int
    undoes: str
    geometry: bytes | None  # WKB in the raster's coordinates; None for an undo


class EditLog:
    """The corrections of one scene: a GeoPackage log and its label raster, kept in step."""

    def __init__(
        self, folder: Path, image: Path, schema: ClassSchema, base_labels: Path | None = None
    ) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.grid = Grid.of(image)
        self.schema = schema
        self.nodata = nodata_code(schema)
        self.gpkg = folder / "edits.gpkg"
        self.raster = folder / f"{image.stem}_corrections.tif"
        self.base_labels = base_labels
        self.mixed = folder / f"{image.stem}_mixed.tif"
        if base_labels is not None:
            _check_same_grid(base_labels, image, self.grid)
        self._thread_lock = threading.Lock()
        with self.locked():
            self._roll_back_journal()
            rows = self.rows()
            stale = self._raster_rows() != len(rows)
            if stale or not self.raster.exists() or (base_labels and not self.mixed.exists()):
                self._commit([], self._replayed(rows), len(rows))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time, threads of this server and other processes alike (an flock
        the kernel releases when a process dies)."""
        with self._thread_lock, open(self.folder / ".edits.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _roll_back_journal(self) -> None:
        """A process killed while appending leaves `edits.gpkg-journal` (a hot journal).
        SQLite rolls it back on the next open that may write; the log's reader opens the file
        read-only, which cannot, so the studio would never open again ("attempt to write a
        readonly database"). Opened here once for writing, the half-written append goes and
        every acknowledged row stays."""
        journal = self.gpkg.with_name(self.gpkg.name + "-journal")
        if not (self.gpkg.is_file() and journal.exists()):
            return
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.gpkg, timeout=30)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()

    # -- reading -------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Every row of the log, in the order written."""
        if not self.gpkg.exists():
            return []
        from pyogrio.raw import read

        meta, _fids, geometry, values = read(self.gpkg, layer=LAYER)
        columns = dict(zip(meta["fields"], values, strict=True))
        return [
            Row(
                **{name: _plain(columns[name][i]) for name in FIELDS},
                geometry=None if columns["kind"][i] == "undo" else geometry[i],
            )
            for i in range(len(geometry))
        ]

    def active(self, rows: list[Row] | None = None) -> list[Row]:
        """The drawing rows not taken back by an undo, oldest first."""
        rows = self.rows() if rows is None else rows
        undone = {row.undoes for row in rows if row.kind == "undo"}
        return [row for row in rows if row.kind != "undo" and row.stroke not in undone]

    def labels(self) -> np.ndarray:
        """The label raster's codes (the no-data code where uncorrected)."""
        if not self.raster.exists():
            return np.full((self.grid.height, self.grid.width), self.nodata, np.uint8)
        with rasterio.open(self.raster) as src:
            return src.read(1)

    def digest(self) -> str:
        """A hash over the active edits (geometry, class, order): the corrections dataset's
        digest, the same whoever made them and whenever."""
        import hashlib

        h = hashlib.sha256()
        for row in self.active():
            h.update(row.stroke.encode() + b"|" + str(row.class_code).encode() + b"|")
            h.update(row.geometry or b"")
        return h.hexdigest()[:16]

    # -- writing -------------------------------------------------------------------------
    def area(self, geometry_px: Area | shapely.Geometry) -> Area:
        """The pixels a geometry in pixel coordinates covers (an Area is taken as it is)."""
        if isinstance(geometry_px, Area):
            return geometry_px
        return area_of(geometry_px, self.grid.width, self.grid.height)

    def add(
        self,
        geometry_px: Area | shapely.Geometry,
        class_index: int | None,
        *,
        author: str,
        tab: str,
        kind: str = "paint",
    ) -> tuple[str, int]:
        """Append one stroke of one class; returns its id and the pixels it covers. What is
        logged is the outline of the covered pixels (replayed, it gives them back exactly)."""
        info = self._class(class_index)
        area = self.area(geometry_px)
        if not area.pixels:
            raise EditError("the stroke covers no pixel of the image")
        geometry = self.grid.to_map(area.outline)
        stroke = uuid.uuid4().hex[:12]
        row = Row(stroke, _now(), author, tab, kind, info.name, info.codes[0], "", geometry.wkb)
        with self.locked():
            labels = self.labels()
            labels[area.full(self.grid.height, self.grid.width)] = info.codes[0]
            self._commit([row], labels, len(self.rows()) + 1)
        return stroke, area.pixels

    def accept(
        self,
        geometry_px: Area | shapely.Geometry,
        classes: np.ndarray,
        *,
        author: str,
        tab: str,
    ) -> tuple[str, int]:
        """Take the map's own class for every pixel in a region: one row per class present,
        all under one stroke id (one undo takes the region back)."""
        area = self.area(geometry_px)
        stroke = uuid.uuid4().hex[:12]
        with self.locked():
            if not area.pixels:
                raise EditError("the region covers no pixel of the image")
            mask = area.full(self.grid.height, self.grid.width)
            rows = []
            for index in np.unique(classes[mask]):
                info = self._class(int(index))
                if info.ignore:
                    continue
                parts = [
                    shape(geom)
                    for geom, _ in shapes(
                        np.ones_like(classes, np.uint8),
                        mask=mask & (classes == index),
                        transform=self.grid.transform,
                    )
                ]
                merged = shapely.union_all(parts)
                rows.append(
                    Row(
                        stroke,
                        _now(),
                        author,
                        tab,
                        "accept",
                        info.name,
                        info.codes[0],
                        "",
                        merged.wkb,
                    )
                )
            if not rows:
                raise EditError("the region holds only classes that are never a training target")
            logged = self.rows() + rows
            self._commit(rows, self._replayed(logged), len(logged))
        return stroke, int(mask.sum())

    def undo(self, *, author: str, tab: str) -> str | None:
        """Take back this tab's latest stroke still in force (other tabs' strokes are theirs
        to undo); None when there is none."""
        with self.locked():
            rows = self.rows()
            mine = [r.stroke for r in self.active(rows) if r.tab == tab]
            if not mine:
                return None
            stroke = mine[-1]
            logged = [
                *rows,
                Row(uuid.uuid4().hex[:12], _now(), author, tab, "undo", "", -1, stroke, None),
            ]
            self._commit(logged[-1:], self._replayed(logged), len(logged))
        return stroke

    # -- internals -----------------------------------------------------------------------
    def _class(self, class_index: int | None) -> Any:
        if class_index is None:
            raise EditError("pick a class to paint (keys 1-9) before drawing")
        if not 0 <= class_index < self.schema.num_classes:
            raise EditError(
                f"class {class_index} is not one of the model's {self.schema.num_classes}"
            )
        info = self.schema.classes[class_index]
        if info.ignore or not info.codes:
            raise EditError(f"class {info.name!r} is never a training target: paint another")
        return info

    def _mask(self, geometry: shapely.Geometry) -> np.ndarray:
        """A logged geometry (the raster's coordinates) as pixels, burnt within its bounds."""
        pixels = shapely.affinity.affine_transform(geometry, _to_pixels(self.grid.transform))
        return area_of(pixels, self.grid.width, self.grid.height).full(
            self.grid.height, self.grid.width
        )

    def _append(self, rows: list[Row]) -> None:
        write_rows(self.gpkg, rows, FIELDS, LAYER, self.grid.crs, append=self.gpkg.exists())

    def _replayed(self, rows: list[Row]) -> np.ndarray:
        """The label raster's codes that `rows` (a whole log) draw."""
        labels = np.full((self.grid.height, self.grid.width), self.nodata, np.uint8)
        for row in self.active(rows):
            if row.geometry is not None:
                labels[self._mask(shapely.from_wkb(row.geometry))] = row.class_code
        return labels

    def _raster_rows(self) -> int:
        if not self.raster.exists():
            return 0
        with rasterio.open(self.raster) as src:
            return int(src.tags().get("landcover_edit_rows", -1))

    def _commit(self, new_rows: list[Row], labels: np.ndarray, rows: int) -> None:
        """Append `new_rows` to the log and publish the rasters they give, so that a stroke the
        page is told failed is in neither: the rasters are written and verified first (where a
        full disk fails, nothing is logged), then the log takes the rows, then the renames,
        which need no space. Only a crash between the last two leaves the log ahead of the
        rasters, and opening the log replays it (`landcover_edit_rows` says how far the
        rasters reach)."""
        outputs = self._stage(labels, rows)
        try:
            outputs.verify()
            if new_rows:
                with naming_full_disk(self.gpkg):
                    self._append(new_rows)
            outputs.publish()
        except BaseException:
            outputs.discard()
            raise

    def _stage(self, labels: np.ndarray, rows: int) -> OutputSet:
        """The corrections raster (and, with original labels, the mixed one) staged the way
        maps are: COGs published together, or nothing; `landcover_edit_rows` records how many
        log rows they reflect."""
        from rasterio.windows import Window

        from landcover.predict.writer import OutputSet

        rasters = {"corrections": (self.raster, labels)}
        if self.base_labels is not None:
            with rasterio.open(self.base_labels) as src:
                base = src.read(1)
            rasters["mixed"] = (self.mixed, np.where(labels == self.nodata, base, labels))
        profile = {
            "width": self.grid.width,
            "height": self.grid.height,
            "crs": self.grid.crs,
            "transform": self.grid.transform,
        }
        tags = {"landcover_edit_rows": str(rows), "landcover_schema": self.schema.name}
        outputs = OutputSet(self.raster)
        try:
            for name, (target, codes) in rasters.items():
                staged = outputs.add(
                    name, target, profile, nodata=self.nodata, colormap=self.colormap(), tags=tags
                )
                staged.write(codes, Window(0, 0, self.grid.width, self.grid.height))
        except BaseException:
            outputs.discard()
            raise
        return outputs

    def label_at(self, row: int, col: int) -> int:
        """The label raster's code at one pixel (read alone, not the whole raster)."""
        from rasterio.windows import Window

        if not self.raster.exists():
            return self.nodata
        with rasterio.open(self.raster) as src:
            return int(src.read(1, window=Window(col, row, 1, 1))[0, 0])

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """Each class's label codes in its colour, no-data transparent (for a GIS)."""
        colours = {
            code: (*hex_to_rgb(info.color), 255)
            for info in self.schema.classes
            for code in info.codes
        }
        colours[self.nodata] = (0, 0, 0, 0)
        return colours


def write_rows(
    target: Path,
    rows: list[Row],
    fields: list[str] | tuple[str, ...],
    layer: str,
    crs: Any,
    append: bool = False,
) -> None:
    """`rows` (their `fields`, an undo's geometry empty) into a GeoPackage layer in `crs`
    (None for a scene without one: the real sample patches have none, on purpose)."""
    from pyogrio.raw import write

    empty = shapely.Point().wkb
    geometry = np.array([r.geometry or empty for r in rows], dtype=object)
    field_data = [
        np.array(
            [getattr(r, name) for r in rows], dtype=object if name != "class_code" else np.int32
        )
        for name in fields
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        write(
            target, geometry, field_data, list(fields), layer=layer, driver="GPKG",
            geometry_type="Unknown", crs=crs.to_wkt() if crs else None, append=append,
        )  # fmt: skip


def _check_same_grid(labels: Path, image: Path, grid: Grid) -> None:
    """The original labels must lie on the image's pixel grid to be mixed with corrections."""
    try:
        other = Grid.of(labels)
    except rasterio.errors.RasterioIOError as err:
        raise EditError(f"{labels}: cannot be read as a raster ({err})") from err
    if (other.width, other.height) != (grid.width, grid.height) or (
        other.crs != grid.crs or not other.transform.almost_equals(grid.transform)
    ):
        raise EditError(
            f"{labels}: not on the grid of {image} ({other.width} x {other.height}, "
            f"{other.crs}) vs ({grid.width} x {grid.height}, {grid.crs})"
        )


def _to_pixels(transform: Affine) -> list[float]:
    """shapely's affine parameters of the raster's coordinates -> pixel (col, row)."""
    t = ~transform
    return [t.a, t.b, t.d, t.e, t.c, t.f]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
