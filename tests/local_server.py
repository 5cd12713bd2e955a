"""Local servers (MLflow tracking UI, model serving) for tests and scripts.

Loopback only, a port chosen free at run time, a bounded wait for readiness, and always stopped
by their own process group: MLflow's servers fork workers that a plain kill would orphan."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from landcover.errors import LandcoverError

BIN = Path(sys.executable).parent


class ServerError(LandcoverError):
    """A server that exited or never answered; the message ends with its log."""


HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on, for a local server in tests and demos."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http(
    url: str, payload: Any = None, timeout: float = 30, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """GET (or POST JSON when a payload is given); returns the status and the body."""
    data = None if payload is None else json.dumps(payload).encode()
    sent = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers={**sent, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@contextlib.contextmanager
def running(
    command: list[str],
    ready_url: str,
    log: Path,
    env: dict[str, str],
    wait_s: float = 180,
    venv_on_path: bool = True,
) -> Iterator[subprocess.Popen]:
    """Start `command`, wait until `ready_url` answers 200 (or fail with its log), stop it.

    `venv_on_path=False` runs it as a user's shell would, without the venv's bin on PATH."""
    environment = {**os.environ, **env}
    if venv_on_path:
        environment["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if process.poll() is not None:
                raise ServerError(f"{command[:3]} exited early:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if http(ready_url, timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{ready_url} not ready after {wait_s} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield process
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the whole group, SIGKILL if it lingers: no orphaned worker survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


def mlflow_server_command(backend_store_uri: str, port: int, *extra: str) -> list[str]:
    """`mlflow server` on loopback, one worker (what tests and scripts start)."""
    return [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


AUTH_INI = """[mlflow]
default_permission = NO_PERMISSIONS
database_uri = {auth_database}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""
ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-password-1"}


def basic_auth_server_command(
    store_uri: str, auth_database: str, port: int, folder: Path
) -> tuple[list[str], dict[str, str]]:
    """The README's team server on loopback (`mlflow server --app-name basic-auth`, artifacts
    served from `folder`): its command line and environment; members are refused by default
    (`NO_PERMISSIONS`), the admin's password is ADMIN's."""
    (folder / "auth.ini").write_text(AUTH_INI.format(auth_database=auth_database))
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN["MLFLOW_TRACKING_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }
    extra = ("--app-name", "basic-auth", "--artifacts-destination", str(folder / "artifacts"))
    return mlflow_server_command(store_uri, port, *extra), env
