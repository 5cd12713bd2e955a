"""Where a job's maps are computed: this process (`local`) or a pool of Ray actors (`ray`).

On Ray the pool is ours, not Ray's `ActorPool`: a lost node must cost only its rasters'
re-runs, never the job (Ray's pool raises out of the whole map, and restarts an actor where
the cluster may have no room left, waiting for ever).

Either way each worker loads the model once and maps one input at a time through the same
`map_one`, so the maps are pixel-identical whatever the engine and the worker count (given the
same torch thread count: `engine.threads`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from landcover.errors import LandcoverError, last_line

if TYPE_CHECKING:
    from landcover.cluster import JobEnvironment

log = logging.getLogger("landcover.mapping")


@dataclass(frozen=True)
class Task:
    """One input to map and where its map goes."""

    source: str
    output: str


@dataclass(frozen=True)
class Outcome:
    """What came back for a task: its numbers, or the one-line reason it failed."""

    task: Task
    pixels: int = 0
    seconds: float = 0.0
    width: int = 0
    height: int = 0
    crs: str = ""
    warning: str = ""
    error: str = ""
    model_reference: str = ""  # what the worker loaded, for the job's record
    source_run_id: str = ""
    node: str = ""  # the Ray node that mapped it (empty on the local engine)
    bytes: int = 0  # the published map's size and CRC-32 (read back whole before publishing)
    checksum: str = ""


class MapWorker:
    """A model loaded once, mapping task after task (a Ray actor in `engine=ray`)."""

    def __init__(
        self,
        model: str,
        tracking_uri: str,
        device: str,
        settings: dict,
        threads: int | None,
        environment: JobEnvironment | None = None,
    ) -> None:
        from landcover.config import PredictSettings
        from landcover.data.scenes import quiet_georeferencing_warnings
        from landcover.predict.runnable import runnable_model

        if environment is not None:
            environment.apply()  # credentials and paths of the driver, before loading
        quiet_georeferencing_warnings()
        self.settings = PredictSettings(**settings)
        self.model = runnable_model(
            model,
            backend=self.settings.backend,
            precision=self.settings.precision,
            batch_size=self.settings.batch_size,
            tracking_uri=tracking_uri,
            device=device,
            threads=threads,
        )

    def where(self) -> str:
        """The node this worker runs on (asked once the model is loaded: the worker is ready)."""
        from landcover.cluster import node_label

        return node_label()

    def map(self, task: Task) -> Outcome:
        """Map one input; any failure is an Outcome with its reason, never an exception."""
        import rasterio

        from landcover.atomic import file_checksum, write_text
        from landcover.predict.predictor import predict_raster

        started = time.perf_counter()
        try:
            with readable_name(task.source) as source:
                result = predict_raster(self.model, source, task.output, self.settings)
            table = result.area_table
            output = result.outputs["classes"]
            write_text(output.with_suffix(".areas.csv"), table.to_csv())
            write_text(output.with_suffix(".areas.json"), table.to_json())
            size, checksum = output.stat().st_size, file_checksum(output)
        except (LandcoverError, rasterio.errors.RasterioError, OSError, ValueError) as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            return Outcome(
                task,
                seconds=time.perf_counter() - started,
                error=reason[:500],
                model_reference=self.model.reference,
                source_run_id=self.model.source_run_id or "",
            )
        return Outcome(
            task,
            pixels=result.pixels,
            seconds=result.seconds,
            width=result.width,
            height=result.height,
            crs=result.crs,
            warning=result.warning or "",
            bytes=size,
            checksum=checksum,
            model_reference=self.model.reference,
            source_run_id=self.model.source_run_id or "",
        )


@contextlib.contextmanager
def readable_name(source: str) -> Iterator[str]:
    """`source`, or where its name is not UTF-8 (GDAL takes UTF-8 names only) a link to it
    under a UTF-8 name in a private temporary folder."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="landcover-input-") as folder:
            link = Path(folder) / f"input{Path(source).suffix.encode('ascii', 'ignore').decode()}"
            os.symlink(os.fsencode(os.path.abspath(source)), link)
            yield str(link)
        return
    yield source


def run_local(worker_args: dict[str, Any], tasks: Sequence[Task]) -> Iterator[Outcome]:
    """Every task in this process, in order, the model loaded once."""
    worker = MapWorker(**worker_args)
    for task in tasks:
        yield worker.map(task)


def run_ray(worker_args: dict[str, Any], tasks: Sequence[Task], engine: Any) -> Iterator[Outcome]:
    """Tasks over a pool of Ray actors, each with the model loaded once; a free actor takes the
    next task. A worker that dies or whose node is lost is dropped and its raster re-queued on
    the survivors (up to `engine.max_restarts` times per raster); a replacement worker joins if
    the cluster has room for one, and the pool shrinks when it has not, instead of waiting for
    resources that will not come."""
    import ray

    from landcover.cluster import check_every_node, connect, requested_address

    del ray  # imported here so that a missing extra fails before the pool starts
    # workers on other nodes work elsewhere: they get absolute paths, and answers come back
    # under the task the caller gave
    given = {_absolute(task): task for task in tasks}
    connect(engine.address)
    if requested_address(engine.address):  # a Ray started here sees what this process sees
        check_every_node(*_shared_paths(worker_args, list(given)))
    pool = _Pool(worker_args, engine, min(int(engine.workers), len(tasks)))
    try:
        for outcome in pool.run(list(given)):
            yield replace(outcome, task=given[outcome.task])
    finally:
        pool.close()


def _absolute(task: Task) -> Task:
    source = task.source if "://" in task.source else os.path.abspath(task.source)
    return Task(source, os.path.abspath(task.output))


def _shared_paths(worker_args: dict[str, Any], tasks: Sequence[Task]) -> tuple[list, list]:
    """What every node must read (local inputs, a model file, a SQLite store) and write (the
    output folders)."""
    from landcover.locks import sqlite_path

    readable = [t.source for t in tasks if "://" not in t.source]
    model = str(worker_args["model"])
    if Path(model).suffix.lower() in (".pt", ".onnx", ".model") and "://" not in model:
        readable.append(model)
    store = sqlite_path(str(worker_args["tracking_uri"]))
    if store is not None and store.exists():
        readable.append(str(store))
    writable = sorted({str(Path(t.output).parent) for t in tasks})
    return readable, writable


class _Pool:
    """The Ray actors of one job and the tasks in flight on them."""

    def __init__(self, worker_args: dict[str, Any], engine: Any, size: int) -> None:
        import ray

        self.ray = ray
        self.engine = engine
        self.worker_args = worker_args
        self.actor_class = ray.remote(
            num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, max_restarts=0
        )(MapWorker)
        self.starting: dict[Any, tuple[Any, float]] = {}  # ready ref -> (actor, started at)
        self.idle: list[Any] = []
        self.busy: dict[Any, tuple[Any, Task]] = {}  # result ref -> (actor, task)
        self.nodes: dict[Any, str] = {}  # actor -> node label
        self.losses: dict[Task, int] = {}
        self.placed_once = False
        for _ in range(size):
            self._start_actor()

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(**self.worker_args)
        self.starting[actor.where.remote()] = (actor, time.monotonic())  # type: ignore[attr-defined]

    def run(self, tasks: list[Task]) -> Iterator[Outcome]:
        """Yield an Outcome per task, in the order they end."""
        queue = list(tasks)
        timeout = float(self.engine.placement_timeout)
        while queue or self.busy:
            while self.idle and queue:
                actor = self.idle.pop()
                task = queue.pop(0)
                self.busy[actor.map.remote(task)] = (actor, task)
            if not self.busy and not self.starting:
                for task in queue:  # nothing left to run them on
                    yield Outcome(task, error=self._no_worker_reason())
                return
            refs = list(self.busy) + list(self.starting)
            done, _ = self.ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.starting:
                    self._started(ref)
                    continue
                actor, task = self.busy.pop(ref)
                try:
                    outcome = self.ray.get(ref)
                except self.ray.exceptions.RayError as err:
                    lost = self._lose(actor, err)
                    self.losses[task] = self.losses.get(task, 0) + 1
                    if self.losses[task] > int(self.engine.max_restarts):
                        times = self.losses[task]
                        yield Outcome(task, error=f"its worker was lost {times} times: {lost}")
                    else:
                        log.warning("%s: re-queued (%s)", task.source, lost)
                        queue.insert(0, task)
                    continue
                self.idle.append(actor)
                yield replace(outcome, node=self.nodes.get(actor, outcome.node))
            self._drop_unplaced(timeout)

    def _started(self, ref: Any) -> None:
        actor, _ = self.starting.pop(ref)
        try:
            self.nodes[actor] = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as err:
            reason = _first_line(err)
            if not self.placed_once and not self.starting and not self.idle and not self.busy:
                raise ClusterWorkerError(f"no Ray worker could load the model: {reason}") from err
            log.warning("a Ray worker could not start: %s", reason)
            return
        self.placed_once = True
        self.idle.append(actor)
        log.info("Ray worker ready on node %s", self.nodes[actor])

    def _lose(self, actor: Any, err: Exception) -> str:
        node = self.nodes.pop(actor, "unknown node")
        self.ray.kill(actor)
        reason = f"worker on node {node} lost: {_first_line(err)}"
        log.warning("%s; %d worker(s) left", reason, len(self.idle) + len(self.busy))
        if self._room_for_a_worker():
            self._start_actor()
        return reason

    def _room_for_a_worker(self) -> bool:
        free = self.ray.available_resources()
        return float(free.get("CPU", 0)) >= float(self.engine.cpus_per_worker) and float(
            free.get("GPU", 0)
        ) >= float(self.engine.gpus_per_worker)

    def _drop_unplaced(self, timeout: float) -> None:
        """Workers the cluster has had no room for within `engine.placement_timeout` are given
        up (the pool shrinks) once another worker runs; with none running the job fails."""
        now = time.monotonic()
        for ref, (actor, started) in list(self.starting.items()):
            if now - started < timeout:
                continue
            del self.starting[ref]
            self.ray.kill(actor)
            if not self.idle and not self.busy and not self.starting:
                raise ClusterWorkerError(
                    f"no Ray worker could be placed within engine.placement_timeout={timeout:g} "
                    f"s (each asks for {self.engine.cpus_per_worker} CPU and "
                    f"{self.engine.gpus_per_worker} GPU; free now: "
                    f"{self.ray.available_resources()})"
                )
            log.warning(
                "a Ray worker found no room within %g s: mapping with %d worker(s)",
                timeout,
                len(self.idle) + len(self.busy),
            )

    def _no_worker_reason(self) -> str:
        return "no Ray worker left to map it (every worker was lost)"

    def close(self) -> None:
        """Stop every actor of the job, placed or not."""
        actors = [a for a, _ in self.starting.values()] + self.idle
        actors += [a for a, _ in self.busy.values()]
        for actor in actors:
            self.ray.kill(actor)


class ClusterWorkerError(LandcoverError):
    """No Ray worker could run the job (none placed, or none could load the model)."""


def _first_line(err: BaseException) -> str:
    # Ray wraps the cause: its own last line is the one that says what happened
    return last_line(str(err), limit=300) or type(err).__name__


def output_for(folder: Path, name: str) -> Path:
    """Where an input's map goes in a job folder."""
    return folder / f"{name}_landcover.tif"
