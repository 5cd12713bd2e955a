"""One lock per store across processes and machines: sweeps claiming trials, promotions moving
an alias. Two processes doing the same thing at once must not corrupt shared state.

The lock lives where the state lives: beside a SQLite file (an `flock` on `<file>.<name>.lock`,
released by the kernel if the process dies), or in PostgreSQL (an advisory lock, released when
the connection drops). Other stores (an `http://` MLflow server) get no lock: the caller
decides whether that is acceptable. A folder one process works in alone (a mapping job's
output, a studio session) is held with `hold_folder`, which refuses a second one at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from landcover.errors import LandcoverError

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other stores)."""
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def absolute_sqlite_url(url: str, base: Path | None = None) -> str:
    """`sqlite:///optuna.db` -> `sqlite:////abs/optuna.db`: a job in another process or working
    directory must open the same file."""
    path = sqlite_path(url)
    if path is None or path.is_absolute() or str(path) in ("", ":memory:"):
        return url
    return f"sqlite:///{((base or Path.cwd()) / path).resolve()}"


def is_postgresql(url: str) -> bool:
    """Whether a store URL is PostgreSQL (advisory locks instead of a lock file)."""
    return url.startswith(("postgresql:", "postgresql+"))


def can_lock(url: str) -> bool:
    """Whether `store_lock` can serialise writers of this store."""
    return sqlite_path(url) is not None or is_postgresql(url)


def advisory_key(name: str) -> int:
    """A stable 31-bit key per lock name (the sweeps' lock keeps its historical key)."""
    return 0x1A9DC0 if name == "sweep" else zlib.crc32(f"landcover.{name}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def store_lock(url: str, name: str) -> Iterator[bool]:
    """Exclusive across threads, processes and machines sharing the store at `url`.

    Yields whether a cross-process lock is held (False for stores that have none).
    """
    path = sqlite_path(url)
    lock_file = None
    if path is not None and str(path) not in ("", ":memory:"):
        lock_file = sqlite_lock_file(path, name)
        url = f"sqlite:///{lock_file}"
    with _GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(f"{url}#{name}", threading.Lock())
    with thread_lock:
        if is_postgresql(url):
            import sqlalchemy

            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            key = advisory_key(name)
            try:
                with engine.connect() as connection:
                    connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({key})"))
                    try:
                        yield True
                    finally:
                        connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({key})"))
            finally:
                engine.dispose()
            return
        if lock_file is None:
            yield False
            return
        with open(lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_lock_file(database: Path, name: str) -> Path:
    """One lock file per database file however it is named: a relative path, a symbolic
    link or a hard link (another name for the same inode) all give the same lock. The file is
    created if missing (an empty file is an empty SQLite database), so it always has an
    identity; the lock sits in its real folder, named by that identity. (Hard links in two
    different folders get two locks: the lock must sit where every machine sharing the store
    can see it, which a folder-independent place is not.)"""
    database.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(database))
    with open(real, "a"):
        pass
    identity = os.stat(real)
    return real.parent / f".{real.suffix.lstrip('.') or 'db'}-{identity.st_ino}.{name}.lock"


def hold_folder(folder: Path, name: str, busy: str, detail: str = "") -> int:
    """An exclusive `flock` on `folder/name`, taken without waiting, as an open descriptor the
    caller keeps while it works there (the kernel drops the lock when the process dies, however
    it dies). The file records the holder (pid, host, `detail`) for whoever finds it taken:
    `busy`, with `{holder}` filled in, is then the one-line error. A folder that cannot be
    written is one line too; a link planted as `name` is not followed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder / name, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise LandcoverError(
                f"{folder}: read-only ({err.strerror}); choose a writable output folder"
            ) from err
        raise LandcoverError(f"{folder}: cannot hold its lock ({err})") from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(handle)
        raise LandcoverError(f"{folder}: {busy.format(holder=holder)}") from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}{detail}".encode(), 0)
    return handle
