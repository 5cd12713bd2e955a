"""Models on disk without pickle: weights in safetensors, everything else in JSON.

A model file a user is handed must never run code when loaded. Pickle (what `torch.save` of a
module and MLflow's PyTorch flavour use) executes whatever the file says, so a landcover model
is stored as its tensors (safetensors: a header and raw numbers) plus its metadata (JSON: the
architecture's config, class schema, bands, normalisation); loading rebuilds the network from
this package's own code and copies the tensors in. The per-pixel GBM's fitted trees travel as a
tensor of skops bytes, loaded with a fixed list of trusted types (see `pixel_gbm`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from landcover.errors import LandcoverError

FORMAT = 2  # 1: pickled modules (landcover before this module); 2: safetensors + JSON
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "landcover_model.json"


class UnsafeModelError(LandcoverError):
    """A model stored in a format that would run code when loaded."""


def convert_hint(reference: str) -> str:
    """What to tell a user whose model file is a pickle (refused, never loaded)."""
    return (
        f"{reference} was saved by an older landcover as a pickle, which can run code when "
        "loaded, so it is not loaded. If you trust where it came from, convert it once: "
        f"landcover-convert-model {reference} --trust"
    )


def rebuild(
    metadata: Mapping[str, Any], where: str = "the model's landcover_model.json"
) -> torch.nn.Module:
    """The network the metadata describes, with fresh weights (this package's code only): the
    one place a saved model (a logged model's JSON, a checkpoint's metadata and config) becomes
    a network again. `where` names the file in errors."""
    from landcover.models import build_model

    if "model" not in metadata:
        raise LandcoverError(
            "model metadata has no 'model' config (architecture and its settings): "
            "it was not saved by this version of landcover"
        )
    from landcover.artifacts.bounds import check_stored_model

    check_stored_model(metadata, metadata["model"], where)  # before anything is built
    config = dict(metadata["model"])
    if config.get("encoder_weights"):
        config["encoder_weights"] = None  # the saved tensors replace them: no download
    return build_model(
        config,
        in_channels=int(metadata["bands"]),
        num_classes=len(metadata["schema"]["classes"]),
        mean=list(metadata["normalize"]["mean"]),
        std=list(metadata["normalize"]["std"]),
        config_version=int(metadata.get("config_version", 1)),
    )


def save(model: torch.nn.Module, directory: Path, metadata: Mapping[str, Any]) -> None:
    """Write `weights.safetensors` and `landcover_model.json` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"landcover_format": str(FORMAT)})
    (directory / METADATA_FILE).write_text(json.dumps({**metadata, "landcover_format": FORMAT}))


def load(directory: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild and fill the model saved in `directory`; no file content is executed."""
    weights, meta = directory / WEIGHTS_FILE, directory / METADATA_FILE
    if not weights.is_file() or not meta.is_file():
        raise UnsafeModelError(convert_hint(str(directory)))
    try:
        metadata = json.loads(meta.read_text())
    except (OSError, ValueError) as err:
        raise LandcoverError(f"{directory}: unreadable model files ({err})") from err
    if not isinstance(metadata, dict) or "model" not in metadata:
        raise LandcoverError(f"{meta}: not landcover model metadata (no 'model' config)")
    from landcover.artifacts.bounds import check_stored_model

    check_stored_model(metadata, metadata["model"], str(meta))  # before any allocation
    try:
        state = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as err:
        raise LandcoverError(f"{directory}: unreadable model files ({err})") from err
    model = rebuild(metadata)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise LandcoverError(f"{directory}: weights do not fit the architecture ({first})") from err
    return model.eval(), metadata
