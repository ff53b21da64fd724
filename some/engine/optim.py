"""The optimizer and its schedule: AdamW on the trainable parameters, linear
warmup then cosine decay (a pure function of the step)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..fields import check_field_types, check_range, check_size, validator

__all__ = ["OptimConfig", "lr_at", "make_optimizer"]


@dataclass
class OptimConfig:
    """How every optimizer step is taken (the seed's values by default)."""

    batch_size: int = 32  # sequences per optimizer step (all micro-batches and ranks together)
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 6e-4  # peak LR, after linear warmup, then cosine decay
    min_learning_rate: float = 6e-5  # LR at the end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings only
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    @property
    def micro_batch_size(self) -> int:
        """Sequences in one micro-batch: what a forward holds at once (training, and evaluation's batches)."""
        return self.batch_size // self.grad_accum

    @validator
    def validate(self) -> OptimConfig:
        check_field_types(self)
        for name, least in (("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0)):
            check_size(name, getattr(self, name), least)
        check_range("learning_rate", self.learning_rate, 0, 10, lo_open=True)
        check_range("min_learning_rate", self.min_learning_rate, 0, 10)
        check_range("weight_decay", self.weight_decay, 0, 10)
        check_range("grad_clip", self.grad_clip, 0)
        for name in ("adam_beta1", "adam_beta2"):
            check_range(name, getattr(self, name), 0, 1, hi_open=True)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size = {self.batch_size} must be divisible by grad_accum = {self.grad_accum}")
        return self


def lr_at(step: int, config: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to
    ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``min_learning_rate`` at ``total_steps``. A pure function of the step, so
    the schedule needs no state of its own in the checkpoint."""
    peak, floor = config.learning_rate, config.min_learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen experts are left out);
    weight decay on matrices and embeddings, none on biases and norms."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2))
