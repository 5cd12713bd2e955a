"""Checkpoints: written whole or not at all, so a crash never leaves one half-written."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from landcover.atomic import atomic_target
from landcover.errors import ConfigError


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


def copy_checkpoint(source: Path, target: Path) -> None:
    with atomic_target(target) as tmp:
        shutil.copyfile(source, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config value trainer.resume_from={path}: checkpoint does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise ConfigError(f"{path}: not a readable checkpoint ({err})") from err
