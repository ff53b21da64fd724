"""Which implementation serves an op call: ``native`` (the C++/CUDA kernels,
where they are built for the tensors' device) or ``torch`` (plain PyTorch
operators, :mod:`some.ops.torch_backend`, any device).

    some.ops.backend_for(torch.device("cuda"))     # 'native' (built and verified here) or 'torch'
    with some.ops.use_backend("torch"): ...        # force one inside a block
    some.ops.use_backend("torch")                  # ... or from now on
    SOME_OPS_BACKEND=torch some train ...          # ... or for a whole process

The forced choice is kept in a context variable (per thread / task), so a
``with`` block does not leak into other threads.
"""
from __future__ import annotations

import contextvars
import os

import torch

from . import native, verification

__all__ = ["BACKENDS", "ENV_VAR", "backend_for", "forced_backend", "use_backend"]

BACKENDS = ("auto", "native", "torch")
ENV_VAR = "SOME_OPS_BACKEND"
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("some_ops_backend", default=None)


def _check(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown ops backend {name!r}; expected one of {BACKENDS}")
    return name


def forced_backend() -> str:
    """``native``/``torch`` when forced (``use_backend`` first, then ``$SOME_OPS_BACKEND``), else ``auto``."""
    name = _forced.get()
    if name is None or name == "auto":
        name = _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")
    return name


@torch.compiler.assume_constant_result
def backend_for(device: torch.device | str) -> str:
    """The backend that serves tensors on ``device`` now: the forced one, or
    ``native`` where its kernels are built for the device (on CUDA: and have passed
    ``some selftest`` on this GPU, :mod:`some.ops.verification`), else ``torch``.
    (Under ``torch.compile`` the choice is made once, when the graph is traced.)"""
    device = torch.device(device)
    name = forced_backend()
    if name == "native" and not native.built_for(device):
        why = native.IMPORT_ERROR or f"the extension was built without kernels for {device.type}"
        raise RuntimeError(f"some.ops: the native backend was asked for ({ENV_VAR} or use_backend) but it "
                           f"cannot serve {device}: {why}; use the torch backend instead")
    if name == "auto":
        if not native.built_for(device):
            return "torch"
        if device.type == "cuda" and not verification.is_verified(device):
            # built but not verified: the kernels serve a GPU only once its self-test passed
            verification.warn_unverified(device)
            return "torch"
        return "native"
    return name


class use_backend:
    """Force the ops backend: ``use_backend("torch")`` from now on (in this
    thread/task), or ``with use_backend("torch"): ...`` for a block only.
    ``"auto"`` lifts the forcing (then ``$SOME_OPS_BACKEND`` applies)."""

    def __init__(self, name: str):
        self.name = _check(name, "some.ops.use_backend")
        self._token = _forced.set(name)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc) -> None:
        _forced.reset(self._token)

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"
