"""Checkpoints: the whole state of a run in one file, written atomically.

A checkpoint is a ``torch.save`` dict of tensors and plain containers (read
back with ``weights_only=True``) tagged with :data:`CHECKPOINT_FORMAT`. The
model, optimizer and RNG states are filled in by the caller; this module
writes, reads and upgrades the file and captures/restores the RNG states.

Formats: ``v1`` (before the package layout: blocks named ``ln_some``/``some``,
test hooks in the config) is upgraded on load; ``v2`` (every expert stored, no
generator record) loads as it is; ``v3`` stores the seed and generator of
experts the generator makes (``SoMELayer`` extra state) instead of the experts.
"""
from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "restore_rng_states", "rng_states", "save_checkpoint",
           "state_digest"]

CHECKPOINT_FORMAT = "some-checkpoint-v3"
_V1 = "some-checkpoint-v1"
_READABLE = (_V1, "some-checkpoint-v2", CHECKPOINT_FORMAT)


def state_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and
    every other value's repr, in a fixed order (dict keys sorted)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically and durably (a crash leaves either the old or
    the new file, never a torn one), with the digest of its content."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return atomic_write(path, lambda f: torch.save({**body, "digest": state_digest(body)}, f), durable=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (older formats are
    upgraded); a :class:`CheckpointError` names the file when it is missing,
    torn, foreign or of an unknown format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torn/corrupt/foreign files fail in many ways
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("some-checkpoint-"):
        raise CheckpointError(f"{path} is not a SoME checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if state["format"] not in _READABLE:
        raise CheckpointError(f"{path} has checkpoint format {state['format']!r}, which this version of some "
                              f"cannot read (it reads {', '.join(map(repr, _READABLE))}); "
                              f"use the version that wrote it")
    if "digest" in state:  # (files of format v1 and v2 have none)
        body = {k: v for k, v in state.items() if k != "digest"}
        if state["digest"] != state_digest(body):
            raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the digest written "
                                  f"with it (flipped bits on disk or in transfer); use another checkpoint")
        state = body
    if state["format"] == _V1:
        state = _upgrade_v1(state)
    state["format"] = CHECKPOINT_FORMAT  # v2 files carry every expert: nothing to convert
    return state


_V1_NAMES = ((re.compile(r"^(blocks\.\d+)\.ln_some\."), r"\1.ln_ffn."),
             (re.compile(r"^(blocks\.\d+)\.some\."), r"\1.ffn."))


def _upgrade_v1(state: dict[str, Any]) -> dict[str, Any]:
    """v1 -> v2: the blocks' feed-forward part was named ``some`` (its norm
    ``ln_some``). (v1 run configs also carried test hooks, ``debug_*``: the config
    is read by ``SoMEConfig.from_dict``, which drops those retired keys, with its warning.)"""
    def rename(name: str) -> str:
        for pattern, repl in _V1_NAMES:
            name = pattern.sub(repl, name)
        return name

    state = dict(state)
    if isinstance(state.get("model"), dict):
        state["model"] = {rename(k): v for k, v in state["model"].items()}
    return state


def rng_states(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every global RNG state (torch, CUDA, python, numpy), plus ``extra``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state as tensors and numbers: torch.load(weights_only=True) takes no ndarrays
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        **(extra or {}),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNG states saved by :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
