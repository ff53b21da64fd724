"""Routing dynamics of a training run (docs/method.md §10): one record per SoME layer at
each logging interval, from the sums each layer's
:class:`~some.nn.RoutingTelemetry` gathered since the last record.

    records = dynamics_records(model, step=500, dead_after=100)
    # [{"step": 500, "layer": 0, "experts_used": 61, "dead": 3, "effective_experts": 38.2, ...}, ...]

Nothing here passes over data: the counts are the key-store update's own
selection counts, the scores and key movement were summed on the device as
training went. Reading them is the interval's one host synchronization.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .metrics import entropy_bits, gini

__all__ = ["DYNAMICS_FIELDS", "collapse_threshold", "dynamics_records", "dynamics_summary", "layer_record",
           "mean_pairwise_cosine"]

# The fields of a record and what they hold (the report and TensorBoard list them in this order).
DYNAMICS_FIELDS = {
    "experts_used": "experts selected at least once in the window",
    "experts_used_total": "experts selected at least once since the start of training",
    "dead": "active experts not selected in the last dead_after key updates",
    "gini": "Gini coefficient of the window's selection counts",
    "entropy": "entropy (bits) of the window's selection counts",
    "effective_experts": "2^entropy",
    "top1_score": "mean top-1 routing score of the window's tokens",
    "selected_score": "mean score of the window's selected experts",
    "key_move_mean": "mean over updates of the mean per-key movement ||dK||",
    "key_move_max": "largest per-key movement ||dK|| in one update of the window",
    "key_cosine": "mean pairwise cosine of the active keys (1 = all keys equal)",
    "top_set_share": "share of a probed batch's tokens routed to the most common top-k set",
    "revived": "keys moved by dead-expert revival in the window",
    "shared_input": "share of the layer input common to all tokens, ||mean x||² / mean ||x||² over the window's "
                    "real tokens (1 = one shared direction, ~1/tokens = none)",
    "shared_query": "the same for the router outputs that are scored",
}


def mean_pairwise_cosine(keys: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of rows (0 for one row)."""
    n = keys.shape[0]
    if n < 2:
        return 0.0
    k = torch.nn.functional.normalize(keys.double(), dim=1)
    s = k.sum(0)
    # Σ_{i≠j} k_i·k_j = ||Σ k||² - Σ ||k_i||²: no N x N matrix
    return float(((s @ s) - (k * k).sum()) / (n * (n - 1)))


def layer_record(layer, *, dead_after: int) -> dict[str, Any]:
    """The window's record of one SoME layer (its telemetry and key store)."""
    tel = layer.telemetry
    counts = tel.counts.cpu()
    scores = tel.scores.double().cpu().tolist()
    move = tel.move.double().cpu().tolist()
    updates = int(tel.updates)
    probe = tel.probe.double().cpu().tolist()
    active = layer.expert_active.cpu()
    ent = entropy_bits(counts) if int(counts.sum()) else 0.0
    shared_input, shared_query = tel.shared_share()
    return {
        "layer": layer.layer,
        "updates": updates,
        "experts_used": int((counts > 0).sum()),
        "experts_used_total": int(tel.ever_used.sum()),
        "active": int(active.sum()),
        "dead": int((tel.dead(dead_after).cpu() & active).sum()),
        "gini": float(gini(counts)) if int(counts.sum()) else 0.0,
        "entropy": float(ent),
        "effective_experts": float(2.0 ** ent),
        "top1_score": scores[0] / scores[3] if scores[3] else None,
        "selected_score": scores[1] / scores[2] if scores[2] else None,
        "key_move_mean": move[0] / updates if updates else 0.0,
        "key_move_max": move[1],
        "key_cosine": mean_pairwise_cosine(layer.keys[layer.expert_active]),
        "top_set_share": probe[0] / probe[1] if probe[1] else None,
        "revived": int(tel.revived),
        "shared_input": shared_input,
        "shared_query": shared_query,
        "counts": counts.tolist(),
    }


def dynamics_records(model, *, step: int, dead_after: int, layers: Sequence[int] | None = None
                     ) -> list[dict[str, Any]]:
    """One record per SoME layer of ``model`` for the window ending at optimizer ``step``."""
    some_layers = model.some_layers()
    chosen = range(len(some_layers)) if layers is None else layers
    return [{"step": step, **layer_record(some_layers[i], dead_after=dead_after)} for i in chosen]


def collapse_threshold(num_experts: int) -> float:
    """Effective experts at or below which a layer counts as collapsed: a quarter of N."""
    return num_experts / 4


def dynamics_summary(records: Sequence[dict[str, Any]], layer: int) -> dict[str, Any]:
    """What a study table reports of one layer's dynamics: scalars (experts used during
    training, dead / effective experts and top-set share at the last record, the first
    step at which effective experts fell to ``collapse_threshold(N)``, keys revived) and
    the series the comparison pictures draw."""
    rs = sorted((r for r in records if r["layer"] == layer), key=lambda r: r["step"])
    if not rs:
        return {}
    n = len(rs[-1]["counts"])
    collapsed = [r["step"] for r in rs if r["effective_experts"] <= collapse_threshold(n)]
    last = rs[-1]
    return {
        "experts_used_training": last["experts_used_total"],
        "dead_final": last["dead"],
        "effective_final": last["effective_experts"],
        "top_set_share_final": last["top_set_share"],
        "collapse_step": collapsed[0] if collapsed else None,
        "revived_total": sum(r["revived"] for r in rs),
        "series": {key: [r[key] for r in rs] for key in ("step", "experts_used", "effective_experts", "dead",
                                                          "top_set_share", "key_move_mean", "counts")},
    }
