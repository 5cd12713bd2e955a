"""Where compiled models are kept, and the cache's size: least recently used graphs go first.

Every model a machine maps is compiled once into `LANDCOVER_CACHE_DIR` (see
`landcover.predict.backends`); left alone the folder only grows (278 MB after one afternoon of
sweeps and mapping). After each new graph the cache is cut back to `LANDCOVER_CACHE_MAX_MB`
(default 2048), oldest use first, with the records that point to removed graphs;
`landcover-cache show` and `landcover-cache prune [--max-mb N]` do it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("landcover.cache")

MAX_MB_ENV = "LANDCOVER_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048
GRAPH_SUFFIXES = (".onnx", ".xml", ".bin", ".blob")


def cache_dir() -> Path:
    """`LANDCOVER_CACHE_DIR`, or ~/.cache/landcover: compiled models outlive a job."""
    root = os.environ.get("LANDCOVER_CACHE_DIR") or Path.home() / ".cache" / "landcover"
    return Path(root) / "compiled"


def max_bytes() -> int:
    """The cache's size limit."""
    return int(float(os.environ.get(MAX_MB_ENV, DEFAULT_MAX_MB)) * 1e6)


def graphs(folder: Path) -> list[Path]:
    """Compiled graphs, least recently used first (a use sets the file's access time)."""
    found = [p for p in folder.glob("*") if p.is_file() and p.suffix in GRAPH_SUFFIXES]
    return sorted(found, key=lambda p: p.stat().st_atime)


def touch(graph: Path) -> None:
    """Mark a graph as just used: its access time, set explicitly (mounts with `relatime`
    update it rarely); its modification time stays the time it was compiled."""
    with contextlib.suppress(OSError):  # a read-only cache still maps
        os.utime(graph, ns=(time.time_ns(), graph.stat().st_mtime_ns))


def prune(limit: int | None = None, folder: Path | None = None) -> tuple[int, int]:
    """Remove least recently used graphs until the cache holds at most `limit` bytes; returns
    (graphs removed, bytes freed). Records of removed graphs go too."""
    folder = folder or cache_dir()
    limit = max_bytes() if limit is None else limit
    if not folder.is_dir():
        return 0, 0
    found = graphs(folder)
    total = sum(p.stat().st_size for p in found)
    removed, freed = [], 0
    for graph in found:
        if total - freed <= limit:
            break
        size = graph.stat().st_size
        graph.unlink(missing_ok=True)
        removed.append(graph.name)
        freed += size
    if removed:
        gone = set(removed)
        for record in (folder / "sources").glob("*.json"):
            try:
                if json.loads(record.read_text()).get("graph") in gone:
                    record.unlink(missing_ok=True)
            except (OSError, ValueError, AttributeError):
                record.unlink(missing_ok=True)  # an unreadable record vouches for nothing
        log.info("compile cache: %d graph(s) removed, %.1f MB freed", len(removed), freed / 1e6)
    return len(removed), freed


def main(argv: list[str] | None = None) -> None:
    """`landcover-cache show | prune [--max-mb N]`."""
    parser = argparse.ArgumentParser(prog="landcover-cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="where the cache is and what it holds")
    prune_parser = commands.add_parser("prune", help="cut the cache back to a size")
    prune_parser.add_argument("--max-mb", type=float, default=None, help="0 empties it")
    args = parser.parse_args(argv)
    folder = cache_dir()
    if args.command == "show":
        found = graphs(folder) if folder.is_dir() else []
        size = sum(p.stat().st_size for p in found)
        print(
            f"{folder}: {len(found)} compiled graph(s), {size / 1e6:.1f} MB "
            f"(limit {max_bytes() / 1e6:.0f} MB, {MAX_MB_ENV})"
        )
        return
    limit = None if args.max_mb is None else int(args.max_mb * 1e6)
    count, freed = prune(limit, folder)
    print(f"{folder}: {count} graph(s) removed, {freed / 1e6:.1f} MB freed")


if __name__ == "__main__":
    main()
