"""Decoder-only language models: SoME (docs/method.md §2) and its dense counterpart.

    token embedding (V, d)
    L x Block:  x = x + Attention(LayerNorm(x))      causal MHA, rotary positions
                x = x + FFN(LayerNorm(x))            SoMELayer: router -> key store -> k of N frozen experts
                                                     (DenseLM: one dense FFN of width N·h)
    final LayerNorm -> LM head (d, V), not tied to the embedding

With V=8192, d=512, L=10, h=1024 the trainable parameters are 29,417,472 for
any N, plus N * 10 * 1,050,112 frozen expert parameters.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor, nn

from ..errors import ModelFileError
from .attention import CausalSelfAttention, KVCache
from .config import ModelConfig
from .generate import generate
from .layer import SoMELayer
from .pretrained import load_model_files, save_model_files
from .revision import METHODS_REVISION

__all__ = ["Block", "CausalLM", "CausalLMOutput", "DenseFFN", "DenseLM", "SoMEForCausalLM",
           "format_parameter_counts", "lm_loss", "seeded"]


class CausalLMOutput(NamedTuple):
    logits: Tensor  # (B, S, V)
    loss: Tensor | None  # () mean next-token loss over real tokens, None without labels


class DenseFFN(nn.Module):
    """``W2 GELU(W1 x + b1) + b2`` with ``W1: (H, d)``, ``W2: (d, H)``, exact GELU
    (as the experts). Initialized as ``nn.Linear`` initializes."""

    def __init__(self, d: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d, device=device, dtype=dtype)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block around a given attention and feed-forward part.

    ``ffn`` is called as ``ffn(x, token_mask)``: a :class:`SoMELayer` (which
    needs the mask of real tokens for its routing statistics) or a
    :class:`DenseFFN` (which ignores it).
    """

    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module, device=None, dtype=None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.attn = attn
        self.ln_ffn = nn.LayerNorm(d_model, device=device, dtype=dtype)
        self.ffn = ffn

    def forward(self, x: Tensor, token_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_attn(x), cache)  # (B, S, d)
        return x + self.ffn(self.ln_ffn(x), token_mask).to(x.dtype)


@contextlib.contextmanager
def seeded(seed: int, device=None) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` and restore the global
    RNG states afterwards (those of CPU and, when building there, the GPU)."""
    dev = torch.device(device) if device is not None else torch.get_default_device()
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


class CausalLM(nn.Module):
    """Embedding, ``L`` blocks whose feed-forward parts come from ``make_ffn(i)``,
    final LayerNorm and LM head; the parts every decoder here shares.

    ``forward(input_ids, attention_mask=None, labels=None)``: ``input_ids``
    ``(B, S)`` int64; ``attention_mask`` ``(B, S)`` bool, True for real tokens
    (padding must be at the end of each row); ``labels`` ``(B, S)`` the
    next-token targets, ``labels[:, t]`` being the token after ``input_ids[:, t]``
    (as ``some.data`` makes them), ``-100`` where no loss is wanted. Returns
    ``CausalLMOutput(logits, loss)``.

    Initialization is a pure function of ``config.seed`` (the global RNG is
    forked, not disturbed).
    """

    def __init__(self, config: ModelConfig, make_ffn: Callable[[int], nn.Module], *, device=None, dtype=None):
        super().__init__()
        self.config = config
        d, V = config.d_model, config.vocab_size
        with seeded(config.seed, device):
            self.embed = nn.Embedding(V, d, device=device, dtype=dtype)
            # Attention is built before the feed-forward part of each block: the
            # order in which the global RNG is drawn fixes the initialization.
            self.blocks = nn.ModuleList(
                Block(d, attn=CausalSelfAttention(d, config.n_heads, config.rope_base, device=device, dtype=dtype),
                      ffn=make_ffn(i), device=device, dtype=dtype)
                for i in range(config.n_layers)
            )
            self.ln_f = nn.LayerNorm(d, device=device, dtype=dtype)
            self.lm_head = nn.Linear(d, V, bias=False, device=device, dtype=dtype)
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02) for embedding, attention and head; the
        # residual output projections scaled by 1/sqrt(2L) so the residual
        # stream's variance does not grow with depth. The feed-forward parts
        # keep their own initialization (routers as nn.Linear, experts per
        # expert_init).
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=std / math.sqrt(2 * self.config.n_layers))
            nn.init.zeros_(block.attn.out.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, cache: list[KVCache] | None = None) -> CausalLMOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[1] + (cache[0].length if cache else 0)
        if S > self.config.seq_len:
            raise ValueError(f"sequence length {S} exceeds config.seq_len = {self.config.seq_len}")
        token_mask = None if attention_mask is None else attention_mask.bool()
        x = self.embed(input_ids)  # (B, S, d)
        for i, block in enumerate(self.blocks):
            x = block(x, token_mask, None if cache is None else cache[i])
        logits = self.lm_head(self.ln_f(x))  # (B, S, V)
        loss = None if labels is None else lm_loss(logits, labels, attention_mask)
        return CausalLMOutput(logits, loss)

    def new_cache(self, batch: int, capacity: int, device=None) -> list[KVCache]:
        """Empty key/value caches of every attention layer for ``capacity`` positions (generation)."""
        cfg = self.config
        dtype = self.lm_head.weight.dtype
        device = device if device is not None else self.lm_head.weight.device
        return [KVCache(batch, cfg.n_heads, cfg.d_model // cfg.n_heads, capacity, device=device, dtype=dtype)
                for _ in self.blocks]

    def generate(self, input_ids: Tensor, max_new_tokens: int = 50, **options) -> Tensor:
        """Continue ``input_ids`` ``(B, S)``: see :func:`some.nn.generate.generate`."""
        return generate(self, input_ids, max_new_tokens, **options)

    def some_layers(self) -> list[SoMELayer]:
        """The SoME layers of the model, in block order (none in a dense model)."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, SoMELayer)]

    @torch.no_grad()
    def update_keys(self, wait: bool | None = None) -> list:
        """Self-organize every SoME layer's key store (docs/method.md §4); call after every
        optimizer step. Returns, per layer, :meth:`SoMELayer.update_keys`'s verdict."""
        return [layer.update_keys(wait) for layer in self.some_layers()]

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable) parameters; total includes the frozen experts,
        stored or procedural (docs/method.md §2 counts them either way)."""
        total = sum(p.numel() for p in self.parameters())
        total += sum(layer.num_expert_parameters for layer in self.some_layers() if not layer.materialized)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total, trainable


class SoMEForCausalLM(CausalLM, ModelHubMixin, library_name="some",
                      tags=["mixture-of-experts", "self-organizing-moe"]):
    """The SoME language model of docs/method.md §2: every feed-forward part is a
    :class:`SoMELayer`; layer ``i``'s experts are the generator's for
    ``(config.seed, i)`` (docs/method.md §9), its keys drawn from seed ``config.seed + i``.
    With ``config.ffn = "dense"`` they are trainable :class:`DenseFFN` of width
    ``config.dense_width`` instead (a control; :meth:`some_layers` is then empty).

    ``save_pretrained(dir)`` / ``SoMEForCausalLM.from_pretrained(dir or hub id)``
    (and ``push_to_hub``) store and load it as :mod:`some.nn.pretrained`
    describes; ``model.tokenizer`` (a ``tokenizers.Tokenizer``, or None) and
    ``model.card_info`` (a run's data and metrics for the model card) travel
    with it.
    """

    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        config.validate()
        layer = config.layer_config()
        expert_dtype = getattr(torch, config.expert_dtype)
        if config.ffn == "dense":  # a dense control: the same model around trainable dense FFNs
            def make_ffn(i):
                return DenseFFN(config.d_model, config.dense_width, device=device, dtype=dtype)
        else:
            def make_ffn(i):
                return SoMELayer(layer, seed=config.seed, layer=i, device=device, dtype=dtype,
                                 expert_dtype=expert_dtype)
        super().__init__(config, make_ffn, device=device, dtype=dtype)
        self.tokenizer = None
        self.card_info: dict | None = None
        self.eos_token_id: int | None = None
        self.pad_token_id: int | None = None
        # the methods revision (some.nn.revision) the weights were trained at: this
        # version's for a new model, the file's for a loaded one (kept on re-export)
        self.methods_revision = METHODS_REVISION

    def _save_pretrained(self, save_directory) -> None:  # ModelHubMixin's hook
        save_model_files(self, save_directory, tokenizer=self.tokenizer, info=self.card_info)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, force_download: bool = False, token=None,
                        cache_dir=None, local_files_only: bool = False, revision=None, device="cpu",
                        dtype=None) -> SoMEForCausalLM:
        """A saved model from a directory or a Hugging Face hub id (our own reading of
        config.json, which checks it, rather than the mixin's)."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token, device=device, dtype=dtype)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download: bool = False,
                         local_files_only: bool = False, token=None, device="cpu", dtype=None, **_):
        path = Path(model_id)
        if not path.is_dir():  # a hub id: download the repository's files (where there is a network)
            if path.exists():
                raise ModelFileError(f"{model_id} is a file, not a model directory")
            try:
                validate_repo_id(model_id)
            except HFValidationError:  # no hub id could look like this: a local path that is not there
                raise ModelFileError(f"model directory not found: {model_id}") from None
            try:
                path = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                              force_download=force_download, local_files_only=local_files_only,
                                              token=token))
            except Exception as e:  # noqa: BLE001 -- the hub client raises many types (network, auth, 404)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelFileError(f"{model_id}: no model directory of that name here, and the Hugging Face hub "
                                     f"did not provide one ({first})") from None
        return load_model_files(cls, path, device=device, dtype=dtype)


class DenseLM(CausalLM):
    """The SoME model with a dense FFN of width ``N·h`` in place of each SoME
    layer (expert construction pre-trains it, then cuts it into experts); same
    names and the same initialization of the shared parts."""

    def __init__(self, config: ModelConfig, *, device=None, dtype=None):
        hidden = config.num_experts * config.d_ffn
        super().__init__(config, lambda i: DenseFFN(config.d_model, hidden, device=device, dtype=dtype),
                         device=device, dtype=dtype)


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
