"""A decoder-only language model whose feed-forward layers are SoME layers (SPEC §2).

    token embedding (V, d)
    L x Block:  x = x + Attention(LayerNorm(x))      causal MHA, rotary positions
                x = x + SoMELayer(LayerNorm(x))      router -> key store -> k of N frozen experts
    final LayerNorm -> LM head (d, V), not tied to the embedding

With V=8192, d=512, L=10, h=1024 the trainable parameters are 29,417,472 for
any N, plus N * 10 * 1,050,112 frozen expert parameters.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SoMEConfig
from .layer import SoMELayer

__all__ = ["CausalLMOutput", "RotaryEmbedding", "SoMEForCausalLM", "format_parameter_counts", "lm_loss"]


class CausalLMOutput(NamedTuple):
    logits: Tensor  # (B, S, V)
    loss: Tensor | None  # () mean next-token loss over real tokens, None without labels


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), rotate-half form; no parameters."""

    def __init__(self, head_dim: int, base: float = 10000.0, device=None):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        # q, k: (B, H, S, hd); angles in float32 so long sequences keep their precision
        S = q.shape[-2]
        t = torch.arange(S, device=q.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SoMEConfig, device=None, dtype=None):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=True, device=device, dtype=dtype)  # fused q, k, v
        self.out = nn.Linear(d, d, bias=True, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(d // config.n_heads, config.rope_base, device=device)

    def forward(self, x: Tensor) -> Tensor:
        B, S, d = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, S, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        q, k = self.rotary(q, k)
        # Causal attention alone suffices for right-padded batches: a real token
        # only sees earlier positions, which are real too. Padding positions
        # attend to real tokens (harmless: their outputs are masked in the loss).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, S, hd)
        return self.out(y.transpose(1, 2).reshape(B, S, d))


class Block(nn.Module):
    def __init__(self, config: SoMEConfig, layer_seed: int, device=None, dtype=None):
        super().__init__()
        d = config.d_model
        expert_dtype = getattr(torch, config.expert_dtype)
        self.ln_attn = nn.LayerNorm(d, device=device, dtype=dtype)
        self.attn = CausalSelfAttention(config, device=device, dtype=dtype)
        self.ln_some = nn.LayerNorm(d, device=device, dtype=dtype)
        self.some = SoMELayer(config.layer_config(), seed=layer_seed, device=device, dtype=dtype,
                              expert_dtype=expert_dtype)

    def forward(self, x: Tensor, token_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_attn(x))  # (B, S, d)
        # The SoME layer runs outside autocast: cosine scores decide a top-k
        # (bf16 would turn near-ties into coin flips) and feed key-store sums
        # of small increments. Its experts compute in expert_dtype either way.
        with _autocast_off(x.device):
            x = x + self.some(self.ln_some(x), token_mask).to(x.dtype)
        return x


def _autocast_off(device: torch.device):
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # also for meta tensors, where autocast does not exist


class SoMEForCausalLM(nn.Module):
    """The SoME language model of SPEC §2.

    ``forward(input_ids, attention_mask=None, labels=None)``: ``input_ids``
    ``(B, S)`` int64; ``attention_mask`` ``(B, S)`` bool, True for real tokens
    (padding must be at the end of each row); ``labels`` ``(B, S)`` the
    next-token targets, ``labels[:, t]`` being the token after ``input_ids[:, t]``
    (as ``some.data`` makes them), ``-100`` where no loss is wanted. Returns ``CausalLMOutput(logits, loss)``.

    Initialization is a pure function of ``config.seed`` (the global RNG is
    forked, not disturbed); SoME layer ``i`` draws its experts and keys from
    seed ``config.seed + i``.
    """

    def __init__(self, config: SoMEConfig, *, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        d, V = config.d_model, config.vocab_size
        with _seeded(config.seed, device):
            self.embed = nn.Embedding(V, d, device=device, dtype=dtype)
            self.blocks = nn.ModuleList(
                Block(config, config.seed + i, device=device, dtype=dtype) for i in range(config.n_layers)
            )
            self.ln_f = nn.LayerNorm(d, device=device, dtype=dtype)
            self.lm_head = nn.Linear(d, V, bias=False, device=device, dtype=dtype)
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02) for embedding, attention and head; the
        # residual output projections scaled by 1/sqrt(2L) so the residual
        # stream's variance does not grow with depth. SoME layers keep their
        # own initialization (routers as nn.Linear, experts per expert_init).
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * self.config.n_layers))
            nn.init.zeros_(block.attn.out.bias)

    # ------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[1]
        if S > self.config.seq_len:
            raise ValueError(f"sequence length {S} exceeds config.seq_len = {self.config.seq_len}")
        token_mask = None if attention_mask is None else attention_mask.bool()
        x = self.embed(input_ids)  # (B, S, d)
        for block in self.blocks:
            x = block(x, token_mask)
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels, attention_mask)
        return CausalLMOutput(logits, loss)

    # --------------------------------------------------- self-organization
    def some_layers(self) -> list[SoMELayer]:
        return [block.some for block in self.blocks]

    @torch.no_grad()
    def update_keys(self) -> list[bool]:
        """Self-organize every layer's key store (SPEC §4); call after every
        optimizer step. Returns, per layer, whether its store was updated."""
        return [layer.update_keys() for layer in self.some_layers()]

    # ----------------------------------------------------------- counting
    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters; total includes the frozen experts."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


@contextlib.contextmanager
def _seeded(seed: int, device) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and restore the global
    RNG states afterwards (those of CPU and, when building there, the GPU)."""
    dev = torch.device(device) if device is not None else torch.get_default_device()
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def lm_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
            reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of ``logits`` (B, S, V) against ``labels`` (B, S).

    ``labels[:, t]`` is the target of position ``t`` (the token after
    ``input_ids[:, t]``; ``some.data`` shifts them). Targets that are ``-100``,
    or at padding positions (``attention_mask`` False), do not count;
    ``reduction="mean"`` averages over the rest, ``"sum"`` sums.
    """
    if attention_mask is not None:
        labels = labels.masked_fill(~attention_mask.bool(), -100)
    # float32 for the softmax even under bf16 autocast
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)


def format_parameter_counts(total: int, trainable: int) -> str:
    """The two log lines of every run, e.g. ``Total parameters: 701.49M`` and
    ``Trainable parameters: 29.42M (4.19%)``."""
    return (f"Total parameters: {total / 1e6:.2f}M\n"
            f"Trainable parameters: {trainable / 1e6:.2f}M ({100 * trainable / total:.2f}%)")
