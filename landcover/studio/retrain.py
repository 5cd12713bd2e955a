"""A retrain is a training run like any other: recorded, linked to its data and its start.

Each retrain is an MLflow run (`init.model` = the version it started from), with the
corrections as its input dataset (`mlflow.log_input`, digest over the edits in force), the edit
log and the label raster as artifacts, a before/after picture, and the adapted model logged in
landcover's flavour, so `landcover-promote` takes it like any trained model. A run never stays
RUNNING: it ends FINISHED, or FAILED with the reason; a studio killed mid-retrain has its run
closed FAILED by the next studio that opens the session.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import rasterio
from mlflow.tracking import MlflowClient

from landcover.artifacts.reference import files_digest
from landcover.data.schema import IGNORE_INDEX
from landcover.errors import first_line
from landcover.studio.adapt import FitReport, fit_head, row_strips, value_counts
from landcover.studio.head import with_head
from landcover.studio.session import Session, StudioError, Version
from landcover.tracking.datasets import ProfiledDataset, log_input_once_shared, source_of
from landcover.tracking.runs import log_landcover_model, use_experiment

log = logging.getLogger(__name__)


def run_name(session: Session) -> str:
    """`studio <scene> v<n>`: the scene and the version the retrain makes (the start is v0)."""
    return f"studio {session.image.stem} v{session.current + 1}"


def run_description(session: Session, start: Version, corrections: np.ndarray) -> str:
    """What the MLflow UI shows under the run's name."""
    active = session.edits.active()
    strokes = len({row.stroke for row in active})
    authors = ", ".join(sorted({row.author for row in active})) or "nobody"
    return (
        f"Correction of `{start.model}` on `{session.image}` (session `{session.folder}`): "
        f"{int((corrections != IGNORE_INDEX).sum())} corrected pixels in {strokes} stroke(s) "
        f"by {authors}. The network's features are kept; its last layer is fitted to the "
        "corrections, so the model is specific to this scene (a one-scene score: "
        "`landcover-promote` wants `force=true` for it)."
    )


def corrections_dataset(session: Session, corrections: np.ndarray, digest: str) -> ProfiledDataset:
    """The corrections in force as an MLflow dataset: digest over the edits, a profile of
    pixels per class and of who made them."""
    active = session.edits.active()
    counts = value_counts(corrections)
    profile = {
        "image": str(session.image),
        "strokes": len({row.stroke for row in active}),
        "corrected_pixels": int((corrections != IGNORE_INDEX).sum()),
        "class_pixels": {
            info.name: int(counts[i]) for i, info in enumerate(session.schema.classes) if counts[i]
        },
        "authors": sorted({row.author for row in active}),
    }
    return ProfiledDataset(
        source_of(str(session.edits.gpkg)),
        name="corrections",
        digest=digest,
        profile=profile,
    )


def retrain(
    session: Session, tracking_uri: str, experiment: str, author: str
) -> tuple[Version, FitReport, float]:
    """Fit a new head on the corrections, record the run, make its model the current version.
    Returns the version, what the fit did and its seconds."""
    corrections = session.corrections_as_indices()
    if not (corrections != IGNORE_INDEX).any():
        raise StudioError("no corrections yet: paint some pixels with a class first")
    start = session.version
    digest = session.edits.digest()
    if start.edits_digest == digest:
        raise StudioError(
            f"nothing new since the last retrain (v{session.current}): the corrections in force "
            "are the ones it was fitted on; paint, accept or undo something first"
        )
    use_experiment(tracking_uri, experiment)
    tags = {
        **session.owner_tags(),
        "landcover.studio.author": author,
        "mlflow.note.content": run_description(session, start, corrections),
    }
    with mlflow.start_run(run_name=run_name(session), tags=tags) as run:
        try:
            version, report, seconds = _fit_and_log(
                session, start, corrections, run.info.run_id, digest
            )
        except BaseException as err:
            mlflow.set_tag("landcover.error", first_line(err)[:5000])
            mlflow.end_run("FAILED")
            raise
    return version, report, seconds


def _fit_and_log(
    session: Session, start: Version, corrections: np.ndarray, run_id: str, digest: str
) -> tuple[Version, FitReport, float]:
    mlflow.log_params(
        {
            "init.model": start.model,
            "studio.image": str(session.image),
            "studio.session": str(session.folder.resolve()),
            "studio.adapts": "final convolution (features frozen)",
        }
    )
    log_input_once_shared(corrections_dataset(session, corrections, digest), "train")
    before = session.class_indices(start)
    session.release_confidence()  # the fit makes the next map: two at once do not fit a tile
    began = time.perf_counter()
    fitted = fit_head(session.features, session.head_of(start), before, corrections, IGNORE_INDEX)
    seconds = time.perf_counter() - began
    report = fitted.report
    mlflow.log_metrics(
        {
            "retrain/seconds": seconds,
            "retrain/corrected_pixels": report.corrected_pixels,
            "retrain/anchor_pixels": report.anchor_pixels,
            "retrain/corrected_accuracy_before": report.corrected_accuracy_before,
            "retrain/corrected_accuracy_after": report.corrected_accuracy_after,
            "retrain/changed_pixels": report.changed_pixels,
            "retrain/changed_share": report.changed_pixels / corrections.size,
        }
    )
    report = replace(report, scores=_log_scores(session, before, fitted.classes, corrections))
    _log_evidence(session, before, fitted.classes, corrections)
    module = with_head(session.module, fitted.head, session.schema.num_classes)
    metadata = {**session.metadata, "init_model": start.model, "studio_image": str(session.image)}
    log_landcover_model(module, metadata)
    version = Version(run_id, f"runs:/{run_id}/model", run_id, digest)
    session.push(version, fitted.head, fitted.classes, fitted.confidence)
    return version, report, seconds


def _log_scores(
    session: Session, before: np.ndarray, after: np.ndarray, corrections: np.ndarray
) -> dict[str, Any]:
    """`val/*` of the adapted model's map (`after`) and `start/val/*` of the one it started
    from (`before`), on the scene's own labels when the session has them (`--labels`), else on
    the corrections themselves; the tag `dataset_fingerprint` names which, so
    `landcover-promote` compares like with like (a retrain scored on other data than the
    champion needs `force=true`, like any run)."""
    import torch

    from landcover.metrics import ConfusionMatrix, scores_from_matrix
    from landcover.registry.promotion import FINGERPRINT_TAG, ONE_SCENE_TAG

    if session.edits.base_labels is not None:
        with rasterio.open(session.edits.base_labels) as src:
            target = session.schema.lookup_table()[src.read(1)]
        digest = files_digest(session.edits.base_labels)
        scored_on = f"the scene's labels ({session.edits.base_labels.name})"
    else:
        target, digest, scored_on = corrections, session.edits.digest(), "the corrections"
    scored = session.schema.scored_classes
    shown: dict[str, Any] = {"scored_on": scored_on}
    for prefix, mapped, when in (("val/", after, "after"), ("start/val/", before, "before")):
        matrix = ConfusionMatrix(session.schema.num_classes)  # skips unlabelled pixels
        for rows in row_strips(mapped.shape[0]):
            matrix.update(torch.from_numpy(mapped[rows]), torch.from_numpy(target[rows]))
        metrics = scores_from_matrix(matrix.numpy(), scored).as_metrics(
            session.schema.names, scored, prefix=prefix
        )
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        shown[when] = {
            name: round(float(metrics[f"{prefix}{name}"]), 4)
            for name in ("overall_accuracy", "mIoU")
            if f"{prefix}{name}" in metrics and np.isfinite(metrics[f"{prefix}{name}"])
        }
    mlflow.set_tags({FINGERPRINT_TAG: digest, ONE_SCENE_TAG: scored_on})
    return shown


def _log_evidence(
    session: Session, before: np.ndarray, after: np.ndarray, corrections: np.ndarray
) -> None:
    """The edit log and label raster as they were, and a before/after picture."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in (session.edits.gpkg, session.edits.raster):
            shutil.copy2(path, Path(tmp) / path.name)
            mlflow.log_artifact(str(Path(tmp) / path.name), "corrections")
    from landcover.studio.figures import before_after

    figure = before_after(
        session.image, before, corrections, after, session.schema, session.display
    )
    mlflow.log_figure(figure, "studio/before_after.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def close_orphaned_runs(session: Session, tracking_uri: str, experiment: str) -> int:
    """End FAILED the retrain runs of this session left RUNNING by a studio process that no
    longer exists (killed mid-retrain); returns how many."""
    from landcover.atomic import _alive

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    folder = str(session.folder.resolve()).replace("'", "''")
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`landcover.studio.session` = '{folder}' and attributes.status = 'RUNNING'",
    )
    closed = 0
    here = session.owner_tags()["landcover.studio.host"]
    for run in runs:
        tags: Mapping[str, str] = run.data.tags
        pid = int(tags.get("landcover.studio.pid", "0") or 0)
        if tags.get("landcover.studio.host") == here and pid and _alive(pid):
            continue
        client.set_tag(run.info.run_id, "landcover.error", "the studio stopped during this retrain")
        client.set_terminated(run.info.run_id, "FAILED")
        closed += 1
    return closed
