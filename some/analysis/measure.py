"""Measurements that compare model variants (docs/method.md §7): FLOPs per token (analytic
and counted), inference latency, peak memory, and a routing pass recording
which experts every token went to (for :mod:`some.analysis.specialization`).

    analytic_flops_per_token(config, experts_per_token=[2.0, 2.0])   # {"total": ..., "experts": ...}
    count_flops(model, input_ids)                                    # FlopCounterMode, forward only
    routing_pass(model, data.val, batch_size, device)                # usage of every layer + middle-layer pairs
    inference_latency(model, input_ids)                              # median ms per forward
    peak_memory_mb(device)                                           # CUDA max allocated / CPU peak RSS

FLOP convention (the one ``torch.utils.flop_counter.FlopCounterMode`` uses, so
that the analytic and the counted numbers can be compared term by term): a
multiply-add is 2 FLOPs; only matrix products count (linear layers, the
attention products, the SoME ops' GEMMs), not norms, activations or softmax;
attention is counted as the full ``S x S`` product (``FlopCounterMode``'s SDPA
formula takes no causal discount). The embedding lookup costs nothing.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from ..data.batches import collate
from ..nn import ModelConfig

__all__ = [
    "RoutingPass",
    "analytic_flops_per_token",
    "count_flops",
    "current_rss_mb",
    "inference_latency",
    "memory_kind",
    "peak_memory_mb",
    "routing_pass",
    "token_batch",
]

# ----------------------------------------------------------------------- FLOPs

# PyTorch registers FLOP formulas for the CUDA attention kernels but not for the
# CPU flash kernel that F.scaled_dot_product_attention uses on the CPU, so a CPU
# count would silently leave attention out. Same formula as the CUDA kernels.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA, get_raw=True)
    def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)


def analytic_flops_per_token(config: ModelConfig, experts_per_token: float | Sequence[float],
                             seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token of :class:`some.model.SoMEForCausalLM`, by part.

    ``experts_per_token``: the mean number of experts a token runs through, per
    layer (a sequence of ``n_layers`` numbers) or one number for every layer;
    ``top_k`` for the fixed-k gatings, measured for ``top_p``/``top_any`` and
    the adaptive process. ``seq_len`` (default ``config.seq_len``) sets the
    attention term, ``4·S·d`` per layer and token (full ``S x S``, see the
    module doc). Returns the parts and their ``total``.
    """
    d, L, V, N, h = config.d_model, config.n_layers, config.vocab_size, config.num_experts, config.d_ffn
    S = config.seq_len if seq_len is None else seq_len
    k_eff = [float(experts_per_token)] * L if isinstance(experts_per_token, (int, float)) else \
        [float(x) for x in experts_per_token]
    if len(k_eff) != L:
        raise ValueError(f"experts_per_token needs one value per layer ({L}), got {len(k_eff)}")
    parts = {
        "attention_linear": L * (2 * d * 3 * d + 2 * d * d),  # fused qkv + output projection
        "attention_sdpa": L * 4 * S * d,  # q kᵀ and (attn) v
    }
    if getattr(config, "ffn", "some") == "dense":  # a dense control: two GEMMs of width dense_width
        parts["dense_ffn"] = L * 4 * config.dense_width * d
    else:
        router = 2 * d * d if config.router == "linear" else 2 * (d * 2 * d + 2 * d * d)  # d -> 2d -> d
        # sequence-level routing scores one query per sequence, shared by its S tokens
        route = 2 * N * d / (S if config.routing_level == "sequence" else 1)
        parts.update(router=L * router, route=L * route,
                     experts=sum(4 * k * h * d for k in k_eff))  # two GEMMs per selected expert
    parts["lm_head"] = 2 * d * V
    parts["total"] = sum(parts.values())
    return parts


@torch.no_grad()
def count_flops(model: torch.nn.Module, input_ids: Tensor,
                attention_mask: Tensor | None = None) -> dict[str, int]:
    """Forward FLOPs of ``model(input_ids)`` counted by ``FlopCounterMode`` (the
    SoME ops register their own formulas in ``some.ops``), by operator, plus
    ``total``. The model is run in eval mode and restored."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(input_ids, attention_mask)
    finally:
        model.train(was_training)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    by_op["total"] = int(counter.get_total_flops())
    return by_op


def token_batch(dataset, rows: int, seq_len: int) -> Tensor:
    """``(rows, seq_len)`` token ids of real text with no padding: the real
    tokens of ``dataset``'s samples, concatenated in order and cut into rows
    (so that per-token numbers are not diluted by padding positions). Fewer
    rows if the dataset is too small; at least one row is required."""
    chunks, have, need = [], 0, rows * seq_len
    for i in range(len(dataset)):
        item = dataset[i]
        real = item["input_ids"][item["attention_mask"].bool()]
        chunks.append(real)
        have += real.numel()
        if have >= need:
            break
    flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)
    n_rows = min(rows, flat.numel() // seq_len)
    if n_rows < 1:
        raise ValueError(f"the dataset has {flat.numel()} real tokens, fewer than one row of {seq_len}")
    return flat[: n_rows * seq_len].view(n_rows, seq_len)


# ------------------------------------------------------------------ routing pass


@dataclass
class RoutingPass:
    """What the SoME layers did on a dataset (eval mode).

    ``usage_counts[l]`` ``(N,)`` selections of each expert in layer ``l``;
    ``experts_per_token[l]`` mean selected experts per real token;
    ``active_experts[l]`` experts routing may select (the adaptive process
    masks some out). Per real token of the dataset, in order: ``token_ids``,
    ``sequence_ids`` (its sample), ``topic_ids`` (its document's topic, None
    without topics) and, per layer, ``assignments[l]`` ``(T, k)`` the experts
    it went to (-1 in empty slots). ``experts``/``tokens``: for layer
    ``layer``, one entry per (real token, selected expert) pair.
    """

    layer: int
    usage_counts: list[Tensor]
    experts_per_token: list[float]
    active_experts: list[int]
    experts: np.ndarray
    tokens: np.ndarray
    real_tokens: int
    assignments: list[np.ndarray] = field(default_factory=list)
    token_ids: np.ndarray | None = None
    sequence_ids: np.ndarray | None = None
    topic_ids: np.ndarray | None = None


@torch.no_grad()
def routing_pass(model, dataset, batch_size: int, device: str | torch.device,
                 layer: int | None = None) -> RoutingPass:
    """Run ``model`` over ``dataset`` (eval mode) recording every SoME layer's
    usage and which experts each real token went to."""
    layers = model.some_layers()
    layer = len(layers) // 2 if layer is None else layer
    was_training = model.training
    model.eval()
    for lay in layers:
        lay.usage.start()
    per_layer: list[list[np.ndarray]] = [[] for _ in layers]
    token_ids, sequence_ids, topic_ids = [], [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset, range(start, min(start + batch_size, len(dataset))), device)
            model(batch["input_ids"], batch["attention_mask"])
            real = batch["attention_mask"].reshape(-1)
            for out, lay in zip(per_layer, layers, strict=True):
                out.append(lay.usage.last_indices[real].to(torch.int32).cpu().numpy())  # (real tokens, k)
            B, S = batch["input_ids"].shape
            token_ids.append(batch["input_ids"].reshape(-1)[real].cpu().numpy())
            seq = torch.arange(start, start + B, device=real.device).unsqueeze(1).expand(B, S).reshape(-1)
            sequence_ids.append(seq[real].cpu().numpy())
            if "topic_ids" in batch:
                topic_ids.append(batch["topic_ids"].reshape(-1)[real].cpu().numpy())
    finally:
        for lay in layers:
            lay.usage.stop()
        model.train(was_training)
    assignments = [np.concatenate(a) if a else np.empty((0, 1), np.int32) for a in per_layer]
    tokens = np.concatenate(token_ids) if token_ids else np.empty(0, np.int64)
    mid = assignments[layer]
    keep = mid >= 0
    return RoutingPass(
        layer=layer,
        usage_counts=[lay.usage.counts.detach().cpu().clone() for lay in layers],
        experts_per_token=[lay.usage.experts_per_token for lay in layers],
        active_experts=[lay.active_experts for lay in layers],
        experts=mid[keep].astype(np.int64),
        tokens=np.broadcast_to(tokens[:, None], mid.shape)[keep].astype(np.int64),
        real_tokens=int(tokens.size),
        assignments=assignments,
        token_ids=tokens,
        sequence_ids=np.concatenate(sequence_ids) if sequence_ids else np.empty(0, np.int64),
        topic_ids=np.concatenate(topic_ids) if topic_ids else None,
    )


# ------------------------------------------------------------- latency, memory


@torch.no_grad()
def inference_latency(model: torch.nn.Module, input_ids: Tensor, *, repeats: int = 20,
                      warmup: int = 3) -> dict[str, float]:
    """Wall time of one forward pass of ``input_ids`` in eval mode: the median
    (and the 10th/90th percentiles) over ``repeats`` timed passes after
    ``warmup`` untimed ones, in milliseconds (CUDA is synchronized around each)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = input_ids.device.type == "cuda"
    was_training = model.training
    model.eval()
    times = []
    try:
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(input_ids.device)
            t0 = time.perf_counter()
            model(input_ids)
            if cuda:
                torch.cuda.synchronize(input_ids.device)
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t0))
    finally:
        model.train(was_training)
    q = np.percentile(times, [10, 90])
    return {"median_ms": statistics.median(times), "p10_ms": float(q[0]), "p90_ms": float(q[1]),
            "repeats": repeats}


def memory_kind(device: str | torch.device) -> str:
    """What :func:`peak_memory_mb` measures on ``device``."""
    if torch.device(device).type == "cuda":
        return "CUDA max allocated"
    return "peak RSS of the process"


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (``VmRSS``; NaN where
    ``/proc`` is missing): the baseline to read a CPU peak against."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_memory_mb(device: str | torch.device) -> float:
    """Peak memory so far in MiB: on CUDA ``torch.cuda.max_memory_allocated``
    (tensors only; reset it with ``torch.cuda.reset_peak_memory_stats`` before
    the part to measure); on the CPU the process's peak resident set size
    (``VmHWM`` of ``/proc/self/status``: the whole process, Python and
    PyTorch included — run the part to measure in its own process)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        # VmHWM belongs to this process image; ru_maxrss can carry the parent's
        # peak over a fork + exec
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if os.uname().sysname == "Darwin" else rss / 1024  # bytes on macOS, kB on Linux


