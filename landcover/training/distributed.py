"""Data parallelism with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node=4 -m landcover.training.train data=chesapeake_sample model=unet
    torchrun --nnodes=2 --node_rank=0 --rdzv-endpoint=host:29500 --nproc_per_node=8 \
        -m landcover.training.train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and the
code runs as one process. `data.batch_size` and `data.patches_per_epoch` stay *global*: each of
the N ranks takes its own block of every global batch (`GlobalBatchShard`), so N processes take
the same optimisation steps as one process would (tested to a tolerance on CPU with gloo).
Batch norm statistics are reduced across ranks in training (`DistributedBatchNorm2d`) for the
same reason; torch's SyncBatchNorm is CUDA-only, this one works with gloo and NCCL alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn
from torch.utils.data import Sampler

from landcover.ranks import SINGLE_PROCESS as SINGLE_PROCESS  # re-exported
from landcover.ranks import DistributedContext as DistributedContext
from landcover.ranks import context_from_env as context_from_env

T = TypeVar("T")


def init(device_type: str) -> DistributedContext:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA)."""
    context = context_from_env()
    if context.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return context


def shutdown() -> None:
    """Destroy the process group if one was started, so a torchrun rank exits cleanly."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place across ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class GlobalBatchShard(Sampler[int]):
    """Rank r's block of each global batch: indices [b*B + r*B/N, b*B + (r+1)*B/N)."""

    def __init__(self, length: int, global_batch: int, context: DistributedContext) -> None:
        if global_batch % context.world_size:
            raise ValueError(
                f"data.batch_size={global_batch} (the global batch) must divide by the "
                f"{context.world_size} processes"
            )
        self.length = length
        self.global_batch = global_batch
        self.local_batch = global_batch // context.world_size
        self.rank = context.rank

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self.length - self.global_batch + 1, self.global_batch):
            first = start + self.rank * self.local_batch
            yield from range(first, first + self.local_batch)

    def __len__(self) -> int:
        return (self.length // self.global_batch) * self.local_batch


class StridedShard(Sampler[int]):
    """Every N-th item from the rank's own offset: validation tiles split across ranks."""

    def __init__(self, length: int, context: DistributedContext) -> None:
        self.indices = range(context.rank, length, context.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics cover the global batch (all ranks).

    The sums are reduced with a differentiable all-reduce, so gradients flow across ranks
    exactly as they would through one process's batch norm over the whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch statistics summed over every rank with a differentiable all-reduce, so the gradient
        sees the global batch."""
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        channels = x.shape[1]
        # sums in float64: E[x^2] - E[x]^2 in float32 loses digits to cancellation
        wide = x.double()
        count = torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)
        local = torch.cat([wide.sum(dim=(0, 2, 3)), (wide * wide).sum(dim=(0, 2, 3)), count])
        total = dist_functional.all_reduce(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).to(x.dtype)
        mean = mean.to(x.dtype)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 0.1
                unbiased = var * n / max(float(n) - 1, 1.0)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap plain BatchNorm2d layers for DistributedBatchNorm2d (same state, in place)."""
    for layer in module.modules():
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = DistributedBatchNorm2d
    return module


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo `sync_batchnorm` (before logging a model for use in one process)."""
    for layer in module.modules():
        if type(layer) is DistributedBatchNorm2d:
            layer.__class__ = nn.BatchNorm2d  # type: ignore[assignment]  # the swap undone
    return module
