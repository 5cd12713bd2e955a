"""`landcover-predict`: a mapping job over any number of rasters, resumable and recorded once.

Output a directory and the job keeps a manifest there (one row per input: status, output,
pixels, seconds, attempts, error): a re-run of the same command skips inputs whose maps are
complete, retries failed ones up to `retries` times, and ends non-zero with one line per input
that still fails. It then writes the region's outputs (a VRT mosaic and area totals per CRS, a
quicklook) and records the whole job as one MLflow run. Output a file and one input is mapped
to it, recorded the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
from omegaconf import DictConfig, ListConfig, OmegaConf

from landcover.atomic import atomic_target, write_text
from landcover.config import plain_dict
from landcover.errors import ConfigError, LandcoverError, first_line
from landcover.mapping import region
from landcover.mapping.engines import Outcome, Task, output_for, run_local, run_ray
from landcover.mapping.inputs import MapInput, expand, shown
from landcover.mapping.manifest import (
    DONE,
    FAILED,
    PENDING,
    Manifest,
    Row,
    job_lock,
    output_is_complete,
)
from landcover.mapping.stac_catalog import MappedRaster, ModelLink, write_collection
from landcover.tracking.system_metrics import SystemSamples, sampling

# the longer side of the region's overview COG (what the job's run holds of the region)
OVERVIEW_SIZE = 4096

log = logging.getLogger("landcover.predict")


class MappingFailedError(LandcoverError):
    """Some inputs could not be mapped; the others were, and the manifest says which."""


@dataclass
class JobSummary:
    """What a job did: counts, where things are, its MLflow run."""

    folder: Path
    mapped: list[Row] = field(default_factory=list)
    skipped: list[Row] = field(default_factory=list)
    failed: list[Row] = field(default_factory=list)
    mosaics: dict[str, Path] = field(default_factory=dict)
    catalog: Path | None = None  # <folder>/stac/collection.json: the maps as STAC Items
    run_id: str | None = None
    seconds: float = 0.0
    started_at: float = field(default_factory=time.time)  # wall clock, for the run's start
    model_reference: str = ""  # as the workers resolved it (empty when nothing ran)
    source_run_id: str = ""


def is_folder_output(output: str, inputs: list[MapInput]) -> bool:
    """A directory output (ends with /, exists as one, or several inputs) makes a job folder."""
    return len(inputs) > 1 or output.endswith("/") or Path(output).is_dir()


def run_predictions(cfg: DictConfig) -> JobSummary:
    """`landcover-predict` on its validated config."""
    if cfg.engine.name not in ("local", "ray"):
        raise ConfigError(f"config value engine.name={cfg.engine.name!r} is not local or ray")
    spec = [str(s) for s in cfg.input] if isinstance(cfg.input, ListConfig) else str(cfg.input)
    inputs = expand(spec, asset=cfg.asset)
    output = str(cfg.output)
    folder_mode = is_folder_output(output, inputs)
    folder = Path(output) if folder_mode else Path(output).parent
    if not folder_mode and Path(output).suffix.lower() not in (".tif", ".tiff"):
        raise ConfigError(f"config value output={output}: a map is a .tif (or give a folder/)")
    started = time.perf_counter()
    _refuse_overwriting_inputs(inputs, folder if folder_mode else Path(output), folder_mode)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LandcoverError(f"{folder}: cannot create the output folder ({err.strerror})") from err
    try:
        return _run_in_folder(cfg, spec, inputs, output, folder, folder_mode, started)
    except BaseException:
        _remove_if_untouched(created)
        raise


def _remove_if_untouched(created: list[Path]) -> None:
    """The folders this job created, removed again when it failed before writing anything in
    them but its lock: a failed command leaves no empty output folder behind."""
    for folder in created:  # innermost first
        with contextlib.suppress(OSError):
            if {p.name for p in folder.iterdir()} <= {".job.lock"}:
                (folder / ".job.lock").unlink(missing_ok=True)
                folder.rmdir()


def _run_in_folder(
    cfg: DictConfig,
    spec: str | list[str],
    inputs: list[MapInput],
    output: str,
    folder: Path,
    folder_mode: bool,
    started: float,
) -> JobSummary:
    """The job once its output folder exists: lock, manifest, mapping, records."""
    with (
        job_lock(folder) if folder_mode else nullcontext(),
        sampling(
            float(cfg.tracking.system_metrics_interval),
            bool(cfg.tracking.system_metrics and cfg.log_to_mlflow),
        ) as system,
    ):
        manifest = Manifest(folder) if folder_mode else None
        summary = JobSummary(folder)
        tasks, rows = [], {}
        for item in inputs:
            target = output_for(folder, item.name) if folder_mode else Path(output)
            row = manifest.row(item.source, target) if manifest else Row(item.source, str(target))
            rows[item.source] = row
            if manifest and output_is_complete(row, target):
                summary.skipped.append(row)
            else:
                if manifest and row.status == DONE:
                    log.warning(
                        "%s: its map is not the one recorded; mapping it again", shown(row.input)
                    )
                    row.status = PENDING
                row.output = str(target)  # whatever the manifest said
                tasks.append(Task(item.source, str(target)))
        if summary.skipped:
            log.info("%d of %d inputs already mapped: skipped", len(summary.skipped), len(inputs))
        try:
            _map_with_retries(cfg, tasks, rows, manifest, summary)
        except Exception as err:
            # the job is recorded whatever stopped it: its run FAILED with the reason, and
            # the manifest as far as it got
            summary.seconds = time.perf_counter() - started
            done = [rows[i.source] for i in inputs if rows[i.source].status == DONE]
            if cfg.log_to_mlflow:
                reason = first_line(err)
                _record_job(cfg, spec, summary, done, folder_mode, system, error=reason)
            raise
        summary.seconds = time.perf_counter() - started
        done = [rows[i.source] for i in inputs if rows[i.source].status == DONE]
        if folder_mode:
            summary.mosaics = _region_outputs(folder, done, int(cfg.quicklook_size))
            summary.catalog = _catalog(cfg, summary, done)
        if cfg.log_to_mlflow:
            summary.run_id = _record_job(cfg, spec, summary, done, folder_mode, system)
    if summary.failed:
        lines = [f"  {shown(row.input)}: {row.error}" for row in summary.failed]
        where = (  # a single file's job keeps no manifest: name none
            f"see {folder}/manifest.csv; re-run the same command to retry them"
            if folder_mode
            else "re-run the same command to retry"
        )
        raise MappingFailedError(
            f"{len(summary.failed)} of {len(inputs)} inputs failed ({where}):\n" + "\n".join(lines)
        )
    log.info(
        "job done: %d mapped, %d skipped in %.1f s; %s",
        len(summary.mapped),
        len(summary.skipped),
        summary.seconds,
        ", ".join(str(p) for p in summary.mosaics.values()) or folder,
    )
    return summary


def _description(cfg: DictConfig, summary: JobSummary, done: list[Row], warnings: list[str]) -> str:
    """What a person reads first on the job's run page."""
    megapixels = sum(row.pixels for row in summary.mapped) / 1e6
    lines = [
        f"Mapping job: {len(summary.mapped)} mapped, {len(summary.skipped)} already mapped, "
        f"{len(summary.failed)} failed, {megapixels:.1f} Mpx in {summary.seconds:.1f} s.",
        "",
        f"- model: {summary.model_reference or cfg.model}",
        f"- inputs: {len(done) + len(summary.failed)} ({cfg.input})",
        f"- engine: {cfg.engine.name}"
        + (f" ({cfg.engine.workers} workers)" if cfg.engine.name == "ray" else ""),
        f"- output: {summary.folder}",
    ]
    lines += [f"- warning: {warning}" for warning in warnings]
    lines += [f"- failed: {shown(row.input)}: {row.error}" for row in summary.failed[:20]]
    return "\n".join(lines)


def _refuse_overwriting_inputs(inputs: list[MapInput], output: Path, folder_mode: bool) -> None:
    """A map never replaces what it reads: an output (or, in a folder, any map the job would
    publish) that is, or resolves to, one of the inputs is refused before any work."""
    sources = {os.path.realpath(i.source): i.source for i in inputs if "://" not in i.source}
    targets = [output_for(output, i.name) for i in inputs] if folder_mode else [output]
    for target in targets:
        hit = sources.get(os.path.realpath(target))
        if hit is not None:
            raise ConfigError(
                f"config value output={output}: the map would replace its input {hit}; "
                "choose another output"
            )


def _map_with_retries(
    cfg: DictConfig,
    tasks: list[Task],
    rows: dict[str, Row],
    manifest: Manifest | None,
    summary: JobSummary,
) -> None:
    """Map tasks; each failure is tried again up to `retries` times; rows saved as they end."""
    engine = cfg.engine
    worker_args = _worker_args(cfg)
    pending = list(tasks)
    for attempt in range(1 + int(cfg.retries)):
        if not pending:
            break
        if attempt:
            log.info("retrying %d failed input(s), attempt %d", len(pending), attempt + 1)
        if engine.name == "ray":
            outcomes = run_ray(worker_args, pending, engine)
        else:
            outcomes = run_local(worker_args, pending)
        pending = []
        for outcome in outcomes:
            summary.model_reference = outcome.model_reference
            summary.source_run_id = outcome.source_run_id
            row = _record_outcome(rows[outcome.task.source], outcome)
            if manifest:
                manifest.save()
            if row.status == FAILED:
                pending.append(outcome.task)
            else:
                summary.mapped.append(row)
    summary.failed = [r for r in rows.values() if r.status == FAILED]


def _worker_args(cfg: DictConfig) -> dict[str, Any]:
    """What every worker is built from, resolved here: a worker on another node has another
    working directory and environment, so relative paths are made absolute and (on Ray) the
    driver's environment travels with the arguments (see landcover.cluster)."""
    from landcover.locks import absolute_sqlite_url

    model = str(cfg.model)
    if Path(model).exists():
        model = str(Path(model).resolve())
    args: dict[str, Any] = {
        "model": model,
        "tracking_uri": absolute_sqlite_url(str(cfg.tracking.uri)),
        "device": str(cfg.device),  # each worker resolves `auto` where it runs
        "settings": plain_dict(cfg.predict),
        "threads": cfg.engine.threads,
    }
    if cfg.engine.name == "ray":
        from landcover.cluster import JobEnvironment

        environment = JobEnvironment.of_driver(
            OmegaConf.to_yaml(cfg, resolve=False), list(cfg.engine.carry_env)
        )
        log.info("carried to the Ray workers: %s", ", ".join(environment.names()) or "nothing")
        args["environment"] = environment
    return args


def _record_outcome(row: Row, outcome: Outcome) -> Row:
    row.attempts += 1
    row.node = outcome.node
    if outcome.error:
        row.status, row.error = FAILED, outcome.error
        log.error("%s: failed (%s)", shown(outcome.task.source), outcome.error)
        return row
    row.status, row.error, row.warning = DONE, "", outcome.warning
    row.pixels, row.seconds, row.crs = outcome.pixels, round(outcome.seconds, 3), outcome.crs
    row.width, row.height = outcome.width, outcome.height
    row.bytes, row.checksum = outcome.bytes, outcome.checksum
    log.info(
        "%s -> %s (%.1f Mpx in %.1f s)",
        shown(outcome.task.source),
        outcome.task.output,
        outcome.pixels / 1e6,
        outcome.seconds,
    )
    return row


def _region_outputs(folder: Path, done: list[Row], quicklook_size: int) -> dict[str, Path]:
    """Mosaics, area totals and a quicklook over every map the folder holds."""
    maps = [Path(row.output) for row in done]
    groups = region.by_crs(maps) if maps else {}  # every map opened once for its CRS
    mosaics = region.write_mosaics(folder, groups)
    without_crs = [row.input for row in done if not row.crs]
    if without_crs:
        log.warning(
            "%d map(s) have no CRS (their inputs have none): they have no place on the ground, "
            "so no mosaic or quicklook includes them and their areas are pixels only",
            len(without_crs),
        )
    tables = [(row.crs, Path(row.output).with_suffix(".areas.json").read_text()) for row in done]
    totals = region.area_totals(tables)
    write_text(folder / "area_totals.json", json.dumps(totals, indent=2))
    write_text(folder / "area_totals.csv", region.totals_csv(totals))
    for crs, mosaic in mosaics.items():
        try:
            region.write_overview(mosaic, groups[crs][0], OVERVIEW_SIZE)
        except Exception as err:
            # a copy for the run's records: the maps and the mosaic stand without it, so any
            # failure is a warning (a full disk reaches GDAL's COG writer as a seek error, a
            # CPLE exception that is not even a RasterioError)
            log.warning("no overview of %s: %s", mosaic.name, first_line(err))
        figure = region.mosaic_quicklook(mosaic, quicklook_size, f"{mosaic.name} ({crs})")
        # replaced, never written through: a link planted at that name is not followed
        with atomic_target(mosaic.with_suffix(".png")) as staged:
            figure.savefig(staged, dpi=100, format="png")
        plt.close(figure)
    return mosaics


def model_link(reference: str, tracking_uri: str | None) -> ModelLink:
    """The model a job's catalog links to: a registry version's MLM Item when the version
    carries its GIS package (every champion does), else the reference itself."""
    if not reference.startswith("models:/"):
        return ModelLink(reference)
    from mlflow.tracking import MlflowClient

    from landcover.registry.promotion import PACKAGE_TAG, resolve_version

    try:
        version = resolve_version(MlflowClient(tracking_uri), reference)
    except LandcoverError:
        version = None
    package = version.tags.get(PACKAGE_TAG) if version is not None else None
    if version is None or not package:
        return ModelLink(reference)
    return ModelLink(
        f"models:/{version.name}/{version.version}", f"{package}/{version.name}.stac.json"
    )


def _catalog(cfg: DictConfig, summary: JobSummary, done: list[Row]) -> Path:
    """The job's maps as a STAC Collection in `<folder>/stac/`."""
    reference = summary.model_reference or str(cfg.model)
    rasters = [MappedRaster(row.input, Path(row.output)) for row in done]
    return write_collection(
        summary.folder / "stac",
        rasters,
        model_link(reference, cfg.tracking.uri),
        datetime.fromtimestamp(summary.started_at, UTC),
    )


def _record_job(
    cfg: DictConfig,
    spec: str | list[str],
    summary: JobSummary,
    done: list[Row],
    folder: bool,
    system: SystemSamples,
    error: str | None = None,
) -> str:
    """One MLflow run for the whole job (and a child per input only when asked), with the
    rasters it read as a dataset and the system metrics sampled while it worked."""
    from landcover.tracking import runs as tracking
    from landcover.tracking.datasets import inputs_dataset, log_datasets

    reference = summary.model_reference or str(cfg.model)
    pixels = sum(row.pixels for row in summary.mapped)
    name = f"map {len(done)} input(s)" if folder else f"predict {Path(str(cfg.output)).name}"
    # the run spans the job (MLflow would start it now, at the end of the work)
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    tracking.use_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    created = client.create_run(
        tracking.experiment_id(client, cfg.tracking.experiment),
        start_time=int(summary.started_at * 1000),
        run_name=name,
    )
    warnings = sorted({row.warning for row in [*done, *summary.failed] if row.warning})
    with mlflow.start_run(run_id=created.info.run_id) as run:
        mlflow.set_tag("mlflow.note.content", _description(cfg, summary, done, warnings))
        if warnings:
            mlflow.set_tag("landcover.warnings", " | ".join(warnings)[:5000])
        mlflow.set_tags(
            {
                "landcover.kind": "mapping_job",
                "landcover.model": reference,
                **(
                    {"landcover.source_run_id": summary.source_run_id}
                    if summary.source_run_id
                    else {}
                ),
                "output": str(summary.folder if folder else cfg.output),
                **(
                    {"landcover.nodes": ",".join(sorted({r.node for r in summary.mapped}))}
                    if any(r.node for r in summary.mapped)
                    else {}
                ),
            }
        )
        mlflow.log_params(
            {
                "model": str(cfg.model),
                "input": json.dumps(spec)[:500],
                "engine": str(cfg.engine.name),
                "engine.workers": int(cfg.engine.workers),
                "engine.address": str(cfg.engine.address),
                "retries": int(cfg.retries),
                **{f"predict.{k}": v for k, v in plain_dict(cfg.predict).items()},
            }
        )
        inputs = [shown(row.input) for row in [*done, *summary.failed]]
        spec_text = spec if isinstance(spec, str) else ",".join(spec)
        log_datasets({"mapping": inputs_dataset("inputs", spec_text, inputs, pixels)})
        system.log_to(run.info.run_id, str(cfg.tracking.uri))
        mlflow.log_metrics(
            {
                "inputs": float(len(done) + len(summary.failed)),
                "mapped": float(len(summary.mapped)),
                "skipped": float(len(summary.skipped)),
                "failed": float(len(summary.failed)),
                "megapixels": pixels / 1e6,
                "seconds": summary.seconds,
                "megapixels_per_s": pixels / 1e6 / max(summary.seconds, 1e-9),
            }
        )
        for path in sorted(summary.folder.glob("area_totals.*")) if folder else []:
            mlflow.log_artifact(str(path), "region")
        if folder and (summary.folder / "manifest.csv").exists():
            mlflow.log_artifact(str(summary.folder / "manifest.csv"), "region")
        for mosaic in summary.mosaics.values():
            # the overview, not the VRT: a VRT names maps the run does not hold
            overview = mosaic.with_name(f"{mosaic.stem}_overview.tif")
            for path in (
                overview,
                Path(f"{overview}.aux.xml"),
                overview.with_suffix(".qml"),
                mosaic.with_suffix(".png"),
            ):
                if path.exists():
                    mlflow.log_artifact(str(path), "region")
        if not folder:  # a job folder has its totals instead
            for row in done:
                mlflow.log_artifact(str(Path(row.output).with_suffix(".areas.json")), "area")
        if cfg.per_input_runs:
            for row in summary.mapped:
                with mlflow.start_run(run_name=f"predict {Path(row.output).name}", nested=True):
                    mlflow.set_tags({"landcover.kind": "prediction", "input": shown(row.input)})
                    mlflow.log_metrics({"megapixels": row.pixels / 1e6, "seconds": row.seconds})
                    mlflow.log_artifact(str(Path(row.output).with_suffix(".areas.json")), "area")
        if error is not None:
            mlflow.set_tag("landcover.error", error[:5000])
            mlflow.end_run("FAILED")
        return run.info.run_id
