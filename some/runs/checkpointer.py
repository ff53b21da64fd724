"""The state of a run between steps: where it is (:class:`Progress`) and the checkpoint that
holds all of it (:class:`Checkpointer`: written atomically, checked before a resume, restored
bit-exactly)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import CHECKPOINT_FORMAT, restore_rng_states, rng_states, save_checkpoint
from ..errors import CheckpointError
from ..nn import SoMEForCausalLM
from .config import SoMEConfig
from .rundir import RunDirectory

__all__ = ["Checkpointer", "Progress"]


@dataclass
class Progress:
    """Where the run is: the next step to take is ``(epoch, step)``, 0-based."""

    epoch: int = 0
    step: int = 0  # within the epoch
    order: torch.Tensor | None = None  # the epoch's sample order (None before it starts)
    loss_sum: float = 0.0  # sum of this epoch's step losses so far
    tokens: int = 0  # input positions processed this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per finished epoch
    last_usage: torch.Tensor | None = None  # middle-layer val counts of the last epoch

    def next_epoch(self) -> None:
        self.epoch, self.step, self.order, self.loss_sum, self.tokens = self.epoch + 1, 0, None, 0.0, 0


class Checkpointer:
    """Writes and restores the whole state of a run (``checkpoint.pt``)."""

    def __init__(self, run_dir: RunDirectory, config: SoMEConfig, model: SoMEForCausalLM,
                 optimizer: torch.optim.Optimizer, steps_per_epoch: int, total_steps: int):
        self.run_dir, self.config, self.model, self.optimizer = run_dir, config, model, optimizer
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def state(self, progress: Progress) -> dict[str, Any]:
        p = progress
        return {
            "format": CHECKPOINT_FORMAT,
            "methods_revision": self.model.methods_revision,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # the LR schedule is lr_at(step): its whole state is the step
            "scheduler": {"global_step": p.epoch * self.steps_per_epoch + p.step, "total_steps": self.total_steps},
            # the 'random' router re-draws its weights from a per-layer generator
            "rng": rng_states({"routers": [layer.router_rng_state() for layer in self.model.some_layers()]}),
            "position": {"epoch": p.epoch, "step": p.step, "order": p.order, "loss_sum": p.loss_sum,
                         "tokens": p.tokens},
            "history": p.history,
            "last_usage": p.last_usage,
        }

    def save(self, progress: Progress) -> None:
        if self.run_dir.is_main:
            save_checkpoint(self.run_dir.checkpoint, self.state(progress))

    def check(self, state: dict[str, Any], train_samples: int) -> None:
        """The schema of a checkpoint: the keys, types and ranges a resume relies on,
        and finite values (a diverged state is never resumed)."""
        path = self.run_dir.checkpoint
        for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("rng", dict),
                          ("position", dict), ("history", list)):
            if not isinstance(state.get(key), kind):
                raise CheckpointError(f"checkpoint {path} has no valid '{key}' ({kind.__name__} expected); it is "
                                      f"damaged or was not written by some")
        pos, spe = state["position"], self.steps_per_epoch
        ints = {name: pos.get(name) for name in ("epoch", "step", "tokens")}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
            raise CheckpointError(f"checkpoint {path}: position {ints} must hold integers")
        if not (0 <= pos["epoch"] <= self.config.epochs and 0 <= pos["step"] <= spe and pos["tokens"] >= 0):
            raise CheckpointError(f"checkpoint {path}: position epoch {pos['epoch']}, step {pos['step']} is outside "
                                  f"this run ({self.config.epochs} epochs x {spe} steps)")
        if state["scheduler"].get("global_step") != pos["epoch"] * spe + pos["step"]:
            raise CheckpointError(f"checkpoint {path}: scheduler step {state['scheduler'].get('global_step')} does "
                                  f"not match the position (epoch {pos['epoch']}, step {pos['step']})")
        if len(state["history"]) != pos["epoch"]:
            raise CheckpointError(f"checkpoint {path}: {len(state['history'])} epoch records for epoch "
                                  f"{pos['epoch']}")
        order = pos.get("order")
        if order is not None and (not isinstance(order, torch.Tensor) or order.numel() != train_samples):
            raise CheckpointError(f"checkpoint {path}: the epoch's sample order does not fit the {train_samples} "
                                  f"training samples")
        for group in ("model", "optimizer"):
            bad = _first_non_finite(state[group])
            if bad is not None:
                raise CheckpointError(f"checkpoint {path} holds NaN or Inf in {group} '{bad}': the run had "
                                      f"diverged; it cannot be resumed from this state")

    def restore(self, state: dict[str, Any]) -> Progress:
        """Load ``state`` into the model and optimizer, set the RNGs; the progress it holds."""
        path = self.run_dir.checkpoint
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            restore_rng_states(state["rng"])
            for layer, router_state in zip(self.model.some_layers(), state["rng"]["routers"], strict=True):
                layer.set_router_rng_state(router_state)
            pos = state["position"]
            progress = Progress(epoch=pos["epoch"], step=pos["step"], order=pos["order"], loss_sum=pos["loss_sum"],
                                tokens=pos["tokens"], history=list(state["history"]), last_usage=state["last_usage"])
            saved_total = state["scheduler"]["total_steps"]
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines())  # load_state_dict's list, one line
            if len(detail) > 500:
                detail = detail[:500] + " ..."
            raise CheckpointError(f"checkpoint {path} does not match this run: {type(e).__name__}: {detail}") from None
        if saved_total != self.total_steps:
            raise CheckpointError(f"checkpoint {path} was written for {saved_total} steps, "
                                  f"this run has {self.total_steps} (did the data change?)")
        return progress


def _first_non_finite(obj: Any, where: str = "") -> str | None:
    """The name of the first floating tensor in ``obj`` (nested dicts/lists) holding NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        return where if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None
