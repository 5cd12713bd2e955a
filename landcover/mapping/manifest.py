"""The job manifest: one row per input, rewritten whole after every input finishes.

It is what makes a job resumable (a re-run skips rows that are done and whose map is still
there and readable, and retries failed ones) and what a person reads to see which tiles
failed and why. A SIGKILL loses at most the inputs in flight: their rows still say `pending`
or `failed`, and their maps were never published.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from landcover.atomic import write_text
from landcover.errors import LandcoverError
from landcover.locks import hold_folder

MANIFEST = "manifest.csv"
DONE, FAILED, PENDING = "done", "failed", "pending"


@dataclass
class Row:
    """One input's state; numbers are empty until it is mapped."""

    input: str
    output: str
    status: str = PENDING
    attempts: int = 0
    pixels: int = 0
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    crs: str = ""
    error: str = ""
    warning: str = ""
    node: str = ""  # the Ray node that mapped it (empty on the local engine)
    bytes: int = 0  # the published map's size and CRC-32, checked before a re-run skips it
    checksum: str = ""


class Manifest:
    """Rows keyed by input, kept in the job's output folder."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self.rows: dict[str, Row] = {}
        if self.path.exists():
            self.rows = {row.input: row for row in _read(self.path)}

    def row(self, source: str, output: Path) -> Row:
        """The row of an input, added as pending the first time it is seen."""
        if source not in self.rows:
            self.rows[source] = Row(source, str(output))
        return self.rows[source]

    def save(self) -> None:
        """Write the whole manifest atomically (a killed job leaves the previous version)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, [f.name for f in fields(Row)])
        writer.writeheader()
        for row in self.rows.values():
            writer.writerow(asdict(row))
        write_text(self.path, buffer.getvalue(), errors="surrogateescape")

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        counts = {DONE: 0, FAILED: 0, PENDING: 0}
        for row in self.rows.values():
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts


def _read(path: Path) -> list[Row]:
    try:
        with path.open(newline="", errors="surrogateescape") as handle:
            records = list(csv.DictReader(handle))
        return [
            Row(
                input=record["input"],
                output=record["output"],
                status=record["status"],
                attempts=int(record["attempts"] or 0),
                pixels=int(record["pixels"] or 0),
                seconds=float(record["seconds"] or 0),
                width=int(record["width"] or 0),
                height=int(record["height"] or 0),
                crs=record["crs"],
                error=record["error"],
                warning=record["warning"],
                node=record.get("node") or "",  # manifests of earlier versions have none
                bytes=int(record.get("bytes") or 0),
                checksum=record.get("checksum") or "",
            )
            for record in records
        ]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise LandcoverError(
            f"{path}: not a readable job manifest ({err}); move it away to start the job afresh"
        ) from err


def output_is_complete(row: Row, expected: Path) -> bool:
    """A done row whose map is still the one this job published: at the path the job puts it
    (a manifest is a cache, and a hand-edited output column is not trusted), with the size and
    CRC-32 recorded when it was published; rows of older manifests, which recorded neither,
    are read back whole instead."""
    from landcover.atomic import file_checksum
    from landcover.predict.writer import verify_raster

    path = Path(row.output)
    if row.status != DONE or os.path.abspath(path) != os.path.abspath(expected):
        return False
    if path.is_symlink() or not path.is_file() or not path.with_suffix(".areas.json").is_file():
        return False
    if row.checksum:
        return path.stat().st_size == row.bytes and file_checksum(path) == row.checksum
    try:
        verify_raster(path, path, (1, row.height, row.width))
    except LandcoverError:
        return False
    return True


@contextmanager
def job_lock(folder: Path) -> Iterator[None]:
    """One job per output folder at a time: a second one would race on the manifest."""
    handle = hold_folder(
        folder,
        ".job.lock",
        "another mapping job ({holder}) is writing this folder; wait for it or choose another "
        "output",
    )
    try:
        yield
    finally:
        os.close(handle)
