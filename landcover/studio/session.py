"""One scene under correction: the image, the model's versions, their maps, the edit log.

The session folder holds everything a person's work leaves behind, so a restarted server (or a
training run) finds it all again:

    <session>/<image>_window.tif           with --window: the area of a large scene worked on
                                           (window.py); then the session's image
    <session>/edits.gpkg                   every stroke, append-only (edits.py)
    <session>/<image>_corrections.tif      the corrections as a label raster
    <session>/scenes.csv                   image,label: what `data=corrections` trains on
    <session>/mixed.csv, <image>_mixed.tif  with --labels: the labels, corrections laid over
    <session>/features/<key>/              the network's last feature map, block by block
                                           (head.py); a reopened session reads it back
    <session>/state.json                   the model versions (the first is the one started
                                           from; each retrain adds one) and the current one
    <session>/maps/<version>_classes.tif   each version's map and its confidence
    <session>/maps/<version>_classes_confidence.tif   (bytes / 255), written as
                                           `landcover-predict` writes maps

A version is fully named by an MLflow model reference (the starting model, then
`runs:/<retrain run>/model`), so an undone retrain is only a pointer moved back.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from landcover import artifacts
from landcover.atomic import write_text
from landcover.data.schema import IGNORE_INDEX, ClassSchema
from landcover.errors import LandcoverError
from landcover.predict.writer import ClassMapWriter, sibling
from landcover.studio.adapt import row_strips
from landcover.studio.edits import EditLog
from landcover.studio.head import (
    Head,
    RasterPixels,
    SceneFeatures,
    find_head_conv,
    scene_features,
)

# the features live on disk; what stays in memory is a version's map (5 bytes a pixel, two of
# them during a retrain) and the corrections: a NAIP quarter-quad (45 Mpx) fits in 2 GB
MAX_PIXELS = 64_000_000


class StudioError(LandcoverError):
    """The studio cannot work on this scene or model as asked."""


@dataclass
class Version:
    """One model the session has shown: where it lives and the run that made it."""

    id: str
    model: str
    run_id: str | None = None
    edits_digest: str | None = None  # the corrections it was fitted on (None: the start)

    def to_dict(self) -> dict[str, Any]:
        """Plain form for state.json."""
        return {
            "id": self.id,
            "model": self.model,
            "run_id": self.run_id,
            "edits_digest": self.edits_digest,
        }


@dataclass
class Session:
    """The scene, the model's kept features, its versions and the corrections."""

    image: Path
    folder: Path
    schema: ClassSchema
    metadata: dict[str, Any]
    module: Any  # the torch module of the first version: its backbone is every version's
    features: SceneFeatures
    edits: EditLog
    versions: list[Version]
    current: int
    heads: dict[str, Head] = field(default_factory=dict)
    tracking_uri: str | None = None
    # the map of one version (id, class indices, confidence), kept: the current version's is
    # read by every retrain (its start) and every "accept the map" stroke
    shown: tuple[str, np.ndarray, np.ndarray | None] | None = None
    # how the imagery is drawn (bands, stretch), the same in the page and the pictures
    display: Any = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        image: Path,
        model: str,
        folder: Path,
        tracking_uri: str | None = None,
        log: Any = None,
        labels: Path | None = None,
    ) -> Session:
        """Open (or reopen) the session of `image` in `folder`, starting from `model` the first
        time; a reopened session continues from its current version."""
        image = image.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        state = _read_state(folder)
        if Path(model).exists():  # a file or model folder: recorded where it is, wherever run
            model = str(Path(model).resolve())
        versions = [Version(**v) for v in state["versions"]] if state else [Version("base", model)]
        if state and log and versions[0].model != model:
            log.warning(
                "%s continues from %s (version %d of %d); --model %s is not used: start a new "
                "session folder (--session) for another model",
                folder,
                versions[0].model,
                int(state["current"]) + 1,
                len(versions),
                model,
            )
        current = int(state["current"]) if state else 0
        base = artifacts.load(versions[0].model, tracking_uri=tracking_uri, device="cpu")
        if base.torch_module is None:
            raise StudioError(f"{model}: the studio retrains PyTorch networks, not {base.kind}")
        pixels = _check_image(image, base.bands)
        if pixels > MAX_PIXELS:
            raise StudioError(
                f"{image}: {pixels:,} pixels; the studio takes up to {MAX_PIXELS:,} (its maps "
                "are kept in memory): correct one area at a time with --window COL ROW WIDTH "
                "HEIGHT (e.g. --window 0 0 6000 6000)"
            )
        started = time.perf_counter()
        store = folder / "features" / features_key(base.torch_module, versions[0].model, image)

        def progress(done: int, total: int) -> None:
            if log and (done == total or done % 16 == 0):
                log.info("features of %s: %d of %d blocks", image.name, done, total)

        features = scene_features(
            base.torch_module,
            RasterPixels(image),
            base.schema.num_classes,
            base.output_margin,
            store=store,
            progress=progress,
        )
        if log:
            log.info(
                "features of %s %s in %.1f s (%s)",
                image.name,
                "read" if features.read_back else "computed",
                time.perf_counter() - started,
                store,
            )
        session = cls(
            image=image,
            folder=folder,
            schema=base.schema,
            metadata=dict(base.metadata),
            module=base.torch_module,
            features=features,
            edits=EditLog(folder, image, base.schema, labels.resolve() if labels else None),
            versions=versions,
            current=current,
            tracking_uri=tracking_uri,
        )
        session.heads["base"] = features.head
        session.write_scene_table()
        session.ensure_maps(session.version)
        session.save_state()
        return session

    # -- versions ------------------------------------------------------------------------
    @property
    def version(self) -> Version:
        """The version the map shows now."""
        return self.versions[self.current]

    def head_of(self, version: Version) -> Head:
        """The head of a version (loaded from its logged model on first use after a restart)."""
        if version.id not in self.heads:
            loaded = artifacts.load(version.model, tracking_uri=self.tracking_uri, device="cpu")
            if loaded.torch_module is None:
                raise StudioError(f"{version.model}: not a PyTorch network")
            conv = find_head_conv(loaded.torch_module, self.schema.num_classes)
            base = self.heads["base"]
            bias = conv.bias.detach().clone() if conv.bias is not None else base.bias.clone()
            self.heads[version.id] = Head(conv.weight.detach().clone(), bias, base.relu)
        return self.heads[version.id]

    def push(
        self, version: Version, head: Head, classes: np.ndarray, confidence: np.ndarray
    ) -> None:
        """Make a new version current (versions after the current one, undone, are dropped),
        its map (`classes`, `confidence`) already computed by the fit."""
        self.heads[version.id] = head
        self.shown = (version.id, classes, confidence)
        self.versions = [*self.versions[: self.current + 1], version]
        self.current = len(self.versions) - 1
        self.ensure_maps(version)
        self.save_state()

    def step_back(self) -> Version | None:
        """Undo the last retrain: the previous version is current again (None: at the first)."""
        if self.current == 0:
            return None
        undone = self.version
        self.current -= 1
        self.save_state()
        return undone

    def save_state(self) -> None:
        """state.json, replaced whole."""
        state = {"versions": [v.to_dict() for v in self.versions], "current": self.current}
        write_text(self.folder / "state.json", json.dumps(state, indent=2))

    # -- maps ----------------------------------------------------------------------------
    def map_paths(self, version: Version) -> tuple[Path, Path]:
        """A version's class map and its confidence raster (as `landcover-predict` names them)."""
        classes = self.folder / "maps" / f"{version.id}_classes.tif"
        return classes, sibling(classes, "confidence")

    def map_of(self, version: Version) -> tuple[np.ndarray, np.ndarray]:
        """A version's class index and confidence of every pixel (computed once per version
        shown)."""
        shown = self.shown
        if shown is not None and shown[0] == version.id and shown[2] is not None:
            return shown[1], shown[2]
        classes, confidence = self.features.classes_and_confidence(self.head_of(version))
        self.shown = (version.id, classes, confidence)
        return classes, confidence

    def release_confidence(self) -> None:
        """Let go of the shown map's confidence while a retrain computes the next map (a whole
        tile's is 180 MB); read again by the next `map_of` if the retrain fails."""
        if self.shown is not None:
            self.shown = (self.shown[0], self.shown[1], None)

    def class_indices(self, version: Version | None = None) -> np.ndarray:
        """A version's class index of every pixel (the current version by default)."""
        return self.map_of(version or self.version)[0]

    def ensure_maps(self, version: Version) -> None:
        """Write a version's map and confidence once (they never change), the way
        `landcover-predict` writes maps: verified COGs with the model's colours, class names
        and a QGIS style, published together or not at all."""
        classes_path, confidence_path = self.map_paths(version)
        if classes_path.exists() and confidence_path.exists():
            return
        classes_path.parent.mkdir(exist_ok=True)
        classes, confidence = self.map_of(version)
        with rasterio.open(self.image) as src:
            profile = src.profile
        with ClassMapWriter(
            classes_path, profile=profile, schema=self.schema, confidence=True
        ) as writer:
            for rows in row_strips(classes.shape[0]):
                bytes_ = np.round(confidence[rows] * 255).astype(np.uint8)
                writer.write_rows(rows.start, classes[rows], bytes_)

    # -- corrections as data -------------------------------------------------------------
    def corrections_as_indices(self) -> np.ndarray:
        """The corrections as class indices, IGNORE_INDEX where uncorrected."""
        lookup = self.schema.lookup_table()
        indices = lookup[self.edits.labels()]
        return np.where(indices == IGNORE_INDEX, IGNORE_INDEX, indices).astype(np.uint8)

    def write_scene_table(self) -> None:
        """scenes.csv: the image and its corrections raster, what `data=corrections` reads."""
        table = f"image,label\n{self.image},{self.edits.raster.resolve()}\n"
        write_text(self.folder / "scenes.csv", table)
        if self.edits.base_labels is not None:
            mixed = f"image,label\n{self.image},{self.edits.mixed.resolve()}\n"
            write_text(self.folder / "mixed.csv", mixed)

    def owner_tags(self) -> dict[str, str]:
        """Tags that let a restarted studio find a retrain run its dead predecessor left open."""
        return {
            "landcover.command": "landcover-studio",
            "landcover.studio.session": str(self.folder.resolve()),
            "landcover.studio.host": socket.gethostname(),
            "landcover.studio.pid": str(os.getpid()),
        }


def features_key(module: Any, model: str, image: Path) -> str:
    """A name for the features of this network on this image: the network's weights, the
    reference it came from, and the image's path, size and modification time (a reopened
    session on the same file reads its features back; a changed file or model computes anew)."""
    digest = hashlib.sha256(f"{model}\n{image}\n".encode())
    stat = image.stat()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _read_state(folder: Path) -> dict[str, Any] | None:
    path = folder / "state.json"
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if not state["versions"] or not 0 <= int(state["current"]) < len(state["versions"]):
            raise ValueError("current version out of range")
        return state
    except (ValueError, KeyError, TypeError) as err:
        raise StudioError(f"{path}: not a studio state file ({err})") from err


def _check_image(image: Path, bands: int) -> int:
    try:
        with rasterio.open(image) as src:
            if src.count != bands:
                raise StudioError(f"{image}: {src.count} bands, the model reads {bands}")
            return int(src.width * src.height)
    except rasterio.errors.RasterioIOError as err:
        raise StudioError(f"{image}: cannot be read as a raster ({err})") from err
