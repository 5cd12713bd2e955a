"""Checkpoints: written whole or not at all, and read without running code from the file.

A checkpoint holds tensors and plain data only (numbers, strings, lists, dicts: the config as
YAML text, the model metadata, the fit state), so `torch.load(weights_only=True)` reads it and
a crafted file cannot make loading execute anything.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

from landcover.atomic import atomic_target
from landcover.errors import ConfigError, LandcoverError
from landcover.models.files import convert_hint


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


def link_checkpoint(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source` (a hard link: no extra space until `source`
    is replaced), or a copy where the filesystem has no hard links; atomic either way."""
    with atomic_target(target) as tmp:
        try:
            tmp.unlink()
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def read_checkpoint(
    path: Path, error: type[LandcoverError] = ConfigError, map_location: str = "cpu"
) -> dict[str, Any]:
    """The checkpoint's contents; pickled objects are refused, never executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise error(convert_hint(str(path))) from err
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{path}: not a readable checkpoint ({first})") from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config value trainer.resume_from={path}: checkpoint does not exist")
    return read_checkpoint(path)
