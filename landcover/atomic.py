"""Files written whole or not at all.

Every output a user or a later run relies on (scenes, checkpoints, ONNX files) is written to a
temporary file beside its target and renamed onto it only once complete: an interrupted run
never leaves a half-written file at the target path, nor loses the one that was there.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_target(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; renamed onto `target` when the block
    succeeds, removed when it fails. Readable by others (0644), like a normally created file."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
