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

from landcover.artifacts.files import convert_hint
from landcover.atomic import atomic_target
from landcover.errors import ConfigError, LandcoverError


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """`state` at `path`, whole or not at all (a killed process leaves the old file)."""
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
    """The checkpoint `trainer.resume_from` names."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config value trainer.resume_from={path}: checkpoint does not exist")
    return read_checkpoint(path)


class CheckpointManager:
    """The checkpoint files of one training run.

    last.pt every epoch, best.pt when the monitor improved (a hard link to last.pt, so no
    second copy while they are the same epoch), epoch_NNN.pt only if asked to keep some: each
    is a whole model, and twenty short runs must not fill a disk. Only the process that
    records (rank 0) writes.
    """

    def __init__(self, directory: Path, *, keep_epochs: int, enabled: bool = True) -> None:
        self.directory = directory
        self.keep_epochs = keep_epochs
        self.enabled = enabled

    def save(self, state: dict[str, Any], epoch: int, improved: bool) -> None:
        """Write last.pt (and best.pt, epoch_NNN.pt as the policy says), each atomically."""
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        last = self.directory / "last.pt"
        save_checkpoint(state, last)
        if improved:
            link_checkpoint(last, self.directory / "best.pt")
        if self.keep_epochs > 0:
            link_checkpoint(last, self.directory / f"epoch_{epoch:03d}.pt")
            for old in sorted(self.directory.glob("epoch_*.pt"))[: -self.keep_epochs]:
                os.remove(old)

    def best(self, map_location: str = "cpu") -> dict[str, Any] | None:
        """The best epoch's checkpoint, if one was written."""
        path = self.directory / "best.pt"
        return read_checkpoint(path, map_location=map_location) if path.exists() else None

    def bytes_used(self) -> int:
        """Disk space the checkpoints use (hard links counted once)."""
        seen: set[int] = set()
        total = 0
        for path in self.directory.glob("*.pt"):
            status = path.stat()
            if status.st_ino not in seen:
                seen.add(status.st_ino)
                total += status.st_size
        return total

    def remove(self) -> int:
        """Delete this run's checkpoints (what a finished sweep trial no longer needs); returns
        the bytes freed."""
        freed = self.bytes_used()
        for name in ("last.pt", "best.pt"):
            (self.directory / name).unlink(missing_ok=True)
        for path in self.directory.glob("epoch_*.pt"):
            path.unlink(missing_ok=True)
        return freed

    def summary(self) -> str:
        """One log line: how much space, where, which files."""
        kept = f", {self.keep_epochs} per-epoch" if self.keep_epochs else ""
        return f"{self.bytes_used() / 1e6:.1f} MB in {self.directory} (last.pt, best.pt{kept})"
