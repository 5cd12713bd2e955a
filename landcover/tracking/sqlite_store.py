"""A new SQLite MLflow store is built by one process at a time.

MLflow builds a SQLite store's tables (a chain of alembic migrations) the first time any client
touches it. Two processes that touch a new store at once (`srun -n 2 landcover-train`, parallel
sweep slots on a fresh `mlflow.db`) both run the migrations, and one dies with a raw SQL error
("duplicate column name: step", "Online migration expected to match one row"). Every command
calls `prepare_sqlite_store` before its first MLflow call: the first process builds the tables
under the store's own lock (`locks.store_lock`, an `flock` beside the database that the kernel
releases if the process dies); any other waits on it and then finds the store ready.
"""

from __future__ import annotations

from landcover import locks

_READY: set[str] = set()  # stores this process has seen ready


def prepare_sqlite_store(uri: str | None) -> None:
    """Make sure the SQLite store at `uri` has its tables, built by one process at a time
    (other stores: nothing to do)."""
    if not uri or locks.sqlite_path(uri) is None or uri in _READY:
        return
    with locks.store_lock(uri, "tables"):
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments(max_results=1)  # builds the tables if new
    _READY.add(uri)
