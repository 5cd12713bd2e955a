"""Console-script entry points of the mapping commands (predict, evaluate, export).

Each is a Hydra app over `conf/commands/` whose user errors (bad input, missing model, bad
config value) end as one clear line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from landcover import distributed as dist
from landcover.data.scenes import quiet_georeferencing_warnings
from landcover.errors import LandcoverError, Stopped
from landcover.paths import COMMANDS_CONFIG_DIR


def command_main(
    run: Callable[[DictConfig], object], config_name: str, *, distributed: bool = False
) -> Callable[[], None]:
    """`distributed`: the command splits its work across torchrun's ranks itself; otherwise,
    launched under torchrun, rank 0 does the work alone (no duplicated maps or MLflow runs)."""
    log = logging.getLogger(f"landcover.{config_name}")

    @hydra.main(version_base="1.3", config_path=COMMANDS_CONFIG_DIR, config_name=config_name)
    def app(cfg: DictConfig) -> None:
        context = dist.context_from_env()
        if not distributed and not context.is_main:
            log.info("rank %d: %s runs on rank 0 only", context.rank, config_name)
            return
        try:
            run(cfg)
        except (LandcoverError, ValueError) as err:
            log.error("%s", err)
            sys.exit(f"error: {err}")

    def main() -> None:
        run_hydra_app(app)

    return main


def stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM handler: raise Stopped where the process is, so cleanup code runs."""
    raise Stopped(signal.Signals(signum).name)


def run_hydra_app(app: Callable[[], object]) -> None:
    """What every console script does around its Hydra app: quiet GDAL's georeferencing
    warnings, give torchrun's other ranks no output folder of their own, treat SIGTERM like
    Ctrl-C (open runs end KILLED, staging is removed) and end either with one line, leave the
    process group however the app ends."""
    quiet_georeferencing_warnings()
    for argument in sys.argv[1:]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            sys.exit(
                f"error: argument {shown!r} is not valid UTF-8 (a file name in another "
                "encoding?): Hydra reads UTF-8 only; rename the file or link it under a UTF-8 name"
            )
    overrides = dist.hydra_overrides_for_rank(dist.context_from_env())
    sys.argv += overrides
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, stop_on_signal)
    try:
        app()
    except KeyboardInterrupt as stop:
        name = str(stop) or "SIGINT"
        print(f"error: stopped by {name}; open MLflow runs ended KILLED", file=sys.stderr)
        sys.exit(128 + int(getattr(signal, name, signal.SIGINT)))
    finally:
        dist.shutdown()
        dist.remove_rank_scratch(overrides)
