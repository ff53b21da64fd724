"""Causal multi-head self-attention with rotary positions (no parameters for positions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CausalSelfAttention", "KVCache", "RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), rotate-half form; no parameters."""

    def __init__(self, head_dim: int, base: float = 10000.0, device=None):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        # q, k: (B, H, S, hd) at positions offset..offset+S-1; angles in float32 so
        # long sequences keep their precision
        S = q.shape[-2]
        t = torch.arange(offset, offset + S, device=q.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    """Fused qkv ``Linear(d, 3d)`` with bias, SDPA with a causal mask, output ``Linear(d, d)`` with bias."""

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=True, device=device, dtype=dtype)  # fused q, k, v
        self.out = nn.Linear(d_model, d_model, bias=True, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(d_model // n_heads, rope_base, device=device)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        B, S, d = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, S, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        past = 0 if cache is None else cache.length
        q, k = self.rotary(q, k, offset=past)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, past + S, hd)
        if past == 0:
            # Causal attention alone suffices for right-padded batches: a real token
            # only sees earlier positions, which are real too. Padding positions
            # attend to real tokens (harmless: their outputs are masked in the loss).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, hd)
        else:  # new tokens after cached ones: token i sees the past and the new tokens up to itself
            visible = torch.ones(S, past + S, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.out(y.transpose(1, 2).reshape(B, S, d))


class KVCache:
    """The keys and values of one attention layer for the tokens seen so far
    (generation): preallocated for ``capacity`` positions, filled in order."""

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, *, device=None,
                 dtype: torch.dtype = torch.float32):
        self.k = torch.empty(batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` ``(B, H, S, hd)`` after the cached positions; all of them so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KVCache holds {self.k.shape[2]} positions; {end} requested")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
