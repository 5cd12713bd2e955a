"""The console scripts, and what every one of them shares: a Hydra app whose user errors end
as one line.

Each command is a Hydra app over `conf/commands/` whose user errors (bad input, missing model,
bad config value) end as one clear line and a non-zero exit instead of a traceback. This module
imports nothing heavy (no torch, MLflow, rasterio): the work is named by a dotted path and
imported only when the app runs, so `--help` and shell completion answer at once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from landcover import ranks
from landcover.errors import LandcoverError, Stopped, access_refused
from landcover.paths import COMMANDS_CONFIG_DIR, CONFIG_DIR


def imported(target: str) -> Callable[..., object]:
    """`package.module:function` -> the function (imported now, not when the script starts)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def command_main(run: str | Callable[[DictConfig], object], config_name: str) -> Callable[[], None]:
    """`run`: the work, or its dotted path (imported when the app runs). Launched under
    torchrun, rank 0 does the work alone (no duplicated maps or MLflow runs); mapping many
    rasters on many machines is `landcover-predict engine=ray`."""
    log = logging.getLogger(f"landcover.{config_name}")

    @hydra.main(version_base="1.3", config_path=COMMANDS_CONFIG_DIR, config_name=config_name)
    def app(cfg: DictConfig) -> None:
        context = ranks.context_from_env()
        if not context.is_main:
            log.info("rank %d: %s runs on rank 0 only", context.rank, config_name)
            return
        with ending_in_one_line(log):
            from landcover.config import validate_command_config

            cfg = validate_command_config(cfg, config_name)  # before any other check
            tracking_server_answers(cfg)
            quiet_georeferencing_warnings()
            (imported(run) if isinstance(run, str) else run)(cfg)

    def main() -> None:
        run_hydra_app(app, help_for=(COMMANDS_CONFIG_DIR, config_name))

    return main


@contextlib.contextmanager
def ending_in_one_line(log: logging.Logger) -> Iterator[None]:
    """A user's error (bad input, a tracking server refusing the user) ends the command with
    one line and exit 1; anything else keeps its traceback."""
    try:
        yield
    except LandcoverError as err:
        log.error("%s", err)
        discard_run_dir()  # kept if the command had logged anything before its error
        sys.exit(f"error: {err}")
    except Exception as err:
        refused = access_refused(err)
        if refused is None:
            raise
        log.error("%s", refused)
        sys.exit(f"error: {refused}")


def tracking_server_answers(cfg: DictConfig) -> None:
    """A command whose tracking store is a server asks it once, in seconds, before any work:
    MLflow's own client retries a refused connection for about four minutes. A new SQLite
    store is built here, by one process at a time (tracking/sqlite_store.py)."""
    from omegaconf import OmegaConf

    from landcover.reachable import check_tracking_server
    from landcover.tracking.sqlite_store import prepare_sqlite_store

    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    check_tracking_server(uri)
    prepare_sqlite_store(uri)


def discard_run_dir() -> None:
    """Remove the Hydra run folder (`outputs/<date>/<time>/`) of a command refused before any
    work: it holds only Hydra's copy of the config and a log whose only lines are the error the
    terminal showed. A log with anything before the error (a job that ran), or any other file
    (a checkpoint, a map), keeps it; multiruns keep theirs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(".hydra" not in p.relative_to(folder).parts and p.suffix != ".log" for p in files):
        return
    for log_file in (p for p in files if p.suffix == ".log"):
        with contextlib.suppress(OSError):
            if any("[ERROR]" not in line for line in log_file.read_text().splitlines() if line):
                return
    logging.shutdown()  # the log file is closed before it goes
    shutil.rmtree(folder, ignore_errors=True)
    base = Path.cwd().resolve()
    for parent in folder.resolve().parents:  # outputs/<date>/ and outputs/, if left empty
        if parent == base or base not in parent.parents:
            break
        with contextlib.suppress(OSError):
            parent.rmdir()


def stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM handler: raise Stopped where the process is, so cleanup code runs."""
    raise Stopped(signal.Signals(signum).name)


def print_help(config_dir: str, config_name: str) -> None:
    """`--help` without Hydra's: Hydra lists every config group (its own launchers' among them)
    by deep-copying its whole config repository once per group, which takes most of a second;
    this reads the command's config file and lists the groups its defaults name."""
    from omegaconf import OmegaConf

    root = Path(config_dir)
    path = root / f"{config_name}.yaml"
    comments = [line.lstrip("# ") for line in path.read_text().splitlines() if line[:1] == "#"]
    command = Path(sys.argv[0]).name
    summary = comments[0].split(": ", 1)[-1] if comments else config_name
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])  # type: ignore[union-attr]
    used = {str(next(iter(entry))).split("/")[0] for entry in defaults if hasattr(entry, "keys")}
    print(f"{command}: {summary}")
    print(f"\nUsage: {command} [group=option ...] [key=value ...]   (-m for a multirun)\n")
    print("Config groups (group=option):")
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        group = folder.relative_to(root).as_posix()
        options = sorted(f.stem for f in folder.glob("*.yaml") if f.stem != "base")
        if options and group.split("/")[0] in used:
            print(f"  {group}: {', '.join(options)}")
    print(
        "\nEvery key can be set on the command line. `--cfg job` prints the composed config, "
        "`--hydra-help` Hydra's own options."
    )


def run_hydra_app(
    app: Callable[[], object],
    help_for: tuple[str, str] | None = None,
) -> None:
    """What every console script does around its Hydra app: quiet GDAL's georeferencing
    warnings, give torchrun's other ranks no output folder of their own, treat SIGTERM like
    Ctrl-C (open runs end KILLED, staging is removed) and end either with one line, leave the
    process group however the app ends."""
    # numexpr (pandas imports it when installed) says how many threads it takes at INFO in
    # every command's log: noise, and a refused command's log must hold only its error
    logging.getLogger("numexpr").setLevel(logging.WARNING)
    for argument in sys.argv[1:]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            sys.exit(
                f"error: argument {shown!r} is not valid UTF-8 (a file name in another "
                "encoding?): Hydra reads UTF-8 only; rename the file or link it under a UTF-8 name"
            )
    if help_for is not None and {"--help", "-h"} & set(sys.argv[1:]):
        try:
            print_help(*help_for)
            sys.stdout.flush()
        except BrokenPipeError:  # `landcover-train --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    import landcover.config  # noqa: F401  (registers the schemas composition checks against)

    one_line_composition_errors()
    overrides = ranks.hydra_overrides_for_rank(ranks.context_from_env())
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
        if "torch.distributed" in sys.modules:  # only a run that imported torch can hold a group
            from landcover.training.distributed import shutdown

            shutdown()
        ranks.remove_rank_scratch(overrides)


def one_line_composition_errors() -> None:
    """A wrong type or unknown key on the command line (`trainer.max_epochs=many`) fails while
    Hydra composes, before any app code; Hydra reports it over five lines. Report it as every
    other config error is: one line naming the key, exit 1. Other errors keep Hydra's report.
    """
    from hydra._internal import utils as hydra_utils
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    original = getattr(hydra_utils, "_landcover_original_run_and_report", None)
    if original is None:
        original = hydra_utils.run_and_report
        hydra_utils._landcover_original_run_and_report = original  # type: ignore[attr-defined]

    def run_and_report(func: Callable[[], object]) -> object:
        def composed() -> object:
            try:
                return func()
            except CompactHydraException as err:
                if isinstance(err.__cause__, OmegaConfBaseException):
                    from landcover.config import one_line

                    sys.exit(f"error: {one_line(err.__cause__)}")
                raise

        return original(composed)

    hydra_utils.run_and_report = run_and_report


def quiet_georeferencing_warnings() -> None:
    """Silence rasterio's warning for ungeoreferenced patches (the real sample has none); imported
    late to keep `--help` fast."""
    from landcover.data.scenes import quiet_georeferencing_warnings as quiet

    quiet()


# -- the console scripts ([project.scripts] in pyproject.toml) ------------------------------


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    from landcover.config import validate_config

    try:
        validate_config(cfg)  # a typo fails in a fraction of a second, before torch loads
        tracking_server_answers(cfg)
    except LandcoverError as err:
        discard_run_dir()
        sys.exit(f"error: {err}")
    return imported("landcover.training.train:run_job")(cfg)  # type: ignore[return-value]


def train() -> None:
    """`landcover-train`."""
    run_hydra_app(_train_app, help_for=(CONFIG_DIR, "train"))


predict = command_main("landcover.mapping.job:run_predictions", "predict")
evaluate = command_main("landcover.evaluate:run_evaluation", "evaluate")
export = command_main("landcover.interop.export:run_export", "export")
package = command_main("landcover.interop.package:run_package", "package")
promote = command_main("landcover.registry.promote:run_promotion", "promote")
champion = command_main("landcover.registry.champion:run_champion", "champion")
_import_cntk = command_main("landcover.interop.import_cntk:run_import", "import_cntk")


def import_cntk() -> None:
    """`landcover-import-cntk x.model [key=value ...]`: the model file may come first, bare."""
    arguments = sys.argv[1:]
    if arguments and "=" not in arguments[0] and not arguments[0].startswith("-"):
        sys.argv = [sys.argv[0], f"file={arguments[0]}", *arguments[1:]]
    _import_cntk()
