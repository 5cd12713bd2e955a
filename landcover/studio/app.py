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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from landcover.errors import LandcoverError

log = logging.getLogger("landcover.studio")
STATIC = Path(__file__).parent / "static"
TRAINABLE_KEYS = "123456789"
# The page runs its own scripts only (no inline script, no other origin), is framed by no one
# and leaks no address (its first URL holds the token) to anything it links.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def refused(status: int, reason: str) -> Response:
    """A refusal in one line, as JSON like every other answer of the API."""
    return JSONResponse({"error": reason}, status_code=status, headers=SECURITY_HEADERS)


async def read_body(request: Request) -> bytes:
    """The body, read no further than the limit (a missing or lying Content-Length cannot
    make the server hold more)."""
    from landcover.studio.bodies import BodyError
    from landcover.studio.gate import MAX_BODY

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyError(f"a request body is at most {MAX_BODY // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


SUGGESTIONS = 12  # places to correct next the page shows at once


def create_app(session: Any, settings: argparse.Namespace) -> Any:
    """The page, its tiles and its API over one open session."""
    from landcover.data.schema import IGNORE_INDEX as IGNORE
    from landcover.predict.writer import colormap
    from landcover.studio import tiles
    from landcover.studio.access import TeamCredentials, TeamServerDownError
    from landcover.studio.bodies import EditBody, EmptyBody, UndoBody, parse
    from landcover.studio.gate import OPEN_PATHS, Gate
    from landcover.studio.retrain import retrain
    from landcover.studio.session import StudioError
    from landcover.studio.strokes import stroke_area

    app = FastAPI(title="landcover-studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    display = session.display or tiles.Display.of(session.image)
    maxzoom = tiles.max_zoom(session.image)
    team = TeamCredentials(settings.tracking_uri) if settings.allow_remote else None
    gate: Gate = settings.gate
    colours = colormap(session.schema)
    corrections_colours = session.edits.colormap()
    retraining = threading.Lock()

    @app.middleware("http")
    async def trusted_only(request: Request, call_next: Any) -> Any:
        """Host, origin, body and then who: the token on loopback, a member in a team."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        refusal = gate.host_refusal(headers.get("host"))
        if refusal:
            return refused(421, refusal)
        path = request.url.path
        if path in OPEN_PATHS:
            return await call_next(request)
        refusal = gate.origin_refusal(request.method, headers)
        if refusal:
            return refused(403, refusal)
        body = gate.body_refusal(request.method, headers)
        if body:
            return refused(*body)
        if team is not None:
            try:
                member = await run_in_threadpool(team.member, headers.get("authorization"))
            except TeamServerDownError as err:
                return refused(503, str(err))
            if member is None:
                return Response(
                    "sign in with your team server's user name and password",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="landcover-studio"'},
                )
            request.state.author = member
        elif not gate.token_matches(headers, request.cookies):
            if path == "/" and gate.offered_in_query(request.query_params.get("token")):
                return first_visit()
            if path.startswith("/static/"):
                return await call_next(request)  # the page's own code and styles: no secret
            return refused(
                403,
                "open the address landcover-studio printed: it carries this session's token",
            )
        else:
            request.state.author = settings.author
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def first_visit() -> Response:
        """The printed URL's token becomes a same-site cookie, and the address bar loses it."""
        response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(gate.cookie, gate.token, httponly=True, samesite="strict", path="/")
        return response

    @app.exception_handler(LandcoverError)
    async def one_line(_request: Request, err: LandcoverError) -> JSONResponse:
        status = 409 if "already running" in str(err) else 400
        return JSONResponse({"error": str(err)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=400)

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
            "train_command": train_command(session, settings.tracking_uri),
            "bands": {"rgb": list(display.rgb), "nir": display.nir},
            "has_labels": session.edits.base_labels is not None,
        }

    @app.get("/api/scene")
    def scene(request: Request) -> dict[str, Any]:
        return state(request)

    suggested: dict[str, list[dict[str, Any]]] = {}  # by version and corrections, computed once

    @app.get("/api/suggestions")
    def suggestions() -> dict[str, Any]:
        """Where to correct next on the current map (a sync handler: FastAPI runs it in the
        thread pool)."""
        from landcover.studio.suggest import suggest

        key = f"{session.version.id}:{session.edits.digest()}"
        if key not in suggested:
            classes, confidence = session.map_of(session.version)
            corrected = session.corrections_as_indices() != IGNORE
            skip = {i for i, info in enumerate(session.schema.classes) if info.ignore}
            found = suggest(classes, confidence, corrected, SUGGESTIONS, skip=skip)
            suggested.clear()
            suggested[key] = [s.to_dict() for s in found]
        return {"suggestions": suggested[key]}

    @app.get("/tiles/{layer}/{version}/{z}/{x}/{y}.png")
    def tile(layer: str, version: str, z: int, x: int, y: int) -> Response:
        found = next((v for v in session.versions if v.id == version), None)
        if layer in tiles.IMAGERY:
            data = tiles.imagery_tile(display, layer, x, y, z)
        elif layer == "corrections":
            data = tiles.outlined_tile(session.edits.raster, corrections_colours, x, y, z)
        elif layer == "labels" and session.edits.base_labels is not None:
            data = tiles.class_tile(session.edits.base_labels, corrections_colours, x, y, z)
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

    def apply_edit(body: EditBody, author: str) -> dict[str, Any]:
        """In a worker thread: the stroke's pixels and the log's append, however large the
        stroke, never hold the event loop (other requests and /health go on)."""
        area = stroke_area(
            body.kind,
            body.points,
            body.radius,
            session.features.width,
            session.features.height,
        )
        if body.kind == "accept":
            stroke, pixels = session.edits.accept(
                area, session.class_indices(), author=author, tab=body.tab
            )
        else:
            stroke, pixels = session.edits.add(
                area, body.class_index, author=author, tab=body.tab, kind=body.kind
            )
        return {"stroke": stroke, "pixels": pixels, "edits": len(session.edits.active())}

    @app.post("/api/edits")
    async def add_edit(request: Request) -> dict[str, Any]:
        body = parse(EditBody, await read_body(request))
        return await run_in_threadpool(apply_edit, body, request.state.author)

    def apply_undo(tab: str, author: str) -> dict[str, Any]:
        stroke = session.edits.undo(author=author, tab=tab)
        return {"undone": stroke, "edits": len(session.edits.active())}

    @app.post("/api/undo")
    async def undo(request: Request) -> dict[str, Any]:
        body = parse(UndoBody, await read_body(request))
        return await run_in_threadpool(apply_undo, body.tab, request.state.author)

    @app.post("/api/retrain")
    async def do_retrain(request: Request) -> dict[str, Any]:
        parse(EmptyBody, await read_body(request))
        return await run_in_threadpool(retrain_now, request)

    def retrain_now(request: Request) -> dict[str, Any]:
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
            "run": run_link(settings.tracking_uri, str(version.run_id)),
        }

    @app.post("/api/export")
    async def export(request: Request) -> dict[str, Any]:
        """The edits in force as a styled GeoPackage layer, the corrections raster and the
        session zipped, into `<session>/export/`."""
        from landcover.studio.export import export_session

        parse(EmptyBody, await read_body(request))
        done = await run_in_threadpool(export_session, session.edits, session.folder / "export")
        return {
            "layer": str(done.layer),
            "raster": str(done.raster),
            "archive": str(done.archive),
            "features": done.features,
        }

    @app.post("/api/undo-retrain")
    async def undo_retrain(request: Request) -> dict[str, Any]:
        parse(EmptyBody, await read_body(request))
        return await run_in_threadpool(step_back, request)

    def step_back(request: Request) -> dict[str, Any]:
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


# How a full training starts from a studio model without undoing it, chosen by
# experiments/studio_finetune.py (docs/studio.md): the classifier alone learns (its batch-norm
# statistics held with the frozen layers), at 1e-4, and the start is scored first, so an epoch
# that does not beat it on the scene's labels is not the logged model.
FINE_TUNE = ("init.freeze=[all_but_head]", "optimizer.lr=1e-4", "trainer.keep_start=true")


def train_command(session: Any, tracking_uri: str) -> str:
    """The full training that learns from this session's corrections, as a shell runs it: this
    environment's `landcover-train`, the model's own patch size (one its margin leaves output
    for), the studio's tracking store, every value quoted."""
    import shlex

    from landcover.paths import CONFIG_DIR

    data = "corrections_mixed" if session.edits.base_labels else "corrections"
    arch = session.metadata.get("model", {}).get("arch") or session.metadata.get("arch", "unet")
    margin = int(session.metadata.get("output_margin", 0))
    patch = int(session.metadata.get("patch_size") or 256)
    divisor = int(session.metadata.get("size_divisor", 32))
    grid = session.edits.grid  # no patch larger than the scene
    patch = min(patch, min(grid.width, grid.height) // divisor * divisor)
    if margin:  # half the patch is margin at most: the 2018 network (64 px) trains on 256
        patch = max(patch, 4 * margin)
    parts = [
        str(Path(sys.executable).parent / "landcover-train"),
        f"data={data}",
        f"data.root={session.folder.resolve()}",
        f"data.patch_size={patch}",
        f"model={arch}",
        f"init.model={session.version.model}",
        *FINE_TUNE,
        f"tracking.uri={tracking_uri}",
    ]
    if (Path(CONFIG_DIR) / "data" / "schema" / f"{session.schema.name}.yaml").is_file():
        parts.insert(3, f"data/schema={session.schema.name}")
    return " ".join(shlex.quote(part) for part in parts)


def run_link(tracking_uri: str, run_id: str) -> dict[str, str]:
    """The retrain's run for the page: its name, and its page in the MLflow UI when the
    tracking store is a server (a SQLite file has no UI until `mlflow ui` serves it)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    link = {"name": str(run.info.run_name), "url": "", "hint": ""}
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        link["url"] = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    else:
        link["hint"] = f"see it with: mlflow ui --backend-store-uri {tracking_uri}"
    return link


def _bands(text: str) -> tuple[int, int, int]:
    """`R,G,B` -> three band numbers (1-based)."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        bands = ()
    if len(bands) != 3 or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not three band numbers R,G,B (from 1)")
    return bands


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
    parser.add_argument(
        "--rgb-bands",
        type=_bands,
        metavar="R,G,B",
        help="bands drawn as true colour (default: from the bands' names or colour "
        "interpretation, else 1,2,3; 8-band WorldView: 5,3,2)",
    )
    parser.add_argument(
        "--nir-band",
        type=int,
        metavar="N",
        help="the near-infrared band of the false colour layer (default: from the bands' names, "
        "else the 4th of 4 as in NAIP, which tags it alpha; none for 3 bands)",
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
        # what the command line alone decides, before the heavy imports (torch, MLflow,
        # rasterio take seconds): a wrong address or a down server is said at once
        from landcover.reachable import check_tracking_server
        from landcover.studio.access import check_bind
        from landcover.studio.gate import Gate

        check_bind(args.host, args.allow_remote, args.tracking_uri)
        check_tracking_server(args.tracking_uri)
        if not args.image.is_file():
            raise LandcoverError(f"{args.image}: no such image file")
        for what, path in (("image", args.image), ("session folder", args.session)):
            readable_by_gdal(what, path.absolute())

        from landcover.data.scenes import quiet_georeferencing_warnings
        from landcover.studio.retrain import close_orphaned_runs
        from landcover.studio.session import Session

        quiet_georeferencing_warnings()
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        held = hold_session(args.session, args.port)  # kept open as long as this process
        started = time.perf_counter()
        image, labels = args.image, args.labels
        if args.window:
            from landcover.studio.window import cut_scene

            image, labels = cut_scene(image, labels, tuple(args.window), args.session)
            log.info("window %s of %s: %s", " ".join(map(str, args.window)), args.image, image)
        from landcover.studio.tiles import Display

        display = Display.of(image, args.rgb_bands, args.nir_band)  # a wrong band: said now
        session = Session.open(image, args.model, args.session, args.tracking_uri, log, labels)
        session.display = display
        closed = close_orphaned_runs(session, args.tracking_uri, args.experiment)
        if closed:
            log.info("%d retrain run(s) left RUNNING by a stopped studio ended FAILED", closed)
        args.gate = Gate(args.host, args.port, team=args.allow_remote)
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
    info = args.gate.write_info(session.folder)
    log.info("landcover-studio: %s", args.gate.url())
    sys.stdout.flush()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        info.unlink(missing_ok=True)
        os.close(held)


def readable_by_gdal(what: str, path: Path) -> None:
    """GDAL, which reads the scene and writes the session's rasters, takes UTF-8 paths only: a
    name in another encoding is one line here, not a traceback from deep inside a write."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise LandcoverError(
            f"{os.fsencode(path)!r}: the {what}'s path is not UTF-8, which GDAL cannot open; "
            "rename it or choose another --session"
        ) from None


def hold_session(folder: Path, port: int) -> int:
    """One studio server per session folder (tabs and people share that server): a second
    server would keep its own model versions and maps apart. Returns the lock's descriptor,
    kept open as long as the server runs."""
    from landcover.locks import hold_folder

    busy = "open in another landcover-studio ({holder}): open that one's page"
    return hold_folder(folder, ".server.lock", busy, detail=f", port {port}")


if __name__ == "__main__":
    main()
