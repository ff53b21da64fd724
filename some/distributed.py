"""Data-parallel training support (torchrun + DistributedDataParallel).

SoME's one twist on ordinary data parallelism: the key stores are updated
outside autograd (SPEC §4), from statistics of *all* tokens of the step. Each
rank only sees its shard of the batch, so before every key-store update the
ranks all-reduce the statistics (they are sums); every rank then applies the
same update to the same keys and the stores stay identical without ever being
broadcast.

Launch with ``torchrun --nproc_per_node=P -m some.train ...``; a plain
``python -m some.train`` (no ``WORLD_SIZE`` in the environment) runs as a
single process with no process group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown", "barrier", "all_reduce_keystore_stats",
           "all_reduce_sum", "shard_range", "PeerLostError"]


class PeerLostError(RuntimeError):
    """A collective failed or timed out: another rank died or stopped responding."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> DistContext:
    """Join the process group that torchrun describes in the environment.

    NCCL on CUDA, gloo on the CPU. ``timeout_s`` bounds every collective: a
    rank that dies makes the others fail with :class:`PeerLostError` after at
    most that long instead of hanging forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, timeout_s=timeout_s)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _collective(ctx: DistContext, fn, what: str):
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL timeouts and closed connections
        raise PeerLostError(
            f"rank {ctx.rank}/{ctx.world_size}: {what} failed; another rank probably died or stopped "
            f"responding (collective timeout {ctx.timeout_s:g} s): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def barrier(ctx: DistContext) -> None:
    """Wait for every rank, bounded by the timeout; a no-op for one process."""
    if ctx.enabled:
        # an all-reduce of one number is a barrier that honours the group's timeout
        flag = torch.zeros(1, device="cuda" if ctx.backend == "nccl" else "cpu")
        _collective(ctx, lambda: dist.all_reduce(flag), "barrier")


def all_reduce_sum(ctx: DistContext, tensors: Sequence[torch.Tensor], what: str = "all-reduce") -> None:
    """Sum tensors in place over the ranks (one flat buffer per dtype)."""
    if not ctx.enabled:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        _collective(ctx, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM), what)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_keystore_stats(ctx: DistContext, layers) -> None:
    """Sum every SoME layer's pending key-store statistics over the ranks, in
    place, so that each rank's ``update_keys()`` sees the statistics of the
    whole global batch. A rank without statistics (e.g. an all-padding shard)
    contributes zeros."""
    if not ctx.enabled:
        return
    tensors = [t for layer in layers for t in layer.pending_reducibles()]
    all_reduce_sum(ctx, tensors, what="all-reduce of the key-store statistics")


def shard_range(n: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``n`` items (the first ``n % P`` ranks get one more)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (1 if ctx.rank < extra else 0))
