"""Test helpers around tests.local_server."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.local_server import BIN, HOST, free_port, http, mlflow_server_command, running

__all__ = ["BIN", "HOST", "basic_auth_server", "free_port", "http", "http_json", "running"]

AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///{folder}/auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@contextlib.contextmanager
def basic_auth_server(folder: Path, members: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth` on loopback (users and runs in SQLite under
    `folder`) with `members` (name: password); yields its URL and folder.

    Members' stored hashes are cheap PBKDF2 ones: the server checks the password on every
    request, and its default scrypt check costs about 2 s a request on these cores (the
    README's team server keeps the default)."""
    from werkzeug.security import generate_password_hash

    (folder / "auth.ini").write_text(AUTH_INI.format(folder=folder))
    port = free_port()
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    command = mlflow_server_command(
        f"sqlite:///{folder / 'mlflow.db'}",
        port,
        "--app-name",
        "basic-auth",
        "--artifacts-destination",
        str(folder / "artifacts"),
    )
    url = f"http://{HOST}:{port}"
    with running(command, f"{url}/health", folder / "server.log", env):
        admin = {
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": "admin-password-1",
        }
        saved = {k: os.environ.get(k) for k in admin}
        os.environ.update(admin)
        try:
            from mlflow.server import get_app_client

            users = get_app_client("basic-auth", tracking_uri=url)
            for name, password in members.items():
                users.create_user(name, password)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
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
