"""Validation: token-weighted loss and perplexity over a whole dataset."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.batches import collate, count_targets
from ..nn import CausalLM, lm_loss
from .device import autocast
from .distributed import SINGLE_PROCESS, DistContext, all_reduce_sum, shard_range

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    loss: float  # mean next-token loss over real tokens
    perplexity: float  # exp(loss)
    tokens: int  # real targets counted
    usage_counts: torch.Tensor | None = None  # (N,) int64, selections in the tracked layer


@torch.no_grad()
def evaluate(model: CausalLM, dataset, batch_size: int, device: torch.device,
             track_layer: int | None = None, dist_ctx: DistContext = SINGLE_PROCESS,
             precision: str = "auto") -> EvalResult:
    """Token-weighted validation loss over the whole ``dataset``, and the usage
    counts of SoME layer ``track_layer`` over its real tokens. With several
    ranks each evaluates its share and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    layer = model.some_layers()[track_layer] if track_layer is not None else None
    if layer is not None:
        layer.usage.start()
    loss_sum, tokens = 0.0, 0
    share = shard_range(len(dataset), dist_ctx)
    try:
        for start in range(share.start, share.stop, batch_size):
            batch = collate(dataset, range(start, min(start + batch_size, share.stop)), device)
            with autocast(device, precision):
                logits = model(batch["input_ids"], batch["attention_mask"]).logits  # (B, S, V)
            loss_sum += float(lm_loss(logits, batch["labels"], batch["attention_mask"], reduction="sum"))
            tokens += count_targets(batch)
    finally:
        if layer is not None:
            layer.usage.stop()
        model.train(was_training)
    if dist_ctx.enabled:
        sums = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device)
        all_reduce_sum(dist_ctx, [sums] + ([layer.usage.counts] if layer is not None else []),
                       what="all-reduce of the validation metrics")
        loss_sum, tokens = float(sums[0]), int(sums[1])
    loss = loss_sum / max(tokens, 1)
    counts = layer.usage.counts.detach().cpu().clone() if layer is not None else None
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, counts)
