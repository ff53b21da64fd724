"""One optimizer step, shared by SoME training and the dense pre-training of
expert construction: forward every micro-batch, masked loss, backward, clip,
learning rate, optimizer step, and (docs/method.md §4) the key-store update."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.batches import count_targets
from ..errors import TrainingDiverged
from ..nn import CausalLM, lm_loss
from .device import autocast
from .distributed import SINGLE_PROCESS, DistContext, all_reduce_keystore_stats, all_reduce_sum
from .optim import OptimConfig, lr_at

__all__ = ["StepResult", "train_step"]

LossHook = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean next-token loss over the real targets of the whole global batch
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate the step used
    # GPUs: whether every key-store update was applied, as a device tensor not
    # yet read (None where the verdicts were read at once: the CPU)
    keys_applied: Tensor | None = None


def train_step(model: CausalLM, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer, config: OptimConfig,
               *, step: int, total_steps: int, grad_accum: int, trainable: list[nn.Parameter] | None = None,
               ddp: nn.Module | None = None, dist: DistContext = SINGLE_PROCESS,
               loss_hook: LossHook | None = None, forward: nn.Module | None = None,
               precision: str = "auto") -> StepResult:
    """Take optimizer step number ``step`` (1-based) of ``total_steps`` on ``batch``.

    ``batch`` is this rank's share of the global batch; it is split into
    ``grad_accum`` micro-batches. The loss is the mean over the real targets of
    the whole global batch (counted over all ranks), so the step does not
    depend on how the batch is split. ``ddp`` is the DistributedDataParallel
    wrapper of ``model`` (gradients are all-reduced in the last micro-batch's
    backward only). ``loss_hook(step, loss)`` may replace a micro-batch's loss
    (tests inject faults with it). ``precision``: the autocast of the forward
    (:func:`~some.engine.resolve_precision`).

    Raises :class:`~some.errors.TrainingDiverged` when the loss or the
    gradient norm is not finite, before the optimizer step: the parameters and
    key stores are those of the previous step.
    """
    if forward is None:  # else: what runs the forward (e.g. torch.compile of ddp or model)
        forward = ddp if ddp is not None else model
    device = batch["input_ids"].device
    params = trainable if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    # the loss is a mean over the global batch's targets: count them over all ranks
    n_targets = torch.tensor(float(count_targets(batch)), dtype=torch.float64, device=device)
    all_reduce_sum(dist, [n_targets], what="all-reduce of the target count")
    n_targets = max(float(n_targets), 1.0)
    micro = len(batch["input_ids"]) // grad_accum
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(grad_accum):
        mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        sync = ddp is None or i == grad_accum - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with autocast(device, precision):
                logits = forward(mb["input_ids"], mb["attention_mask"]).logits
            # summed over the micro-batch's real targets (an all-padding one adds 0)
            loss = lm_loss(logits, mb["labels"], mb["attention_mask"], reduction="sum")
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            # / global targets: the step's mean; x world size: DDP averages over ranks
            (loss * (dist.world_size / n_targets)).backward()
        loss_sum += loss.detach().double()
    all_reduce_sum(dist, [loss_sum], what="all-reduce of the training loss")
    value = float(loss_sum) / n_targets
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value}")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm is {float(grad_norm)}")
    lr = lr_at(step - 1, config, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    # docs/method.md §4: self-organize the key stores after every optimizer step, from
    # the statistics of all tokens of the step (all micro-batches, all ranks)
    all_reduce_keystore_stats(dist, model.some_layers())
    verdicts = [v for v in model.update_keys(wait=device.type == "cpu") if v is not None]
    if any(v is False for v in verdicts):
        raise TrainingDiverged("a key-store update was refused (non-finite statistics, keys or update)")
    pending = [v for v in verdicts if isinstance(v, Tensor)]  # GPUs: read when the caller synchronizes anyway
    return StepResult(value, float(grad_norm), lr, torch.stack(pending).all() if pending else None)
