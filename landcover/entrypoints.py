"""The console scripts: Hydra apps that import nothing heavy until a job runs.

`landcover-train --help` (and shell completion, which runs on every TAB) must not wait for
torch, MLflow, rasterio and smp to import: each app names its work by a dotted path, imported
when the app runs.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from landcover.commands import command_main, imported, run_hydra_app
from landcover.paths import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    from landcover.config import validate_config
    from landcover.errors import ConfigError

    try:
        validate_config(cfg)  # a typo fails in a fraction of a second, before torch loads
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return imported("landcover.training.train:run_job")(cfg)  # type: ignore[return-value]


def train() -> None:
    """`landcover-train`."""
    run_hydra_app(_train_app, help_for=(CONFIG_DIR, "train"))


predict = command_main("landcover.mapping.job:run_predictions", "predict")
evaluate = command_main("landcover.evaluate:run_evaluation", "evaluate")
export = command_main("landcover.interop.export:run_export", "export")
promote = command_main("landcover.registry.promote:run_promotion", "promote")
_import_cntk = command_main("landcover.interop.import_cntk:run_import", "import_cntk")


def import_cntk() -> None:
    """`landcover-import-cntk x.model [key=value ...]`: the model file may come first, bare."""
    arguments = sys.argv[1:]
    if arguments and "=" not in arguments[0] and not arguments[0].startswith("-"):
        sys.argv = [sys.argv[0], f"file={arguments[0]}", *arguments[1:]]
    _import_cntk()
