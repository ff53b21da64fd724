"""The counter-based generator of the frozen experts (docs/method.md §9), in plain PyTorch.

The same generator as ``csrc/philox.h`` ("some-philox-v1": Philox-4x32-10 and
the mapping described there), bit for bit: element ``i`` of tensor ``t``
(W1 = 0, b1 = 1, W2 = 2, b2 = 3) of expert ``e`` in layer ``l`` of a model with
seed ``s`` is a pure function of ``(s, l, e, t, i)``, drawn U(-1/√fan_in,
1/√fan_in) as ``nn.Linear`` draws. The native kernels use the C++ copy; this
one serves the torch backend and machines without the extension, and the tests
hold the two against each other and against the published test vectors.

    fill_expert_weights(w1, b1, w2, b2, seed=42, layer=3)   # stored experts, in place
    expert_tensor(42, 3, expert=5, tensor=W1, shape=(h, d), fan_in=d)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import native
from .backend import backend_for

__all__ = ["B1", "B2", "GENERATOR", "W1", "W2", "expert_tensor", "fill_expert_weights", "philox4x32_10"]

GENERATOR = "philox4x32-10/some-philox-v1"
W1, B1, W2, B2 = 0, 1, 2, 3  # tensor ids
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * m for a in [0, 2^32) as int64, without overflowing int64."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low >> 32), low & _MASK


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox-4x32-10 of the counters (int64 tensors holding 32-bit values) under the key (k0, k1)."""
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _WEYL0) & _MASK, (k1 + _WEYL1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _bound(fan_in: int) -> Tensor:
    return torch.tensor(1.0 / math.sqrt(fan_in), dtype=torch.float32)  # float32(1/√fan_in), as the C++


def expert_tensor(seed: int, layer: int, expert: int, tensor: int, shape: tuple[int, ...], fan_in: int,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Tensor:
    """One expert's tensor, generated in float32 and rounded to ``dtype``."""
    n = math.prod(shape)
    blocks = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(blocks, v)  # noqa: E731
    out = philox4x32_10(blocks & _MASK, blocks >> 32, full(expert), full(tensor), seed & _MASK, layer & _MASK)
    bits = torch.stack(out, dim=1).reshape(-1)[:n]  # element 4b + lane
    u = (bits >> 8).to(torch.float32) * 5.9604644775390625e-08  # exact: a 24-bit integer times 2^-24
    centered = (u + u) - 1.0  # exact
    return (centered * _bound(fan_in).to(device)).reshape(shape).to(dtype)


@torch.no_grad()
def fill_expert_weights(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, seed: int, layer: int,
                        first_expert: int = 0) -> None:
    """Fill stored experts ``w1 (n, h, d)``, ``b1 (n, h)``, ``w2 (n, d, h)``, ``b2 (n, d)`` (experts
    ``first_expert ..``) from the generator, in place: the native kernel where it serves the device,
    else the plain-PyTorch generator above (the same bits either way)."""
    if backend_for(w1.device) == "native" and native.built_for(w1.device) and w1.device.type != "meta":
        torch.ops.some.fill_expert_weights(w1, b1, w2, b2, int(seed), int(layer), int(first_expert))
        return
    n, h, d = w1.shape
    for i in range(n):
        e = first_expert + i
        w1[i].copy_(expert_tensor(seed, layer, e, W1, (h, d), d, w1.dtype, w1.device))
        b1[i].copy_(expert_tensor(seed, layer, e, B1, (h,), d, b1.dtype, b1.device))
        w2[i].copy_(expert_tensor(seed, layer, e, W2, (d, h), h, w2.dtype, w2.device))
        b2[i].copy_(expert_tensor(seed, layer, e, B2, (d,), h, b2.dtype, b2.device))
