"""`landcover-serve`: MLflow's scoring server for a landcover model, from this environment.

`mlflow models serve` starts `uvicorn` by name, which fails unless the virtual environment's
`bin` is on PATH; it also needs `--env-manager local` (the model needs this package, which a
fresh environment would not have). This wrapper sets both and the request budget, then hands
over to MLflow:

    .venv/bin/landcover-serve models:/landcover@champion --port 5001
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from landcover.errors import LandcoverError
from landcover.serving.pyfunc import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV


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
    local = checked_copy(args.model)
    command = serve_command(str(local), args.host, args.port, args.workers)
    os.execve(command[0], command, env)


def checked_copy(model: str) -> Path:
    """The model's files in a private folder, its MLmodel checked: MLflow then serves this
    very copy, so nothing can change between the check and the load."""
    import tempfile

    import mlflow

    from landcover.artifacts.mlmodel_guard import check_mlmodel

    folder = Path(tempfile.mkdtemp(prefix="landcover-serve-"))
    local = Path(mlflow.artifacts.download_artifacts(model, dst_path=str(folder)))
    try:
        check_mlmodel(local, require_flavor=True)
    except LandcoverError as err:
        sys.exit(f"error: {model}: {err}")
    return local


if __name__ == "__main__":
    main()
