"""A real two-node Ray cluster on loopback, as a team starts one: `ray start --head` and
`ray start --address=...` (one CPU each), in a shell environment that is NOT the driver's
(none of its MLFLOW_*, LANDCOVER_* or PG* variables, another working directory), each node in
a process group of its own so that a test can kill one whole node."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
STARTED_WITHIN = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_environment() -> dict[str, str]:
    """The environment `ray start` runs with: the machine's, less the driver's job settings."""
    dropped = ("MLFLOW_", "LANDCOVER_", "PG", "RAY_ADDRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start --head` turns token authentication on once ~/.ray/auth_token exists (any Ray
    # run may have written it), while clients default to no authentication: a loopback test
    # cluster opts out, as its drivers (the test's commands) do by default
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@dataclass
class Cluster:
    """Two nodes; `address` attaches to them."""

    address: str
    temp_dir: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of node `index` (its raylet, its workers) at once."""
        node = self.nodes[index]
        # by session, not process group: Ray puts each worker in a process group of its own
        # (same session), and a worker that outlives its raylet finishes the raster it holds
        # and hands it back to the driver, so the "lost" node's work was never lost
        subprocess.run(["pkill", "-9", "-s", str(node.pid)], check=False)
        node.wait(timeout=30)

    def head_node_id(self) -> str:
        """The head node's Ray id (the node with the `node:__internal_head__` resource)."""
        out = subprocess.run(
            [
                str(BIN / "python"),
                "-c",
                f"import ray; ray.init(address='{self.address}', log_to_driver=False); "
                "print([n['NodeID'] for n in ray.nodes() "
                "if 'node:__internal_head__' in n['Resources']][0])",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=node_environment(),
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]


def own_ports(head: bool) -> list[str]:
    """Free ports for every service of a node: Ray's defaults (52365 for the dashboard agent,
    10001 for the client server...) collide between two nodes of one machine and with a Ray
    that another test left shutting down."""
    names = [
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
    ] + (["ray-client-server-port"] if head else [])
    return [f"--{name}={free_port()}" for name in names]


def _start(args: list[str], workdir: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            cwd=workdir,
            env=node_environment(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_nodes(address: str, count: int, deadline: float, logs: list[Path]) -> None:
    probe = (
        "import ray, time\n"
        f"ray.init(address='{address}', log_to_driver=False)\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}: time.sleep(0.5)\n"
    )
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            said = "\n".join(
                f"--- {log}:\n{log.read_text()[-2000:]}" for log in logs if log.exists()
            )
            raise TimeoutError(f"Ray cluster at {address} did not reach {count} node(s)\n{said}")
        try:
            done = subprocess.run(
                [str(BIN / "python"), "-c", probe],
                env=node_environment(),
                capture_output=True,
                timeout=min(max(left, 1), 60),
                check=False,
            )
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0:
            return
        time.sleep(1)


@contextmanager
def two_node_cluster(workdir: Path) -> Iterator[Cluster]:
    """Head and worker on 127.0.0.1, one CPU each; stopped (and its files removed) after."""
    # Ray's socket paths must stay short: its own temp folder under /tmp
    temp_dir = Path(tempfile.mkdtemp(prefix="lcray", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--object-store-memory=80000000"]
    cluster = Cluster(address, temp_dir)
    try:
        cluster.nodes.append(
            _start(
                [
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    f"--temp-dir={temp_dir}",
                    *common,
                    *own_ports(head=True),
                ],
                workdir,
                workdir / "head.log",
            )
        )
        logs = [workdir / "head.log", workdir / "worker.log"]
        deadline = time.monotonic() + STARTED_WITHIN
        _wait_for_nodes(address, 1, deadline, logs)
        cluster.nodes.append(
            _start(
                [f"--address={address}", *common, *own_ports(head=False)],
                workdir,
                workdir / "worker.log",
            )
        )
        _wait_for_nodes(address, 2, deadline, logs)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            if node.poll() is None:
                try:
                    os.killpg(node.pid, signal.SIGTERM)
                    node.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(node.pid, signal.SIGKILL)
        # a node's raylet, GCS and workers (each in a process group of its own) may outlive
        # `ray start --block`: whatever is left of each node's session goes
        for node in cluster.nodes:
            subprocess.run(["pkill", "-9", "-s", str(node.pid)], check=False, capture_output=True)
        subprocess.run(["pkill", "-9", "-f", f"{temp_dir}"], check=False, capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
