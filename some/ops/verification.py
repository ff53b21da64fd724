"""Which GPUs the native CUDA kernels have been verified on.

The CUDA kernels are compiled for a GPU family, but whether they compute the
right numbers is only known once they ran there. So on CUDA, ``auto`` serves
the native kernels only where ``some selftest --device cuda`` passed with this
exact build: the extension file (its SHA-256), torch and CUDA versions, the
GPU's name and compute capability. Until then it serves the torch backend and
says so once (one warning line); ``SOME_OPS_BACKEND=native`` (or
``use_backend("native")``) still forces the kernels.

The record is a JSON list of such fingerprints in
``<cache root>/verified/cuda.json`` (:func:`some.files.resolve_cache_dir`).

    some selftest --device cuda      # verifies (and records) this build on this GPU
    some info                        # cuda_verified: whether auto serves the kernels here
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..files import atomic_write, resolve_cache_dir
from . import native

__all__ = ["RECORD_NAME", "describe_device", "device_fingerprint", "extension_sha256", "forget_verified",
           "is_verified", "record_path", "record_verified", "refresh", "warn_unverified"]

RECORD_NAME = "verified/cuda.json"
_known: dict[int, bool] = {}  # device index -> verified, read once per process (op calls ask often)
_warned: set[int] = set()


def record_path() -> Path:
    return resolve_cache_dir() / RECORD_NAME


@functools.cache
def extension_sha256() -> str:
    """The SHA-256 of the loaded extension file (a rebuild is a new build to verify)."""
    path = getattr(native.extension_module(), "__file__", None)
    if not path:
        return "none"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_device(index: int) -> dict:
    """The GPU's name and compute capability (a function of its own so that tests can
    describe a GPU on a machine without one)."""
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}


def device_fingerprint(device: torch.device | str) -> dict:
    """What a verification holds for: this extension file, torch, CUDA, the GPU."""
    device = torch.device(device)
    return {"extension_sha256": extension_sha256(), "torch": torch.__version__, "cuda": torch.version.cuda,
            **describe_device(device.index if device.index is not None else 0)}


def _read() -> list[dict]:
    path = record_path()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):  # an unreadable record verifies nothing; the next self-test rewrites it
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def is_verified(device: torch.device | str) -> bool:
    """Whether the native kernels passed the self-test on this build and this CUDA device."""
    device = torch.device(device)
    index = device.index if device.index is not None else 0
    if index not in _known:
        _known[index] = device_fingerprint(device) in _read()
    return _known[index]


def refresh() -> None:
    """Forget what this process read from the record (and which devices it warned about)."""
    _known.clear()
    _warned.clear()


def _write(entries: list[dict]) -> Path:
    _known.clear()
    return atomic_write(record_path(), json.dumps(entries, indent=2) + "\n")


def record_verified(device: torch.device | str) -> Path:
    """Record that the native kernels passed on ``device`` (called by the self-test)."""
    fingerprint = device_fingerprint(device)
    entries = [e for e in _read() if e != fingerprint]
    return _write(entries + [fingerprint])


def forget_verified(device: torch.device | str) -> None:
    """Drop ``device``'s fingerprint (a self-test that failed there)."""
    fingerprint = device_fingerprint(device)
    entries = _read()
    if fingerprint in entries:
        _write([e for e in entries if e != fingerprint])


def warn_unverified(device: torch.device) -> None:
    """One warning per device and process: the kernels are built but not verified here."""
    index = device.index if device.index is not None else 0
    if index in _warned:
        return
    _warned.add(index)
    desc = describe_device(index)
    warnings.warn(f"some.ops: the native CUDA kernels of this build have not passed the self-test on "
                  f"{desc['gpu']} (sm_{desc['capability'].replace('.', '')}), so 'auto' serves the torch backend "
                  f"there; run `some selftest --device cuda` to verify them (then 'auto' uses them) or set "
                  f"SOME_OPS_BACKEND=native to force them", stacklevel=3)
