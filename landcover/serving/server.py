"""`landcover-serve`: MLflow's scoring server for a landcover model, from this environment.

`mlflow models serve` starts `uvicorn` by name, which fails unless the virtual environment's
`bin` is on PATH; it also needs `--env-manager local` (the model needs this package, which a
fresh environment would not have). This wrapper sets both and the request budget, checks a
private copy of the model, runs MLflow's server on that copy and removes it when the server
ends:

    .venv/bin/landcover-serve models:/landcover@champion --port 5001
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from landcover.errors import LandcoverError
from landcover.serving.pyfunc import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV

COPY_PREFIX = "landcover-serve-"
OWNER_FILE = ".owner-pid"


def serve_command(model: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow models serve` command line for a model, with our pixel budget."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [
        str(mlflow),
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "--host",
        host,
        "-p",
        str(port),
        "--workers",
        str(workers),
    ]


def main(argv: list[str] | None = None) -> None:
    """`landcover-serve MODEL`: serve a model over HTTP through MLflow."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/name@alias, models:/name/N or runs:/<id>/model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)),
        help="largest request, in pixels (patches x height x width); larger ones get HTTP 400",
    )
    args = parser.parse_args(argv)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        MAX_PIXELS_ENV: str(args.max_pixels),
    }
    remove_stale_copies()
    folder = Path(tempfile.mkdtemp(prefix=COPY_PREFIX))
    try:
        (folder / OWNER_FILE).write_text(str(os.getpid()))
        local = checked_copy(args.model, folder)
        command = serve_command(str(local), args.host, args.port, args.workers)
        sys.exit(serve_until_stopped(command, env))
    except LandcoverError as err:
        sys.exit(f"error: {args.model}: {err}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_until_stopped(command: list[str], env: dict[str, str]) -> int:
    """MLflow's server as a child (not exec'd: the private copy is removed when it ends);
    SIGTERM and Ctrl-C are passed on to it. Returns its exit status."""
    child = subprocess.Popen(command, env=env)

    def pass_on(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, pass_on)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # pragma: no cover - the handler above takes SIGINT
            child.send_signal(signal.SIGINT)


def checked_copy(model: str, folder: Path) -> Path:
    """The model's files in a private folder, its MLmodel and its metadata checked: MLflow
    then serves this very copy, so nothing can change between the check and the load, and a
    model out of bounds is one line here instead of a traceback in MLflow's worker."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from landcover.artifacts.bounds import check_stored_model
    from landcover.artifacts.files import METADATA_FILE
    from landcover.artifacts.mlmodel_guard import check_mlmodel
    from landcover.reachable import check_tracking_server

    if not Path(model).exists():
        check_tracking_server(mlflow.get_tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(model, dst_path=str(folder)))
    except (MlflowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LandcoverError(f"cannot be read: {first}") from None
    check_mlmodel(local, require_flavor=True)
    described = local / METADATA_FILE
    try:
        metadata = json.loads(described.read_text())
    except (OSError, ValueError) as err:
        raise LandcoverError(f"{described}: unreadable model metadata ({err})") from None
    model_config = metadata.get("model") if isinstance(metadata, dict) else None
    check_stored_model(metadata, model_config, str(described))
    return local


def remove_stale_copies() -> None:
    """Copies left by a server that was killed (SIGKILL, a power cut) are removed by the next:
    each names its owner's pid, and a folder whose owner is gone is nobody's."""
    for folder in Path(tempfile.gettempdir()).glob(f"{COPY_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (unreadable, another user's, being written)


if __name__ == "__main__":
    main()
