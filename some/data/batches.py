"""Batches for training and evaluation: the epoch's sample order and collation."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["collate", "count_targets", "epoch_order"]


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of an epoch: a pure function of (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def collate(dataset, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the items ``dataset[i]`` (dicts of ``(S,)`` tensors) into a batch of ``(B, S)``."""
    items = [dataset[int(i)] for i in indices]
    keys = ("input_ids", "labels", "attention_mask") + (("topic_ids",) if items and "topic_ids" in items[0] else ())
    batch = {key: torch.stack([item[key] for item in items]) for key in keys}
    batch["attention_mask"] = batch["attention_mask"].bool()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Real next-token targets of a batch (what the loss averages over)."""
    return int(((batch["labels"] != -100) & batch["attention_mask"]).sum())
