"""The device a run uses, its precision, and the seeding of the global RNGs."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["PRECISIONS", "autocast", "pick_device", "resolve_precision", "seed_everything"]

# auto: bf16 on CUDA (tensor cores), fp32 on the CPU (where bf16 is slow and the tests are exact)
PRECISIONS = ("auto", "fp32", "bf16")


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA if available, else the CPU) or a device name, checked."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {name!r} is not a device name ({e}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: some trains on cpu or cuda")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """The precision of training and evaluation: with ``bf16`` the trainable parts run
    under bf16 autocast (fp32 master weights; the key store and its statistics stay in
    full precision, the SoME layer turns autocast off around them); ``fp32`` is plain."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (torch, CUDA, python, numpy) for the run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
