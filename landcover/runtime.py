"""Where and how a process computes: device, arithmetic, threads, seeds.

Training, prediction and model loading all turn `device=auto` into a device here, so the rule
("CUDA when there is one") is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from landcover.errors import LandcoverError
from landcover.training import distributed as dist


def select_device(name: str, key: str = "device") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU; asking for CUDA where
    there is none is an error naming the config `key`."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LandcoverError(f"config value {key}={name} but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch and numpy; `deterministic` also asks torch for reproducible kernels."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class Runtime:
    """The device, arithmetic and process group one training process uses."""

    device: torch.device
    bf16: bool
    channels_last: bool
    distributed: dist.DistributedContext


def start(trainer: Any, seed: int) -> Runtime:
    """Threads, seeds, device and (under torchrun) the process group, in that order, from the
    `trainer` config.

    bf16 autocast and channels-last memory pay off on CUDA only: `precision=auto` and
    `channels_last` mean "where it helps".
    """
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    seed_everything(seed, trainer.deterministic)
    chosen = select_device(trainer.device, "trainer.device")
    distributed = dist.init(chosen.type)
    if distributed.enabled and chosen.type == "cuda":
        chosen = torch.device("cuda", distributed.local_rank)
    on_cuda = chosen.type == "cuda"
    precision = str(trainer.precision)
    bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
    return Runtime(chosen, bf16, trainer.channels_last and on_cuda, distributed)
