"""`landcover-studio`: look at a scene and its map, paint corrections, teach the model.

    .venv/bin/landcover-studio data/synthetic/val/synth_000_naip.tif \
        --model models:/landcover@champion

opens http://127.0.0.1:8765/ with the imagery (true colour and NIR false colour), the model's
map in its own colours and its confidence; keys 1-9 pick a class, B brush, P polygon, A accept
the map's classes in a region, Ctrl+Z undo, R retrain. Everything is kept in the session folder
(`studio/<image name>/` by default) and every retrain is an MLflow run; `landcover-train
data=corrections data.root=<session folder>` trains on the corrections.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from landcover.errors import LandcoverError

log = logging.getLogger("landcover.studio")
STATIC = Path(__file__).parent / "static"
TRAINABLE_KEYS = "123456789"


def create_app(session: Any, settings: argparse.Namespace) -> Any:
    """The page, its tiles and its API over one open session."""
    from landcover.predict.writer import colormap
    from landcover.studio import tiles
    from landcover.studio.access import TeamCredentials
    from landcover.studio.edits import EditError, stroke_geometry
    from landcover.studio.retrain import retrain
    from landcover.studio.session import StudioError

    app = FastAPI(title="landcover-studio", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    stretch = tiles.Stretch.of(session.image)
    maxzoom = tiles.max_zoom(session.image)
    team = TeamCredentials(settings.tracking_uri) if settings.allow_remote else None
    colours = colormap(session.schema)
    corrections_colours = session.edits.colormap()
    retraining = threading.Lock()

    @app.middleware("http")
    async def members_only(request: Request, call_next: Any) -> Any:
        if team is not None and request.url.path != "/health":
            member = team.member(request.headers.get("authorization"))
            if member is None:
                return Response(
                    "sign in with your team server's user name and password",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="landcover-studio"'},
                )
            request.state.author = member
        else:
            request.state.author = settings.author
        return await call_next(request)

    @app.exception_handler(LandcoverError)
    async def one_line(_request: Request, err: LandcoverError) -> JSONResponse:
        status = 409 if "already running" in str(err) else 400
        return JSONResponse({"error": str(err)}, status_code=status)

    @app.get("/health")
    def health() -> Response:  # for load balancers and tests: says nothing about the scene
        return Response("ok", media_type="text/plain")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def classes() -> list[dict[str, Any]]:
        keys = iter(TRAINABLE_KEYS)
        return [
            {
                "index": i,
                "name": info.name,
                "color": info.color,
                "trainable": not info.ignore,
                "key": None if info.ignore else next(keys, None),
            }
            for i, info in enumerate(session.schema.classes)
        ]

    def state(request: Request) -> dict[str, Any]:
        return {
            "image": session.image.name,
            "width": session.features.width,
            "height": session.features.height,
            "maxzoom": maxzoom,
            "classes": classes(),
            "version": session.version.to_dict(),
            "versions": len(session.versions),
            "current": session.current,
            "edits": len(session.edits.active()),
            "author": request.state.author,
            "session": str(session.folder),
            "train_command": train_command(session),
        }

    @app.get("/api/scene")
    def scene(request: Request) -> dict[str, Any]:
        return state(request)

    @app.get("/tiles/{layer}/{version}/{z}/{x}/{y}.png")
    def tile(layer: str, version: str, z: int, x: int, y: int) -> Response:
        found = next((v for v in session.versions if v.id == version), None)
        if layer in tiles.IMAGERY:
            data = tiles.imagery_tile(session.image, layer, stretch, x, y, z)
        elif layer == "corrections":
            data = tiles.class_tile(session.edits.raster, corrections_colours, x, y, z)
        elif layer in ("classes", "confidence") and found is not None:
            classes_path, confidence_path = session.map_paths(found)
            data = (
                tiles.class_tile(classes_path, colours, x, y, z)
                if layer == "classes"
                else tiles.confidence_tile(confidence_path, x, y, z)
            )
        else:
            raise HTTPException(404, f"no layer {layer!r} of version {version!r}")
        if data is None:
            return Response(status_code=204)
        cache = "no-store" if layer == "corrections" else "max-age=3600"
        return Response(data, media_type="image/png", headers={"Cache-Control": cache})

    @app.get("/api/pixel")
    def pixel(col: int, row: int) -> dict[str, Any]:
        if not (0 <= col < session.features.width and 0 <= row < session.features.height):
            raise HTTPException(404, "outside the image")
        probabilities = session.features.probabilities_at(
            row, col, session.head_of(session.version)
        )
        index = int(probabilities.argmax())
        corrected = session.edits.label_at(row, col)
        return {
            "col": col,
            "row": row,
            "class_index": index,
            "class_name": session.schema.classes[index].name,
            "confidence": round(float(probabilities[index]), 4),
            "corrected_code": None if corrected == session.edits.nodata else corrected,
        }

    @app.post("/api/edits")
    async def add_edit(request: Request) -> dict[str, Any]:
        body = await request.json()
        kind = str(body.get("kind", "paint"))
        if kind not in ("paint", "polygon", "accept"):
            raise EditError(f"unknown edit kind {kind!r} (paint, polygon, accept)")
        geometry = stroke_geometry(kind, body.get("points") or [], float(body.get("radius", 0)))
        tab = str(body.get("tab", ""))[:64]
        author = request.state.author
        if kind == "accept":
            stroke, pixels = session.edits.accept(
                geometry, session.class_indices(), author=author, tab=tab
            )
        else:
            stroke, pixels = session.edits.add(
                geometry, int(body.get("class_index", -1)), author=author, tab=tab, kind=kind
            )
        return {"stroke": stroke, "pixels": pixels, "edits": len(session.edits.active())}

    @app.post("/api/undo")
    async def undo(request: Request) -> dict[str, Any]:
        body = await request.json()
        stroke = session.edits.undo(author=request.state.author, tab=str(body.get("tab", "")))
        return {"undone": stroke, "edits": len(session.edits.active())}

    @app.post("/api/retrain")
    def do_retrain(request: Request) -> dict[str, Any]:
        if not retraining.acquire(blocking=False):
            raise StudioError("a retrain is already running")
        try:
            version, report, seconds = retrain(
                session, settings.tracking_uri, settings.experiment, request.state.author
            )
        finally:
            retraining.release()
        log.info(
            "retrain %s: %d corrected pixels, %.1f s, %d pixels changed",
            version.run_id,
            report.corrected_pixels,
            seconds,
            report.changed_pixels,
        )
        return {
            **state(request),
            "report": {**report.__dict__, "seconds": round(seconds, 2)},
        }

    @app.post("/api/undo-retrain")
    def undo_retrain(request: Request) -> dict[str, Any]:
        with retraining:
            undone = session.step_back()
        if undone is None:
            raise StudioError("no retrain to undo: this is the model the session started from")
        if undone.run_id:
            from mlflow.tracking import MlflowClient

            MlflowClient(settings.tracking_uri).set_tag(
                undone.run_id, "landcover.studio.undone", "true"
            )
        return state(request)

    return app


def train_command(session: Any) -> str:
    """The full training that learns from this session's corrections."""
    data = "corrections_mixed" if session.edits.base_labels else "corrections"
    arch = session.metadata.get("model", {}).get("arch", "unet")
    return (
        f"landcover-train data={data} data.root={session.folder.resolve()} "
        f"data/schema={session.schema.name} model={arch} init.model={session.version.model}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (a plain parser: the studio is a server, not a Hydra job)."""
    from landcover.locks import absolute_sqlite_url

    parser = argparse.ArgumentParser(
        prog="landcover-studio", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("image", type=Path, help="the scene: a 4-band GeoTIFF")
    parser.add_argument(
        "--model", required=True, help="run id, runs:/ or models:/ URI, .pt or CNTK .model file"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        help="the scene's original labels: corrections are also laid "
        "over them (mixed.csv, for data=corrections_mixed)",
    )
    parser.add_argument(
        "--window",
        type=int,
        nargs=4,
        metavar=("COL", "ROW", "WIDTH", "HEIGHT"),
        help="correct this area of a large scene (pixel offsets, as gdal_translate -srcwin): "
        "it is cut once into the session folder, on the image's grid",
    )
    parser.add_argument(
        "--session",
        type=Path,
        help="folder of the session (default studio/<image>, or "
        "studio/<image>_<col>_<row>_<width>x<height> with --window)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="listen beyond loopback; members then sign in with team server credentials",
    )
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    parser.add_argument("--experiment", default="landcover-studio")
    parser.add_argument("--author", default=None, help="author of edits (default: your login)")
    args = parser.parse_args(argv)
    args.tracking_uri = absolute_sqlite_url(args.tracking_uri)
    args.author = args.author or getpass.getuser()
    if args.session is None:
        name = args.image.stem
        if args.window:
            col, row, width, height = args.window
            name = f"{name}_{col}_{row}_{width}x{height}"
        args.session = Path("studio") / name
    return args


def main(argv: list[str] | None = None) -> None:
    """Open the session, close what a killed predecessor left open, serve the page."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "pyogrio", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        from landcover.data.scenes import quiet_georeferencing_warnings
        from landcover.studio.access import check_bind
        from landcover.studio.retrain import close_orphaned_runs
        from landcover.studio.session import Session

        quiet_georeferencing_warnings()
        check_bind(args.host, args.allow_remote, args.tracking_uri)
        if not args.image.is_file():
            raise LandcoverError(f"{args.image}: no such image file")
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        held = hold_session(args.session, args.port)  # kept open as long as this process
        started = time.perf_counter()
        image, labels = args.image, args.labels
        if args.window:
            from landcover.studio.window import cut_scene

            image, labels = cut_scene(image, labels, tuple(args.window), args.session)
            log.info("window %s of %s: %s", " ".join(map(str, args.window)), args.image, image)
        session = Session.open(image, args.model, args.session, args.tracking_uri, log, labels)
        closed = close_orphaned_runs(session, args.tracking_uri, args.experiment)
        if closed:
            log.info("%d retrain run(s) left RUNNING by a stopped studio ended FAILED", closed)
        app = create_app(session, args)
    except LandcoverError as err:
        sys.exit(f"error: {err}")
    import uvicorn

    log.info(
        "%s: %d edits, model %s (%.1f s to open)",
        session.folder,
        len(session.edits.active()),
        session.version.model,
        time.perf_counter() - started,
    )
    log.info("landcover-studio: http://%s:%d/", args.host, args.port)
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    os.close(held)


def hold_session(folder: Path, port: int) -> int:
    """One studio server per session folder (tabs and people share that server): a second
    server would keep its own model versions and maps apart. Returns the lock's descriptor,
    kept open as long as the server runs."""
    from landcover.locks import hold_folder

    busy = "open in another landcover-studio ({holder}): open that one's page"
    return hold_folder(folder, ".server.lock", busy, detail=f", port {port}")


if __name__ == "__main__":
    main()
