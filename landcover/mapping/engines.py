"""Where a job's maps are computed: this process (`local`) or a pool of Ray actors (`ray`).

Either way each worker loads the model once and maps one input at a time through the same
`map_one`, so the maps are pixel-identical whatever the engine and the worker count (given the
same torch thread count: `engine.threads`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from landcover.errors import LandcoverError

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


class MapWorker:
    """A model loaded once, mapping task after task (a Ray actor in `engine=ray`)."""

    def __init__(
        self, model: str, tracking_uri: str, device: str, settings: dict, threads: int | None
    ) -> None:
        from landcover.config import PredictSettings
        from landcover.data.scenes import quiet_georeferencing_warnings
        from landcover.predict.loading import load_for_prediction

        quiet_georeferencing_warnings()
        self.settings = PredictSettings(**settings)
        self.model = load_for_prediction(
            model,
            backend=self.settings.backend,
            precision=self.settings.precision,
            batch_size=self.settings.batch_size,
            tracking_uri=tracking_uri,
            device=device,
            threads=threads,
        )

    def map(self, task: Task) -> Outcome:
        """Map one input; any failure is an Outcome with its reason, never an exception."""
        import rasterio

        from landcover.atomic import write_text
        from landcover.predict.predictor import predict_raster

        started = time.perf_counter()
        try:
            result = predict_raster(self.model, task.source, task.output, self.settings)
            table = result.area_table
            output = result.outputs["classes"]
            write_text(output.with_suffix(".areas.csv"), table.to_csv())
            write_text(output.with_suffix(".areas.json"), table.to_json())
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
            model_reference=self.model.reference,
            source_run_id=self.model.source_run_id or "",
        )


def run_local(worker_args: dict[str, Any], tasks: Sequence[Task]) -> Iterator[Outcome]:
    """Every task in this process, in order, the model loaded once."""
    worker = MapWorker(**worker_args)
    for task in tasks:
        yield worker.map(task)


def run_ray(worker_args: dict[str, Any], tasks: Sequence[Task], engine: Any) -> Iterator[Outcome]:
    """Tasks over a pool of Ray actors, each with the model loaded once; a free actor takes the
    next task (dynamic balancing); a dead actor is restarted and its task retried by Ray."""
    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        # RAY_ADDRESS or engine.address: an existing cluster; otherwise one on this machine
        ray.init(
            address=engine.address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    actor = ray.remote(
        num_cpus=engine.cpus_per_worker,
        num_gpus=engine.gpus_per_worker,
        max_restarts=engine.max_restarts,
        max_task_retries=engine.max_restarts,
    )(MapWorker)
    workers = [actor.remote(**worker_args) for _ in range(min(engine.workers, len(tasks)))]
    pool = ActorPool(workers)
    try:
        yield from pool.map_unordered(lambda w, task: w.map.remote(task), list(tasks))
    finally:
        for worker in workers:
            ray.kill(worker)  # type: ignore[arg-type]  # an actor handle, whatever ray's stubs say


def output_for(folder: Path, name: str) -> Path:
    """Where an input's map goes in a job folder."""
    return folder / f"{name}_landcover.tif"
