"""Test helpers around tests.local_server."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.local_server import (
    ADMIN,
    BIN,
    HOST,
    basic_auth_server_command,
    free_port,
    http,
    running,
)

__all__ = [
    "BIN",
    "HOST",
    "add_members",
    "basic_auth_server",
    "free_port",
    "http",
    "http_json",
    "patched_environ",
    "running",
]


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """`values` in this process's environment for the block, the old ones back after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def basic_auth_server(
    folder: Path, members: dict[str, str], stores: tuple[str, str] | None = None
) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth` on loopback with `members` (name: password);
    yields its URL and folder. `stores` (runs, users and permissions) default to SQLite files
    under `folder`; the PostgreSQL team test passes its databases."""
    port = free_port()
    backend, auth = stores or (f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder}/auth.db")
    command, env = basic_auth_server_command(backend, auth, port, folder)
    url = f"http://{HOST}:{port}"
    with running(command, f"{url}/health", folder / "server.log", env):
        add_members(url, auth, members)
        yield url, folder


def add_members(url: str, auth_store: str, members: dict[str, str]) -> None:
    """The admin creates `members` (name: password) on the server at `url`, then their stored
    hashes are made cheap PBKDF2 ones in `auth_store` (SQLite or PostgreSQL). The server checks
    the password on every request, and its default scrypt check costs about 2 s a request on
    these cores (README "What records cost"): a test run's records would take minutes. What is
    tested is who may do what, not how costly the check is (the README's team server keeps
    the default)."""
    from werkzeug.security import generate_password_hash

    with patched_environ(ADMIN):
        from mlflow.server import get_app_client

        users = get_app_client("basic-auth", tracking_uri=url)
        for name, password in members.items():
            users.create_user(name, password)
    hashes = [
        (generate_password_hash(password, method="pbkdf2:sha256:1000"), name)
        for name, password in members.items()
    ]
    if auth_store.startswith("sqlite:///"):
        with sqlite3.connect(auth_store.removeprefix("sqlite:///")) as db:
            db.executemany("UPDATE users SET password_hash = ? WHERE username = ?", hashes)
    else:
        import psycopg

        with psycopg.connect(auth_store) as connection:
            connection.cursor().executemany(
                "UPDATE users SET password_hash = %s WHERE username = %s", hashes
            )


def http_json(url: str, payload: Any = None, headers: dict[str, str] | None = None) -> Any:
    status, body = http(url, payload, headers=headers)
    assert status == 200, f"{url}: HTTP {status}: {body[:500]!r}"
    return json.loads(body)
