"""A throw-away PostgreSQL server for integration tests (Debian's `postgresql` package).

initdb into a fresh folder, start `postgres` on a free loopback port, and always stop it (its
process group) and delete the folder. PostgreSQL refuses to run as root, so as root the server
runs as the `postgres` user the package creates. Absent binaries -> a clear skip reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.local_server import HOST, free_port, stop_process_group


def find_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def skip_reason() -> str | None:
    if find_binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[dev]')"
    return None


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...]) -> Iterator[str]:
    """Yields `postgresql://postgres@127.0.0.1:<port>`; the databases exist."""
    binaries = find_binaries()
    assert binaries is not None
    folder = Path(tempfile.mkdtemp(prefix="landcover-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    port = free_port()
    subprocess.run(
        _as_server_user(
            [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        _as_server_user(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                f"unix_socket_directories={folder}",
            ]
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"postgresql://postgres@{HOST}:{port}"
    try:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg.connect(f"{url}/postgres", connect_timeout=2)
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((folder / "server.log").read_text()[-3000:]) from None
                time.sleep(0.3)
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in databases:
                cursor.execute(f"CREATE DATABASE {name}")
        connection.close()
        yield url
    finally:
        stop_process_group(server, grace_s=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
