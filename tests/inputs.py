"""Seeded test inputs shared by the CPU and CUDA op tests (values drawn in
float64 on the CPU, then cast and moved, so every device sees the same numbers)."""
from __future__ import annotations

import math

import torch


def make_route_inputs(T, d, N, dtype=torch.float64, device="cpu", seed=0):
    """Router outputs (T, d), keys (N, d) and top_any thresholds (N,)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    K = torch.randn(N, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    thr = (0.3 * torch.randn(N, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
    return q, K, thr


def make_experts(N, d, h, dtype=torch.float64, device="cpu", seed=1):
    """Frozen expert weights w1 (N, h, d), b1 (N, h), w2 (N, d, h), b2 (N, d)."""
    g = torch.Generator().manual_seed(seed)
    def mk(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])).to(device=device, dtype=dtype)
    return mk(N, h, d), mk(N, h), mk(N, d, h), mk(N, d)


def random_routing(T, N, k, dtype, device="cpu", seed=0, empty_frac=0.15):
    """k distinct experts per token, a share `empty_frac` of slots empty (-1, gate 0)."""
    g = torch.Generator().manual_seed(seed)
    idx = (torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(T)]) if T
           else torch.zeros(0, k, dtype=torch.long))
    idx[torch.rand(T, k, generator=g) < empty_frac] = -1
    gates = torch.rand(T, k, generator=g, dtype=torch.float64)
    gates[idx < 0] = 0
    return idx.to(device), gates.to(device=device, dtype=dtype)


def update_op_inputs(stats, keys):
    """The statistics as ``torch.ops.some.keystore_update`` takes them: the co-selection
    counts as their peer-pull sums (some.ops.keystore_update makes these itself)."""
    from some.ops.coselect import peer_sums

    return (*stats[:3], *peer_sums(stats[3], keys))
