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
def basic_auth_server(folder: Path, members: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth` on loopback (users and runs in SQLite under
    `folder`) with `members` (name: password); yields its URL and folder.

    Members' stored hashes are cheap PBKDF2 ones: the server checks the password on every
    request, and its default scrypt check costs about 2 s a request on these cores (the
    README's team server keeps the default)."""
    from werkzeug.security import generate_password_hash

    port = free_port()
    command, env = basic_auth_server_command(
        f"sqlite:///{folder / 'mlflow.db'}", f"sqlite:///{folder}/auth.db", port, folder
    )
    url = f"http://{HOST}:{port}"
    with running(command, f"{url}/health", folder / "server.log", env):
        with patched_environ(ADMIN):
            from mlflow.server import get_app_client

            users = get_app_client("basic-auth", tracking_uri=url)
            for name, password in members.items():
                users.create_user(name, password)
        with sqlite3.connect(folder / "auth.db") as db:
            for name, password in members.items():
                db.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ?",
                    (generate_password_hash(password, method="pbkdf2:sha256:1000"), name),
                )
        yield url, folder


def http_json(url: str, payload: Any = None) -> Any:
    status, body = http(url, payload)
    assert status == 200, f"{url}: HTTP {status}: {body[:500]!r}"
    return json.loads(body)
