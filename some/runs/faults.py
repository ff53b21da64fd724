"""Fault injection for the test suite, read from environment variables in one place.

These hooks make a run fail the way real runs fail (a NaN loss, a preempted
job, a rank that dies) so the tests can check what the product does then.
They are not part of any configuration: a user's ``config.yaml`` never holds
them, and a run without these variables has every hook off.

=================================  =====================================================
``SOME_FAULT_NAN_STEP=N``          the loss of optimizer step N (1-based) becomes NaN
``SOME_FAULT_STOP_AFTER_STEP=N``   stop (``RunStopped``) after step N and its checkpoint
``SOME_FAULT_DIE_AT_STEP=N``       rank ``SOME_FAULT_DIE_RANK`` (default 0) exits at step N
``SOME_FAULT_STATE_DIGEST=1``      write ``digest.rank{R}.jsonl``: key-store and parameter
                                   digests after every step
=================================  =====================================================
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, RunStopped

__all__ = ["ENV_PREFIX", "Faults"]

ENV_PREFIX = "SOME_FAULT_"


@dataclass(frozen=True)
class Faults:
    """Which faults to inject into a run (all off by default)."""

    nan_step: int = 0
    stop_after_step: int = 0
    die_at_step: int = 0
    die_rank: int = 0
    state_digest: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        env = os.environ if environ is None else environ
        values = {}
        for name in ("nan_step", "stop_after_step", "die_at_step", "die_rank"):
            text = env.get(ENV_PREFIX + name.upper(), "0").strip() or "0"
            try:
                values[name] = int(text)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be an integer, got {text!r}") from None
        values["state_digest"] = env.get(ENV_PREFIX + "STATE_DIGEST", "").strip().lower() in ("1", "true", "yes")
        return cls(**values)

    @property
    def any(self) -> bool:
        return bool(self.nan_step or self.stop_after_step or self.die_at_step or self.state_digest)

    def loss_hook(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The training step's loss, NaN at ``nan_step`` (a diverging step)."""
        return loss * float("nan") if step == self.nan_step else loss

    def after_step(self, step: int, rank: int, checkpoint: Path) -> None:
        """Called after step ``step`` and its checkpoint: die or stop as asked."""
        if self.die_at_step and step == self.die_at_step and rank == self.die_rank:
            os._exit(3)  # a rank that dies without a word
        if self.stop_after_step and step == self.stop_after_step:
            raise RunStopped(f"stopped after step {step} ({ENV_PREFIX}STOP_AFTER_STEP); "
                             f"continue with --resume from {checkpoint}")

    def write_digest(self, out: Path, step: int, rank: int, key_stores: Iterable[torch.Tensor],
                     params: Iterable[torch.Tensor]) -> None:
        """Digests of the key stores and trainable parameters after a step, one file per rank."""
        if not self.state_digest:
            return

        def digest(tensors: Iterable[torch.Tensor]) -> str:
            h = hashlib.sha256()
            for t in tensors:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()[:16]

        record = {"step": step, "keys": digest(key_stores), "params": digest(params)}
        with open(out / f"digest.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
