"""``specialization.json`` and the heat maps of a finished run: what each SoME
layer's experts specialize in on the validation set, by token class (a syntax
proxy), by token id and, where the corpus has topics, by topic (Fan et al.,
2024: sequence-level routing should show topic, token-level routing syntax
specialization)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..analysis import (
    TOKEN_CLASSES,
    label_matrix,
    layer_specialization,
    routing_pass,
    token_classes,
)
from ..analysis.plots import label_heatmap
from ..engine import autocast

__all__ = ["SPECIALIZATION_FILE", "specialization_analysis", "specialization_pictures"]

log = logging.getLogger(__name__)

SPECIALIZATION_FILE = "specialization.json"


def specialization_analysis(model, data, *, batch_size: int, device: torch.device, routing_level: str,
                            seed: int = 0, rp=None, precision: str = "auto") -> dict[str, Any]:
    """Per SoME layer, the measures of :func:`some.analysis.layer_specialization` over
    the validation set, and the middle layer's expert x topic / class count matrices.
    ``rp``: a :class:`~some.analysis.RoutingPass` of ``data.val`` already taken."""
    if rp is None:
        with autocast(device, precision):
            rp = routing_pass(model, data.val, batch_size, device)
    classes = token_classes(data.tokenizer, data.vocab_size)
    layers = []
    for i, assignment in enumerate(rp.assignments):
        m = layer_specialization(assignment, rp.token_ids, classes, topics=rp.topic_ids,
                                 sequence_ids=rp.sequence_ids, sequence_level=routing_level == "sequence", seed=seed)
        layers.append({"layer": i, **m})
    mid = rp.assignments[rp.layer]
    keep = mid >= 0
    n = model.some_layers()[rp.layer].config.num_experts
    experts = mid[keep].astype("int64")
    pair_classes = classes[rp.token_ids][:, None].repeat(mid.shape[1], axis=1)[keep]
    out: dict[str, Any] = {
        "middle_layer": rp.layer, "routing_level": routing_level, "topic_kind": data.topic_kind,
        "topic_names": data.topic_names, "class_names": list(TOKEN_CLASSES), "layers": layers,
        "class_matrix": label_matrix(experts, pair_classes, n, len(TOKEN_CLASSES)).tolist(),
    }
    if rp.topic_ids is not None and data.topic_names:
        pair_topics = rp.topic_ids[:, None].repeat(mid.shape[1], axis=1)[keep]
        out["topic_matrix"] = label_matrix(experts, pair_topics, n, len(data.topic_names)).tolist()
    return out


def specialization_pictures(result: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    """``topic_heatmap.png`` (when the corpus has topics) and ``class_heatmap.png``."""
    mid, level = result["middle_layer"], result["routing_level"]
    pics = []
    if result.get("topic_matrix") is not None:
        label_heatmap(result["topic_matrix"], result["topic_names"], out / "topic_heatmap.png",
                      title=f"Experts x topics ({result['topic_kind']}), layer {mid}, {level}-level routing, "
                            f"validation set", what="topic")
        pics.append(("topic_heatmap.png", "Experts x topics"))
    label_heatmap(result["class_matrix"], result["class_names"], out / "class_heatmap.png",
                  title=f"Experts x token classes, layer {mid}, {level}-level routing, validation set",
                  what="token class")
    pics.append(("class_heatmap.png", "Experts x token classes"))
    return pics
