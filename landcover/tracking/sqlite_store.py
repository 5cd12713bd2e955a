"""A new SQLite MLflow store is built by one process at a time.

MLflow builds a SQLite store's tables (a chain of alembic migrations) the first time any client
touches it. Two processes that touch a new store at once (`srun -n 2 landcover-train`, parallel
sweep slots on a fresh `mlflow.db`) both run the migrations, and one dies with a raw SQL error
("duplicate column name: step", "Online migration expected to match one row"). Every command
calls `prepare_sqlite_store` before its first MLflow call: the first process builds the tables
under an exclusive `flock` on `<db>.lock` beside the database; any other waits on the same lock
and then finds the store ready. Locks live in the kernel, so a process killed mid-build releases
its lock; the next one finishes the migrations (alembic resumes from the recorded revision).
"""

from __future__ import annotations

import fcntl
from pathlib import Path

_READY: set[str] = set()  # stores this process has seen ready


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///` URI (None: not a SQLite store)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def prepare_sqlite_store(uri: str | None) -> None:
    """Make sure the SQLite store at `uri` has its tables, built by one process at a time
    (other stores: nothing to do)."""
    path = sqlite_path(uri)
    if path is None or str(path) == ":memory:" or uri in _READY:
        return
    assert uri is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)  # builds the tables if new
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)
