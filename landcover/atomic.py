"""Files written whole or not at all.

Every output a user or a later run relies on (scenes, checkpoints, ONNX files) is written to a
temporary file beside its target and renamed onto it only once complete: an interrupted run
never leaves a half-written file at the target path, nor loses the one that was there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from landcover.errors import DiskFullError

LOW_SPACE_BYTES = 1 << 20  # below this, a failed write is taken for a full disk


@contextlib.contextmanager
def atomic_target(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; renamed onto `target` when the block
    succeeds, removed when it fails. Readable by others (0644), like a normally created file."""
    target = Path(target)
    _clean_once(target.parent)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-",
        suffix=f".tmp{target.suffix}",
        dir=target.parent,
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException as err:
        full = disk_full(err, target)  # before the partial file frees its space
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from err
        raise


def write_text(target: str | Path, text: str, errors: str = "strict") -> None:
    """A small text output (an area table, a manifest) written whole or not at all, in UTF-8;
    `errors="surrogateescape"` writes file names that are not UTF-8 back as their bytes."""
    with atomic_target(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def disk_full(err: BaseException, path: str | Path) -> DiskFullError | None:
    """A DiskFullError naming `path` if `err` came from a full disk, else None.

    Libraries report a full disk many ways (ENOSPC, GDAL's "Write failed", torch's "unexpected
    pos"); a failed write with almost no space left where it was writing is taken for one."""
    directory = Path(path).parent if not Path(path).is_dir() else Path(path)
    no_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not no_space and isinstance(err, Exception):
        try:
            no_space = shutil.disk_usage(directory).free < LOW_SPACE_BYTES
        except OSError:
            return None
    if not no_space:
        return None
    return DiskFullError(f"no space left on the device of {directory} while writing {path}")


@contextlib.contextmanager
def naming_full_disk(path: str | Path) -> Iterator[None]:
    """Re-raise a failure caused by a full disk as a DiskFullError naming `path`."""
    try:
        yield
    except Exception as err:
        full = disk_full(err, path)
        if full is not None:
            raise full from err
        raise


def file_checksum(path: str | Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits: what a mapping job records of each map and
    checks again before it trusts the map on a re-run (a map replaced, truncated or
    bit-flipped since no longer matches)."""
    value = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


STAGING_PREFIX = ".landcover-"


def staging_dir(parent: Path) -> Path:
    """A private folder beside an output, named after this host and process so a later run
    can tell whether its owner is gone (see `remove_stale_staging`)."""
    remove_stale_staging(parent)
    prefix = f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


_CLEANED: set[str] = set()


def _clean_once(parent: Path) -> None:
    """Remove dead processes' temporary files in `parent`, once per folder and process."""
    key = os.path.realpath(parent)
    if key not in _CLEANED:
        _CLEANED.add(key)
        remove_stale_staging(parent)


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove staging folders and temporary files (of `atomic_target`) that processes of this
    host left when they died (SIGKILL, power loss); those of live processes and of other hosts
    are left alone."""
    removed = []
    host = socket.gethostname()
    for folder in parent.glob(f"{STAGING_PREFIX}{host}-*-*"):
        pid_text = folder.name[len(STAGING_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
