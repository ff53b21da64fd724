"""Data-parallel training support (torchrun + DistributedDataParallel).

SoME's one twist on ordinary data parallelism: the key stores are updated
outside autograd (docs/method.md §4), from statistics of *all* tokens of the step. Each
rank only sees its shard of the batch, so before every key-store update the
ranks all-reduce the statistics (they are sums); every rank then applies the
same update to the same keys and the stores stay identical without ever being
broadcast.

Launch with ``torchrun --nproc_per_node=P -m some train ...``; a plain
``python -m some train`` (no ``WORLD_SIZE`` in the environment) runs as a
single process with no process group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, PeerLostError, SomeError

__all__ = ["SINGLE_PROCESS", "DataParallel", "DistContext", "all_reduce_keystore_stats", "all_reduce_sum", "barrier",
           "init_distributed",
           "shard_range", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()  # a world of one: every collective is a no-op


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
            f"responding (collective timeout {ctx.timeout_s:g} s): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
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
        _collective(ctx, lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM), what)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_keystore_stats(ctx: DistContext, layers) -> None:
    """Sum every SoME layer's pending key-store statistics over the ranks, in
    place, so that each rank's ``update_keys()`` sees the statistics of the
    whole global batch (and, with revival on, gather every rank's candidate
    queries). A rank without statistics (e.g. an all-padding shard)
    contributes zeros."""
    if not ctx.enabled:
        return
    tensors = [t for layer in layers for t in layer.pending_reducibles()]
    all_reduce_sum(ctx, tensors, what="all-reduce of the key-store statistics")
    for layer in layers:  # the co-selection counts, compact: gathered, summed
        layer.set_pending_coselect(sparse_sum(ctx, layer.pending_coselect(),
                                              what="all-gather of the co-selection counts"))
    # dead-key revival draws from the routed tokens of all ranks: gather each rank's candidates
    for layer in layers:
        local = layer.pending_candidates()
        if local is not None:
            gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
            _collective(ctx, lambda g=gathered, t=local: dist.all_gather(g, t.contiguous()),
                        "all-gather of the revival candidates")
            layer.set_pending_candidates(torch.cat(gathered))


def sparse_sum(ctx: DistContext, t: torch.Tensor, what: str = "all-gather") -> torch.Tensor:
    """The sum over the ranks of a sparse COO tensor, coalesced (the same on every rank): its
    entries are gathered, not a dense all-reduce, so the traffic follows the non-zeros."""
    t = t.coalesce()
    if not ctx.enabled:
        return t
    indices, values = t.indices(), t.values()
    n = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world_size)]
    _collective(ctx, lambda: dist.all_gather(sizes, n), what)
    longest = int(max(int(s) for s in sizes))
    if longest == 0:  # every rank knows it now: no empty collectives
        return t
    padded_i = indices.new_zeros(indices.shape[0], longest)
    padded_i[:, :values.numel()] = indices
    padded_v = values.new_zeros(longest)
    padded_v[:values.numel()] = values
    all_i = [torch.empty_like(padded_i) for _ in range(ctx.world_size)]
    all_v = [torch.empty_like(padded_v) for _ in range(ctx.world_size)]
    _collective(ctx, lambda: dist.all_gather(all_i, padded_i), what)
    _collective(ctx, lambda: dist.all_gather(all_v, padded_v), what)
    size = [int(s) for s in sizes]
    return torch.sparse_coo_tensor(torch.cat([i[:, :m] for i, m in zip(all_i, size)], dim=1),
                                   torch.cat([v[:m] for v, m in zip(all_v, size)]), t.shape,
                                   check_invariants=False).coalesce()


def shard_range(n: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``n`` items (the first ``n % P`` ranks get one more)."""
    base, extra = divmod(n, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (1 if ctx.rank < extra else 0))


class DataParallel:
    """The data-parallel context of a run: the process group (under torchrun),
    this rank's device and share of each batch, the DDP wrapper, and
    collective failures turned into :class:`~some.errors.PeerLostError`.
    A single process is a world of one, where every method is a no-op."""

    def __init__(self, ctx: DistContext, device: torch.device):
        self.ctx, self.device = ctx, device

    @classmethod
    def from_env(cls, device: torch.device, timeout_s: float = 600.0) -> DataParallel:
        ctx = init_distributed(device, timeout_s)
        if ctx.enabled and device.type == "cuda":
            device = torch.device("cuda", ctx.local_rank)
        return cls(ctx, device)

    @property
    def enabled(self) -> bool:
        return self.ctx.enabled

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def barrier(self) -> None:
        barrier(self.ctx)

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items."""
        return shard_range(n, self.ctx)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to fill a cache), then the others."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def check_batch(self, batch_size: int, grad_accum: int) -> None:
        if self.enabled and batch_size % (self.world_size * grad_accum):
            raise ConfigError(f"batch_size = {batch_size} must be divisible by world size x grad_accum = "
                              f"{self.world_size} x {grad_accum}")

    def wrap(self, model: torch.nn.Module, *, find_unused_parameters: bool = False) -> torch.nn.Module | None:
        """The DDP wrapper of ``model`` (None for one process). Gradients are
        all-reduced in backward; rank 0's parameters and buffers are broadcast
        once here. Buffers are not re-broadcast each step: the key stores stay
        identical through the reduced statistics."""
        if not self.enabled:
            return None
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            # avg_k gates do not depend on the scores, and top_any thresholds
            # can miss a step: their parameters may get no gradient
            find_unused_parameters=find_unused_parameters)

    @contextlib.contextmanager
    def peer_errors(self) -> Iterator[None]:
        """Inside, a failed collective (DDP's gradient all-reduce fails inside
        backward when a peer is gone) becomes one :class:`PeerLostError`."""
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            if not self.enabled or isinstance(e, SomeError):
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PeerLostError(f"rank {self.rank}/{self.world_size}: a collective failed; another rank probably "
                                f"died or stopped responding (timeout {self.ctx.timeout_s:g} s): {first}") from None

    def close(self) -> None:
        shutdown(self.ctx)
