"""What a run read, as MLflow datasets: the run page lists them under "Datasets", and metrics
logged with one (`dataset=`) say which data they were computed on.

Scenes are large rasters, so a dataset record holds no pixels: a name, the data fingerprint
as digest, the root folder (or the list of inputs) as source, and a profile a person reads
(scenes, pixels, labelled pixels, the share of each class).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from landcover.data.scenes import Scene, class_pixel_totals, dataset_fingerprint, is_remote
from landcover.data.schema import ClassSchema


class ProfiledDataset(MetaDataset):
    """MLflow's metadata-only dataset with a profile (MetaDataset records none)."""

    def __init__(self, source: Any, name: str, digest: str, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        """Counts and class shares, shown on the run page beside the dataset."""
        return self._profile

    def to_dict(self) -> dict[str, str]:
        """MetaDataset's record plus the profile as JSON (what MLflow stores)."""
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def scenes_profile(scenes: Sequence[Scene], schema: ClassSchema) -> dict[str, Any]:
    """Scenes, pixels, labelled pixels and each class's share of the labelled pixels."""
    profile: dict[str, Any] = {
        "scenes": len(scenes),
        "pixels": sum(scene.pixels for scene in scenes),
    }
    totals = class_pixel_totals(scenes)
    if totals is not None:
        labelled = sum(totals)
        profile["labelled_pixels"] = labelled
        profile["class_share"] = {
            name: round(count / labelled, 5) if labelled else 0.0
            for name, count in zip(schema.names, totals, strict=True)
        }
    return profile


def scenes_dataset(
    name: str, root: str, scenes: Sequence[Scene], schema: ClassSchema
) -> ProfiledDataset:
    """One split's scenes as a dataset: digest = their fingerprint, source = the data root."""
    return ProfiledDataset(
        source_of(str(root)),
        name=name,
        digest=dataset_fingerprint(scenes),
        profile=scenes_profile(scenes, schema),
    )


def inputs_dataset(name: str, spec: str, inputs: Sequence[str], pixels: int) -> ProfiledDataset:
    """The rasters a mapping job read (no labels): digest = a hash of their hrefs."""
    digest = hashlib.sha256("\n".join(sorted(inputs)).encode()).hexdigest()[:16]
    local = Path(spec)
    where = spec if is_remote(spec) or local.exists() else str(local.parent)  # a glob: its folder
    profile = {"inputs": len(inputs), "pixels": pixels, "spec": spec[:500]}
    return ProfiledDataset(source_of(where), name=name, digest=digest, profile=profile)


def source_of(where: str) -> Any:
    """MLflow's source for a local folder or file (made absolute) or a URL. MLflow's resolver
    warns that a local path fits two of its source types (both the local one): not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return resolve_dataset_source(where if is_remote(where) else str(Path(where).resolve()))


def log_datasets(datasets: dict[str, ProfiledDataset]) -> None:
    """Log each dataset as an input of the active run, its context the key (train, val...)."""
    for context, dataset in datasets.items():
        log_input_once_shared(dataset, context)


def log_input_once_shared(dataset: ProfiledDataset, context: str, attempts: int = 3) -> None:
    """`mlflow.log_input`, safe when parallel runs log the same dataset at the same moment.

    MLflow's stores look the dataset up, then insert it: two sweep trials of one experiment
    that both miss it both insert, and the second fails on the unique (experiment, name,
    digest) key (SQLite "UNIQUE constraint failed", PostgreSQL "duplicate key"), failing a
    trial that did nothing wrong. Asked again, the store finds the row the other run wrote and
    links it; any other error is not ours to retry.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as err:
            said = str(err)
            raced = "UNIQUE constraint failed" in said or "duplicate key value" in said
            if not raced or attempt == attempts - 1:
                raise
