"""The co-selection counts of docs/method.md §4 and what peer-pull reads of them.

``C[e, f]`` counts the (slot, slot) pairs of one token with experts ``e != f``.
A batch of T tokens with k slots gives at most T·k·(k−1) non-zero entries, so
``C`` comes either dense ``(N, N)`` (small N, tests, the reference) or compact:
a sparse COO ``(N, N)`` tensor with only those entries, which adds across
micro-batches and data-parallel ranks without an N × N matrix anywhere.
Peer-pull needs only ``Σ_f C[e, f] K_f`` and ``Σ_f C[e, f]`` (``f != e``):
:func:`peer_sums` makes both from either form, for ``some.keystore_update``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["coselect_counts", "peer_sums"]


@torch.no_grad()
def coselect_counts(indices: Tensor, num_experts: int, *, sparse: bool = False) -> Tensor:
    """``C`` of the ``(T, k)`` selections ``indices`` (``-1``: an empty slot), int64,
    dense or sparse COO (coalesced). Indices outside ``0..N-1`` count as empty slots, as
    in the CUDA kernels, which skip them unchecked (the CPU op has raised on them before)."""
    N = num_experts
    T, k = indices.shape
    if sparse and indices.device.type == "meta":  # no values to find the pairs in: an empty C of the shape
        empty = indices.new_zeros(2, 0)
        return torch.sparse_coo_tensor(empty, indices.new_zeros(0), (N, N), check_invariants=False)
    valid = (indices >= 0) & (indices < N)
    a = indices.unsqueeze(2).expand(T, k, k)
    b = indices.unsqueeze(1).expand(T, k, k)
    both = valid.unsqueeze(2) & valid.unsqueeze(1) & (a != b)
    if not sparse:  # a scatter into N² + 1 cells (the last one takes the non-pairs): no host sync
        cells = torch.where(both, a * N + b, N * N).reshape(-1)
        dense = torch.zeros(N * N + 1, dtype=torch.long, device=indices.device)
        return dense.scatter_add_(0, cells, torch.ones_like(cells))[:-1].reshape(N, N)
    # compact: the distinct pairs and their counts (their number is data-dependent: on a
    # GPU this reads it back, one synchronization)
    cells, counts = torch.unique(a[both] * N + b[both], sorted=True, return_counts=True)
    return torch.sparse_coo_tensor(torch.stack([cells // N, cells % N]), counts, (N, N), is_coalesced=True,
                                   check_invariants=False)


@torch.no_grad()
def peer_sums(coselect: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ_f C[e, f] K_f, Σ_f C[e, f])`` over ``f != e``: ``(N, d)`` in the keys' dtype, ``(N,)`` int64."""
    N = keys.shape[0]
    if coselect.is_sparse:
        C = coselect.coalesce()
        (e, f), n = C.indices(), C.values()
        n = n * (e != f)  # (counts never hold e == f; a hand-made C might)
        count = torch.zeros(N, dtype=torch.long, device=keys.device).index_add_(0, e, n)
        weights = torch.sparse_coo_tensor(C.indices(), n.to(keys.dtype), C.shape, is_coalesced=True,
                                          check_invariants=False)
        return torch.sparse.mm(weights, keys), count  # (a sparse product: 8x an index_add here)
    C = coselect.clone().fill_diagonal_(0)
    return C.to(keys.dtype) @ keys, C.sum(1)
