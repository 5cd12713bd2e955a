"""Which torchrun rank this process is, without importing torch.

Console scripts ask this before anything heavy is imported (their `--help` must stay fast);
`landcover.training.distributed` builds the process group and the data-parallel parts on top of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among torchrun's ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether several processes share the work."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process records (rank 0)."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def context_from_env() -> DistributedContext:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (one process without them)."""
    return DistributedContext(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def hydra_overrides_for_rank(context: DistributedContext) -> list[str]:
    """Ranks other than 0 write no Hydra output folder of their own (one run, one folder)."""
    if context.is_main:
        return []
    scratch = tempfile.mkdtemp(prefix=f"landcover-rank{context.rank}-")
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


def remove_rank_scratch(overrides: list[str]) -> None:
    """Remove the scratch folder `hydra_overrides_for_rank` made (nothing is kept there)."""
    for override in overrides:
        if override.startswith("hydra.run.dir="):
            shutil.rmtree(override.split("=", 1)[1], ignore_errors=True)
