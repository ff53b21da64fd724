"""Experts cut from a dense FFN: expert init ``cluster`` (docs/method.md §7, the "expert
construction" and "pre-trained vs random source" studies).

With ``expert_init = "cluster"`` every SoME layer ``l`` gets its experts and its
initial keys from a dense FFN of width ``H = N·h``
(``W2 GELU(W1 x + b1) + b2``), whose neurons are clustered into ``N`` groups of
``h`` by ``cluster_method`` (:mod:`some.construction`); keys start at each
cluster's mean raw ``W1`` row (EMoE's gate vector; its direction for cosine
scores), and every expert carries ``b2 / top_k`` (see :mod:`.clustering`). Where the dense FFN comes from is
``dense_source``:

- ``random``: each layer's FFN is a freshly initialized ``nn.Linear(d, H)`` /
  ``nn.Linear(H, d)`` pair (seed ``config.seed + l``). Only the experts and keys
  come from it; everything else is the SoME model's own initialization.
- ``pretrained``: a dense transformer, :class:`DenseLM` — the SoME model's
  architecture with every SoME layer replaced by that dense FFN — is first
  trained on the same training data (same batches, optimizer and schedule
  shape) for ``dense_pretrain_epochs``; then its FFNs are cut into experts. With
  ``dense_transfer = "all"`` (default) the SoME model also takes the dense
  model's token embedding, attention blocks, LayerNorms and LM head (the
  MoEfication / EMoE setting: the experts were trained on exactly those
  representations); with ``"ffn"`` only experts and keys are taken. The router
  is never taken (the dense model has none): it starts from its own
  initialization in every case.

The pre-trained dense model is cached (``<cache>/dense/<key>.pt``, the key a
hash of everything it depends on), so the variants and reruns of a study that
need the same dense model train it once. Note that with ``pretrained`` the SoME
run has seen ``dense_pretrain_epochs`` more passes over the data (in the dense
model) than a run from scratch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import collate, epoch_order, resolve_cache_dir
from ..engine import (
    CHECKPOINT_FORMAT,
    evaluate,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train_step,
)
from ..errors import CheckpointError
from ..nn import DenseFFN, DenseLM, seeded
from .clustering import experts_from_dense, load_into_layer

__all__ = [
    "TRANSFERRED",
    "dense_cache_path",
    "init_experts_from_dense",
    "load_or_pretrain_dense",
    "pretrain_dense",
    "random_dense_ffn",
]

log = logging.getLogger(__name__)

# v2: the blocks' feed-forward parts are named ffn / ln_ffn (v1 files are retrained).
DENSE_FORMAT = "some-dense-v2"
# Parameter-name prefixes the SoME model takes from the dense one with
# dense_transfer = "all" (DenseLM names them as SoMEForCausalLM does).
TRANSFERRED = ("embed.", "ln_f.", "lm_head.", "blocks.{i}.ln_attn.", "blocks.{i}.attn.", "blocks.{i}.ln_ffn.")

# Everything the pre-trained dense model depends on (the cache key).
_DENSE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "rope_base", "num_experts", "d_ffn",
                 "batch_size", "dense_grad_accum", "learning_rate", "min_learning_rate", "warmup_steps",
                 "weight_decay", "adam_beta1", "adam_beta2", "grad_clip", "seed", "dense_pretrain_epochs",
                 "data_source", "train_subset_size", "val_subset_size", "packed")


def dense_cache_path(config) -> Path:
    """Where the pre-trained dense model of ``config`` (an experiment configuration) is cached."""
    fields = {name: getattr(config, name) for name in _DENSE_FIELDS}
    fields["num_experts*d_ffn"] = config.num_experts * config.d_ffn
    key = hashlib.sha256(json.dumps([DENSE_FORMAT, fields], sort_keys=True).encode()).hexdigest()[:16]
    return resolve_cache_dir(config.cache_dir) / "dense" / f"dense-{key}.pt"


def pretrain_dense(config, data, device: str | torch.device) -> tuple[DenseLM, dict[str, Any]]:
    """Train a :class:`~some.nn.DenseLM` on ``data.train`` for
    ``dense_pretrain_epochs`` with the SoME run's training step (AdamW, same
    groups, warmup + cosine schedule over the dense run's steps, clipping) and
    sample order; ``dense_grad_accum`` micro-batches per step (the dense FFN's
    activations are ``N`` times wider than a SoME layer's). Returns the model
    and its validation results."""
    device = torch.device(device)
    model = DenseLM(config, device=device)
    model.train()
    optimizer = make_optimizer(model, config)
    steps_per_epoch = len(data.train) // config.batch_size
    total = steps_per_epoch * config.dense_pretrain_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    log.info(f"Dense pre-training: FFN width {config.num_experts * config.d_ffn} (N·h), "
             f"{config.dense_pretrain_epochs} epochs x {steps_per_epoch} steps, "
             f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, device {device}")
    t0, step, loss_sum = time.perf_counter(), 0, 0.0
    for epoch in range(config.dense_pretrain_epochs):
        order = epoch_order(len(data.train), config.seed, epoch)
        for s in range(steps_per_epoch):
            batch = collate(data.train, order[s * config.batch_size:(s + 1) * config.batch_size], device)
            step += 1
            result = train_step(model, batch, optimizer, config, step=step, total_steps=total,
                                grad_accum=config.dense_grad_accum, trainable=params, precision=config.precision)
            loss_sum += result.loss
        log.info(f"Dense epoch {epoch + 1}: train loss {loss_sum / step:.4f}")
    seconds = time.perf_counter() - t0
    val = evaluate(model, data.val, config.batch_size // config.dense_grad_accum, device,
                   precision=config.precision)
    info = {"steps": step, "epochs": config.dense_pretrain_epochs, "train_loss_mean": loss_sum / max(step, 1),
            "val_loss": val.loss, "val_perplexity": val.perplexity, "seconds": seconds,
            "tokens_per_s": step * config.batch_size * config.seq_len / max(seconds, 1e-9),
            "parameters": sum(p.numel() for p in params), "ffn_width": config.num_experts * config.d_ffn}
    log.info(f"Dense model: Val Loss = {val.loss:.4f}, Val Perplexity = {val.perplexity:.2f} ({seconds:.0f} s)")
    return model, info


def load_or_pretrain_dense(config, data, device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The pre-trained dense model's state dict (on the CPU) and info, from the
    cache or trained now and cached (atomic write: concurrent runs that need
    the same model may both train it, but never read a torn file)."""
    path = dense_cache_path(config)
    if path.is_file():
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:  # a damaged cache is trained again, not fatal
            log.warning(f"Ignoring unreadable dense cache {path}: {e}")
            state = None
        if state is not None and state.get("dense_format") == DENSE_FORMAT:
            log.info(f"Dense model from cache {path}")
            return state["model"], {**state["info"], "cache": str(path), "cached": True}
    with _rng_preserved():  # pre-training must not shift the SoME run's random streams
        model, info = pretrain_dense(config, data, device)
    state = {"format": CHECKPOINT_FORMAT, "dense_format": DENSE_FORMAT,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "info": info}
    save_checkpoint(path, state)
    return state["model"], {**info, "cache": str(path), "cached": False}


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


# ------------------------------------------------------------- construction


def random_dense_ffn(config, layer: int, device) -> DenseFFN:
    """The freshly initialized dense FFN of layer ``layer`` (``dense_source = "random"``), seed ``seed + layer``."""
    with seeded(config.seed + layer, device):
        return DenseFFN(config.d_model, config.num_experts * config.d_ffn, device=device)


def _cluster_kwargs(config) -> dict[str, Any]:
    # only the k-means methods take these (they bound Lloyd's iterations, the cost at H = N·h)
    if config.cluster_method in ("kmeans", "balanced_kmeans"):
        return {"n_init": config.cluster_n_init, "max_iter": config.cluster_max_iter}
    return {}


def init_experts_from_dense(model, config, data=None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Give every SoME layer of ``model`` experts and keys cut from a dense FFN
    (see the module doc); ``data`` is needed for ``dense_source = "pretrained"``.
    Returns a record of what was done (dense model results, per-layer cluster
    sizes and timings) for the run directory."""
    if config.expert_init != "cluster":
        raise ValueError(f"init_experts_from_dense needs expert_init = 'cluster', got {config.expert_init!r}")
    record: dict[str, Any] = {"dense_source": config.dense_source, "cluster_method": config.cluster_method,
                              "dense_transfer": config.dense_transfer if config.dense_source == "pretrained" else "ffn"}
    if config.dense_source == "pretrained":
        if data is None:
            raise ValueError("dense_source = 'pretrained' needs the training data")
        state, record["dense"] = load_or_pretrain_dense(config, data, device)
        ffn = [DenseFFN(config.d_model, config.num_experts * config.d_ffn) for _ in range(config.n_layers)]
        for i, f in enumerate(ffn):
            f.load_state_dict({k[len(f"blocks.{i}.ffn."):]: v for k, v in state.items()
                               if k.startswith(f"blocks.{i}.ffn.")})
        if config.dense_transfer == "all":
            own = model.state_dict()
            taken = {}
            with torch.no_grad():
                for name, value in state.items():
                    if any(name.startswith(p.format(i=i)) for p in TRANSFERRED for i in range(config.n_layers)):
                        own[name].copy_(value.to(own[name].dtype))
                        taken[name] = value.numel()
            record["transferred_parameters"] = sum(taken.values())
            log.info(f"Took {len(taken)} tensors ({sum(taken.values()) / 1e6:.2f}M parameters: embedding, attention, "
                f"LayerNorms, LM head) from the dense model")
    else:
        ffn = [random_dense_ffn(config, i, "cpu") for i in range(config.n_layers)]

    record["layers"] = []
    for i, (layer, f) in enumerate(zip(model.some_layers(), ffn, strict=True)):
        t0 = time.perf_counter()
        w1, b1, w2, b2 = (t.detach() for t in (f.fc1.weight, f.fc1.bias, f.fc2.weight, f.fc2.bias))
        built = experts_from_dense(w1, b1, w2, b2, config.num_experts, config.cluster_method,
                                   seed=config.seed + i, top_k=config.top_k, **_cluster_kwargs(config))
        load_into_layer(layer, built)
        seconds = time.perf_counter() - t0
        record["layers"].append({"layer": i, "seconds": seconds, "n_moved": built.n_moved,
                                 "raw_size_min": min(built.raw_sizes), "raw_size_max": max(built.raw_sizes)})
        log.info(f"Layer {i}: {config.num_experts} experts cut from the {config.dense_source} dense FFN by "
            f"{config.cluster_method} in {seconds:.1f} s (cluster sizes before rebalancing "
            f"{min(built.raw_sizes)}..{max(built.raw_sizes)}, {built.n_moved} neurons moved)")
    return record
