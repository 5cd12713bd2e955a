"""System metrics (CPU, memory, disk, network, GPU) for runs that are recorded once, at the end.

Training opens its run first and lets MLflow's own monitor log `system/*` live
(`mlflow.start_run(log_system_metrics=True)`). A mapping job is recorded in one go after its
work, so that a killed job leaves no RUNNING run; this sampler collects the same monitors'
readings while the job works and hands them to the run when it is written, with their times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def system_monitors_available() -> bool:
    """MLflow's monitors need psutil (a dependency; absent only in a hand-made environment)."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class SystemSamples:
    """(wall-clock ms, {system/<name>: value}) pairs, one per interval."""

    interval: float
    samples: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def log_to(self, run_id: str, tracking_uri: str) -> None:
        """Write the samples to the run as `system/*` metrics, step = sample index."""
        if not self.samples:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        metrics = [
            Metric(key, value, timestamp, step)
            for step, (timestamp, values) in enumerate(self.samples)
            for key, value in values.items()
        ]
        client = MlflowClient(tracking_uri)
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            client.log_batch(run_id, metrics=metrics[start : start + 1000])


@contextmanager
def sampling(interval: float, enabled: bool = True) -> Iterator[SystemSamples]:
    """Sample MLflow's system monitors every `interval` seconds in a daemon thread (one more
    sample when the block ends, so a short job has at least one)."""
    samples = SystemSamples(interval)
    if not enabled or not system_monitors_available():
        yield samples
        return
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    parts = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        parts.append(GPUMonitor())  # NVIDIA through nvidia-ml-py, where a GPU is there
    except Exception:
        log.debug("no NVIDIA GPU to sample")
    stop = threading.Event()

    def take() -> None:
        values: dict[str, float] = {}
        for monitor in parts:
            try:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
            except Exception as err:  # a monitor that fails must not fail the job
                log.debug("system metrics: %s", err)
            monitor.clear_metrics()
        samples.samples.append(
            (int(time.time() * 1000), {f"system/{k}": float(v) for k, v in values.items()})
        )

    def loop() -> None:
        while not stop.wait(interval):
            take()

    thread = threading.Thread(target=loop, name="landcover-system-metrics", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=interval + 5)
        take()
