"""Every multirun is browsable: one MLflow parent run, children named by their overrides.

Our Optuna sweeper keeps one parent run per study (across workers and re-runs). Any other
sweeper, Hydra's basic grid (`landcover-train -m model=unet,fpn`) included, gets one parent
per multirun from `ParentRunCallback`, a Hydra callback that runs in the process that sweeps:
it opens the parent before the first job and closes it after the last with a table of its
children. Jobs find the parent through an environment variable (inherited by local, joblib,
submitit and Ray-started processes) or, failing that, a file in the sweep folder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_ENV = "LANDCOVER_MULTIRUN_PARENT"
PARENT_FILE = "mlflow_parent_run.json"
OUR_SWEEPER = "LandcoverOptunaSweeper"
INTERNAL_PREFIXES = ("++trial.", "trial.")  # set by the Optuna sweeper, not by the user


def job_overrides() -> list[str]:
    """The overrides this job was composed with (the command line's, or one sweep point)."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def user_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides a user typed (not Hydra's or our sweeper's): what names a child run."""
    return [o for o in overrides if not o.startswith(INTERNAL_PREFIXES)]


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """Keys that a multirun's overrides sweep (`model=unet,fpn`, `x=range(1,4)`)."""
    parser = OverridesParser.create()
    keys = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - a key we cannot parse is simply not named
            continue
        if override.is_sweep_override():
            keys.append(override.get_key_element().lstrip("+~"))
    return keys


def child_run_name(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """`model=fpn,optimizer.lr=0.001`: this job's values of the swept keys."""
    chosen = [o.lstrip("+~") for o in overrides if o.lstrip("+~").split("=", 1)[0] in keys]
    return ",".join(chosen) or ",".join(user_overrides(overrides)) or "default"


def _sweep_dir(hydra_cfg: Any) -> Path:
    """The multirun's folder (`hydra.sweep.dir`, relative to where the command started)."""
    directory = Path(str(hydra_cfg.sweep.dir))
    if not directory.is_absolute():
        directory = Path(str(hydra_cfg.runtime.cwd)) / directory
    return directory


def job_parent() -> tuple[str, list[str]] | None:
    """(parent run id, swept keys) of the multirun this job belongs to, if any."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
        return None
    text = os.environ.get(PARENT_ENV)
    if text is None:
        path = _sweep_dir(hydra_cfg) / PARENT_FILE
        if not path.exists():
            return None
        text = path.read_text()
    record = json.loads(text)
    return record["parent_run_id"], list(record["swept_keys"])


class ParentRunCallback(Callback):
    """Opens and closes one MLflow parent run around a multirun of any sweeper but ours."""

    def __init__(self) -> None:
        self.parent: str | None = None
        self.uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run that every job of this multirun nests under."""
        if str(config.hydra.sweeper.get("_target_", "")).endswith(OUR_SWEEPER):
            return  # the Optuna sweeper keeps one parent per study itself
        from landcover.sweep import records

        overrides = [str(o) for o in config.hydra.overrides.task]
        keys = swept_keys(overrides)
        self.uri = str(config.tracking.uri)
        directory = _sweep_dir(config.hydra)
        self.parent = records.create_parent(
            self.uri,
            str(config.tracking.experiment),
            run_name=f"multirun {' '.join(overrides)}"[:250],
            tags={
                "landcover.kind": "multirun",
                "landcover.overrides": " ".join(overrides),
                "landcover.multirun_dir": str(directory),
            },
            params={"overrides": " ".join(overrides), "swept_keys": ",".join(keys)},
        )
        record = json.dumps({"parent_run_id": self.parent, "swept_keys": keys})
        os.environ[PARENT_ENV] = record
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PARENT_FILE).write_text(record)
        atexit.register(self._close, "FAILED")
        log.info("MLflow parent run %s for this multirun", self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the children table and close the parent run."""
        if self.parent is None:
            return
        from landcover.sweep import records

        records.log_multirun_summary(
            self.uri or "",
            self.parent,
            str(config.trainer.monitor),
            str(config.trainer.monitor_mode),
        )
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.parent is None:
            return
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).set_terminated(self.parent, status)
        os.environ.pop(PARENT_ENV, None)
        self.parent = None
