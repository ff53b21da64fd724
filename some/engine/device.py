"""The device a run uses, its precision, and the seeding of the global RNGs."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["autocast", "pick_device", "seed_everything"]


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


def autocast(device: torch.device):
    """The precision of training and evaluation: bf16 autocast on CUDA (the
    reference runs); plain fp32 on the CPU, where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (torch, CUDA, python, numpy) for the run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
