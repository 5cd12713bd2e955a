"""Ray as a team runs it: attach to the cluster that exists, carry the job's environment there.

Sweeps (`hydra/launcher=ray`) and mapping jobs (`engine.name=ray`) both come through here, so
that both attach the same way and both bring what a job needs to the workers:

- **Which cluster.** An address (`host:port`, `ray://host:10001`, `auto`) from the config, else
  `RAY_ADDRESS`, attaches to a running cluster; with neither, a small Ray is started on this
  machine. The log says which, with the cluster's size.
- **The driver's environment.** Workers of a cluster started apart run with the environment
  and working directory of whoever ran `ray start`, not the user's. `JobEnvironment` carries the
  variables a job needs (tracking and registry credentials, database passwords and the libpq
  password file's content, `LANDCOVER_*`, cloud storage keys, every variable the config names
  through `oc.env`) and the driver's working directory. It travels inside the task's arguments,
  never in Ray's `runtime_env`: Ray's runtime-env agent writes the runtime env it receives into
  its log on every node, where any user of the cluster reads it. Its repr names the variables
  and never shows a value.
- **The shared-storage contract.** Every node must see the job's inputs, its output folder, a
  SQLite store and the driver's working directory at the same paths. `check_every_node` asks
  each live node before any work and fails in one line naming the node and the path.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from landcover.errors import LandcoverError, first_line

log = logging.getLogger("landcover.cluster")

# variables a job may need on a worker: credentials, stores, our own settings
CARRIED_PREFIXES = ("MLFLOW_", "LANDCOVER_", "AWS_", "AZURE_STORAGE_", "PG")
CARRIED_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS", "GDAL_HTTP_AUTH", "GDAL_HTTP_USERPWD")
OC_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
# a small object store when we start Ray here: jobs return a few numbers, not arrays
LOCAL_OBJECT_STORE_BYTES = 78_643_200
SHARED_PATHS_HELP = (
    "every Ray node must see the job's inputs, its output folder, a SQLite store and the "
    "driver's working directory at the same paths (README, 'Scaling out')"
)


class ClusterError(LandcoverError):
    """The cluster cannot run the job as asked (a path a node cannot see, no room for a worker)."""


@dataclass(frozen=True)
class JobEnvironment:
    """What a job brings from the driver to a worker; applied by the worker before any work."""

    variables: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""
    pgpass: str | None = None  # the content of the driver's libpq password file

    @classmethod
    def of_driver(cls, config_text: str = "", extra: Iterable[str] = ()) -> JobEnvironment:
        """The driver's variables a job may need, those the config names by `oc.env`, and
        `extra` names; the libpq password file's content; the working directory."""
        named = set(OC_ENV.findall(config_text)) | set(extra)
        variables = {
            key: value
            for key, value in os.environ.items()
            if key.startswith(CARRIED_PREFIXES) or key in CARRIED_NAMES or key in named
        }
        pgpass_file = Path(variables.pop("PGPASSFILE", "") or Path.home() / ".pgpass")
        pgpass = pgpass_file.read_text() if pgpass_file.is_file() else None
        return cls(variables, str(Path.cwd()), pgpass)

    def names(self) -> list[str]:
        """The carried variables' names (what logs may say; values never)."""
        return sorted(self.variables) + (["PGPASSFILE (content)"] if self.pgpass else [])

    def __repr__(self) -> str:
        return f"JobEnvironment(names={self.names()}, workdir={self.workdir!r})"

    __str__ = __repr__

    def apply(self) -> None:
        """In the worker: set the variables, write the password file (owner-only), and work in
        the driver's directory, which must exist here (the shared-storage contract)."""
        os.environ.update(self.variables)
        if self.pgpass is not None:
            handle, path = tempfile.mkstemp(prefix="landcover-pgpass-")
            with os.fdopen(handle, "w") as stream:
                stream.write(self.pgpass)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # libpq ignores a file others can read
            os.environ["PGPASSFILE"] = path
        if self.workdir and os.getcwd() != self.workdir:
            if not Path(self.workdir).is_dir():
                raise ClusterError(
                    f"node {node_label()}: the driver's working directory {self.workdir} does "
                    f"not exist here; {SHARED_PATHS_HELP}"
                )
            os.chdir(self.workdir)


class CarryingTask:
    """A Hydra task function that applies the driver's environment first (Ray jobs)."""

    def __init__(self, task_function: Callable[..., Any], environment: JobEnvironment) -> None:
        self.task_function = task_function
        self.environment = environment

    def __call__(self, cfg: Any) -> Any:
        """Apply the environment, then run the job."""
        self.environment.apply()
        return self.task_function(cfg)

    def __repr__(self) -> str:
        return f"CarryingTask({self.task_function!r}, {self.environment!r})"


def requested_address(address: str | None) -> str | None:
    """The cluster the user named: the config's address, else `RAY_ADDRESS`, else none."""
    named = address or os.environ.get("RAY_ADDRESS") or None
    return str(named) if named else None


def connect(address: str | None, local_init: Mapping[str, Any] | None = None) -> str:
    """Attach to the named cluster, or start Ray here when none is named; says which.

    `local_init` holds `ray.init` settings that only make sense for a Ray started here (object
    store size, CPUs): Ray refuses them when attaching, so they are dropped then.
    """
    import ray

    if ray.is_initialized():
        return "Ray already initialised in this process"
    quiet: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    target = requested_address(address)
    if target:
        _reachable(target)
        try:
            ray.init(address=target, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(
                f"cannot attach to the Ray cluster at {target}: {first_line(err)}"
            ) from err
        nodes = alive_nodes()
        message = (
            f"Ray: attached to the cluster at {target} ({len(nodes)} node(s), "
            f"{_cpus(nodes):g} CPUs)"
        )
    else:
        settings: dict[str, Any] = {
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            "include_dashboard": False,
        }
        settings.update({k: v for k, v in (local_init or {}).items() if v is not None})
        settings.pop("address", None)
        ray.init(**settings, **quiet)
        message = (
            f"Ray: no cluster named (address, RAY_ADDRESS): started one on this machine "
            f"({_cpus(alive_nodes()):g} CPUs)"
        )
    log.info("%s", message)
    return message


def _reachable(target: str, timeout: float = 10) -> None:
    """Fail in seconds when nothing listens at a `host:port` or `ray://host:port` address:
    `ray.init` itself waits minutes for a head that is not there."""
    import socket

    if target == "auto" or ":" not in target.removeprefix("ray://"):
        return
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"cannot attach to the Ray cluster at {target}: nothing answers there "
            f"({getattr(err, 'strerror', None) or err}); start it with `ray start --head` or "
            "correct the address (engine.address, hydra.launcher.ray.init.address, RAY_ADDRESS)"
        ) from err


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes as Ray describes them."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def _cpus(nodes: list[dict[str, Any]]) -> float:
    return sum(float(node.get("Resources", {}).get("CPU", 0)) for node in nodes)


def node_label(node_id: str | None = None) -> str:
    """`<node id prefix>@<ip>` of this process's node (or `node_id`): nodes on one host differ."""
    try:
        import ray

        if not ray.is_initialized():
            return "this machine"
        node_id = node_id or ray.get_runtime_context().get_node_id()
        ip = next(
            (n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "unknown"
        )
        return f"{node_id[:8]}@{ip}"
    except Exception:  # a label is for people; never fail a job for it
        return "unknown node"


def current_node() -> str | None:
    """This process's Ray node label when Ray runs in it (a Ray worker), else None; never
    imports Ray (a second of start-up) into a process that does not use it."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return node_label()
    except Exception:
        return None
    return None


def probe_paths(readable: list[str], writable: list[str]) -> list[str]:
    """On one node: the paths it cannot read or write, one line each."""
    problems = []
    for path in readable:
        if not os.access(path, os.R_OK):
            reason = "does not exist" if not os.path.exists(path) else "is not readable"
            problems.append(f"{path} {reason}")
    for folder in writable:
        probe = Path(folder) / f".landcover-probe-{os.getpid()}"
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            problems.append(f"{folder} is not writable ({err.strerror or err})")
    return problems


def check_every_node(readable: list[str], writable: list[str], timeout: float = 120) -> None:
    """Each live node reads `readable` and writes into `writable`; one line per failure.

    The probe needs no CPU (it must run beside busy workers) and is pinned to its node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(probe_paths)
    nodes = alive_nodes()
    pending = {
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(readable, writable): node
        for node in nodes
    }
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
    lines = []
    for ref in done:
        node = pending[ref]
        try:
            problems = ray.get(ref)
        except Exception as err:  # the node died during the check: the job copes with that
            log.warning("node %s did not answer the path check: %s", node["NodeID"][:8], err)
            continue
        label = f"{node['NodeID'][:8]}@{node['NodeManagerAddress']}"
        lines += [f"node {label}: {problem}" for problem in problems]
    for ref in late:
        node_id = pending[ref]["NodeID"][:8]
        log.warning("node %s did not answer the path check in %g s", node_id, timeout)
    if lines:
        raise ClusterError("; ".join(lines) + f" ({SHARED_PATHS_HELP})")
