"""Compiled models, kept: each model's ONNX graph, which model files it came from, and the
cache's size (least recently used graphs go first).

A PyTorch model is exported once per identity (its weights, its metadata, the export
settings, the torch version) into `LANDCOVER_CACHE_DIR`, checked against PyTorch before it is
kept (the file appears only after the check passes), and reused by every later job. The cache
also remembers which model files each graph came from (`sources/<digest>.json`: the graph,
the model's metadata and lineage): a job whose model was compiled before maps without
importing PyTorch at all (`cached_graph`), about 1 GiB less resident memory on a CPU-only
machine.

Left alone the folder only grows (278 MB after one afternoon of
sweeps and mapping). After each new graph the cache is cut back to `LANDCOVER_CACHE_MAX_MB`
(default 2048), oldest use first, with the records that point to removed graphs;
`landcover-cache show` and `landcover-cache prune [--max-mb N]` do it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from landcover.artifacts.reference import LoadedModel
from landcover.errors import LandcoverError

log = logging.getLogger("landcover.cache")

MAX_MB_ENV = "LANDCOVER_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048
GRAPH_SUFFIXES = (".onnx", ".xml", ".bin", ".blob")
GRAPH_NAME = re.compile(r"^[0-9a-f]{32}\.(onnx|xml|bin|blob)$")  # model_key + suffix
MAX_LIMIT_MB = 1e9  # a petabyte: anything larger is a typing slip
OPSET = 17


def cache_dir() -> Path:
    """`LANDCOVER_CACHE_DIR`, or ~/.cache/landcover: compiled models outlive a job."""
    root = os.environ.get("LANDCOVER_CACHE_DIR") or Path.home() / ".cache" / "landcover"
    return Path(root) / "compiled"


class CacheError(LandcoverError):
    """A size limit that is not a size, or a cache folder that is not the cache's own."""


def megabytes(text: str, source: str) -> int:
    """`text` (MB, a finite number >= 0) in bytes, or one CacheError naming `source`."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > MAX_LIMIT_MB:
        raise CacheError(
            f"{source}={text!r}: the cache's size limit is a number of MB from 0 to "
            f"{MAX_LIMIT_MB:.0e} (0 empties it)"
        )
    return int(value * 1e6)


def max_bytes() -> int:
    """The cache's size limit."""
    return megabytes(os.environ.get(MAX_MB_ENV, str(DEFAULT_MAX_MB)), MAX_MB_ENV)


def graphs(folder: Path) -> list[Path]:
    """Compiled graphs, least recently used first (a use sets the file's access time). Only
    files named as the cache names them (a model key and a graph suffix), never a link: a
    file the cache did not write is never counted, let alone removed."""
    found = [
        p
        for p in folder.glob("*")
        if GRAPH_NAME.match(p.name) and not p.is_symlink() and p.is_file()
    ]
    return sorted(found, key=lambda p: p.stat().st_atime)


def own_folder(folder: Path) -> Path:
    """The cache folder, refused when it is a link: pruning through a link would remove files
    of wherever it points (name the cache's place with LANDCOVER_CACHE_DIR instead)."""
    if folder.is_symlink():
        raise CacheError(
            f"{folder} is a link (to {os.readlink(folder)}): the cache prunes only a folder of "
            "its own; set LANDCOVER_CACHE_DIR to where the cache should live"
        )
    return folder


def touch(graph: Path) -> None:
    """Mark a graph as just used: its access time, set explicitly (mounts with `relatime`
    update it rarely); its modification time stays the time it was compiled."""
    with contextlib.suppress(OSError):  # a read-only cache still maps
        os.utime(graph, ns=(time.time_ns(), graph.stat().st_mtime_ns))


def prune(limit: int | None = None, folder: Path | None = None) -> tuple[int, int]:
    """Remove least recently used graphs until the cache holds at most `limit` bytes; returns
    (graphs removed, bytes freed). Records of removed graphs go too."""
    folder = own_folder(folder or cache_dir())
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


def model_key(model: LoadedModel) -> str:
    """What makes two compiled graphs the same: the weights, the metadata that shapes the
    graph, the export settings and the torch version that traced it."""
    import torch

    assert model.torch_module is not None
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.torch_module.state_dict().items()):
        digest.update(name.encode())
        if isinstance(tensor, torch.Tensor):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    shaping = {k: model.metadata.get(k) for k in ("model", "bands", "normalize", "output_margin")}
    digest.update(json.dumps([shaping, OPSET, torch.__version__], sort_keys=True).encode())
    return digest.hexdigest()


def compiled_onnx(model: LoadedModel) -> Path:
    """The cached ONNX file of `model`, exported and checked on first use."""
    from landcover.atomic import atomic_target
    from landcover.interop.onnx import export_onnx, onnx_check

    assert model.torch_module is not None
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model_key(model)}.onnx"
    if not path.is_file():
        module = model.torch_module.cpu().eval()
        with atomic_target(path) as tmp:  # the file appears only once exported and checked
            export_onnx(module, dict(model.metadata), tmp, opset=OPSET)
            check = onnx_check(module, tmp)
            refusal = check.refusal()  # the defaults of landcover-export
            if refusal:
                raise ValueError(f"the ONNX graph is refused: {refusal}")
        log.info("compiled %s to ONNX (%s): %s", model.reference, check, path)
        prune()  # the cache keeps to its size, oldest use first
    else:
        touch(path)
    if model.source_digest:
        remember_source(model, path)
    return path


def source_record(digest: str) -> Path:
    """Where the cache says which graph the model files with this digest compiled to."""
    return cache_dir() / "sources" / f"{digest}-opset{OPSET}-torch{torch_version()}.json"


def torch_version() -> str:
    """The installed torch's version, read without importing it (a graph traced by another
    torch is traced again)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def remember_source(model: LoadedModel, graph: Path) -> None:
    """Record that `model`'s files compile to `graph`, with what a job needs to map with it."""
    from landcover.atomic import write_text

    assert model.source_digest is not None
    record = {
        "graph": graph.name,
        "metadata": model.metadata,
        "source_run_id": model.source_run_id,
        "model_id": model.model_id,
    }
    target = source_record(model.source_digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, json.dumps(record, sort_keys=True, default=str))


def cached_graph(digest: str, reference: str) -> tuple[LoadedModel, Path] | None:
    """The model with these files as its cached graph (no forward yet), or None when it was
    never compiled here (or its record or graph is gone or unreadable)."""
    record_path = source_record(digest)
    try:
        record = json.loads(record_path.read_text())
        graph = cache_dir() / str(record["graph"])
        metadata = dict(record["metadata"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not graph.is_file() or "schema" not in metadata or "/" in str(record["graph"]):
        return None
    touch(graph)
    model = LoadedModel(
        forward=_not_compiled,
        metadata=metadata,
        reference=reference,
        kind="compiled",
        source_run_id=record.get("source_run_id"),
        model_id=record.get("model_id"),
        source_digest=digest,
    )
    return model, graph


def _not_compiled(pixels: np.ndarray) -> np.ndarray:
    raise RuntimeError("a cached graph's model runs only once its backend is chosen")


def main(argv: list[str] | None = None) -> None:
    """`landcover-cache show | prune [--max-mb N]`."""
    parser = argparse.ArgumentParser(prog="landcover-cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="where the cache is and what it holds")
    prune_parser = commands.add_parser("prune", help="cut the cache back to a size")
    prune_parser.add_argument("--max-mb", default=None, help="0 empties it")
    args = parser.parse_args(argv)
    folder = cache_dir()
    try:
        limit = None if args.max_mb is None else megabytes(args.max_mb, "--max-mb")
        _run(args.command, folder, limit)
    except LandcoverError as err:
        sys.exit(f"error: {err}")


def _run(command: str, folder: Path, limit: int | None) -> None:
    if command == "show":
        found = graphs(folder) if folder.is_dir() else []
        size = sum(p.stat().st_size for p in found)
        print(
            f"{folder}: {len(found)} compiled graph(s), {size / 1e6:.1f} MB "
            f"(limit {max_bytes() / 1e6:.0f} MB, {MAX_MB_ENV})"
        )
        return
    count, freed = prune(limit, folder)
    print(f"{folder}: {count} graph(s) removed, {freed / 1e6:.1f} MB freed")


if __name__ == "__main__":
    main()
