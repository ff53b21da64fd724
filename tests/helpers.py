"""What several test files share that is not an op input (those are in inputs.py)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

import some
from some import ops

# ENV: the environment of the subprocesses the tests start: OpenMP threads that sleep when idle,
# so processes that share the cores (pytest and its child) do not spin against each other.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

# The CUDA tests need both a GPU and the CUDA kernels: a CPU-only build on a GPU machine would
# run its "cuda" tests on the torch backend only, and the native ones would fail for the
# missing kernels instead of saying why.
CUDA_OK = torch.cuda.is_available() and bool(some.build_info()["cuda"])
needs_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA device and `some` built with its CUDA kernels (some.build_info()['cuda'])")


@contextlib.contextmanager
def kernels_on(device: torch.device) -> Iterator[None]:
    """On CUDA, the native kernels for a block, unless a backend is forced already (the
    `backend` fixture, $SOME_OPS_BACKEND): `auto` serves them only on a GPU where
    `some selftest` verified this build (some.ops.verification), and a test that runs on
    "cuda" means the kernels there. The CPU is left to `auto` (its kernels, as ever)."""
    if device.type == "cuda" and ops.forced_backend() == "auto":
        with ops.use_backend("native"):
            yield
    else:
        yield


def repeatable(device: torch.device, backend: str | None = None):
    """A context for comparing two computations bit for bit: the native kernels add without
    atomics on every device, but the torch backend's index_add_ adds atomically (in any order)
    on a GPU unless PyTorch's deterministic algorithms are on (warn_only: an op that has none,
    such as a cuBLAS GEMM without CUBLAS_WORKSPACE_CONFIG, only warns; it repeats on one stream
    anyway). `backend` None: whichever serves the device now."""
    if device.type == "cpu" or (backend or ops.backend_for(device)) != "torch":
        return contextlib.nullcontext()
    return _deterministic_algorithms()


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def without_timing(records) -> list[dict]:
    """Per-epoch records (a run's history, or metrics.jsonl's lines) without their timing,
    which differs between identical runs."""
    return [{k: v for k, v in r.items() if k != "timing"} for r in records]


def metrics_records(path) -> list[dict]:
    """A metrics.jsonl file's records without their timing."""
    import json
    from pathlib import Path

    return without_timing(json.loads(line) for line in Path(path).read_text().splitlines())


def stop_and_resume(config, out, step: int):
    """Train ``config`` into ``out``, stopped by fault injection after ``step``, then resume it to
    the end: the resumed Trainer (its ``history`` is the whole run's)."""
    from some.runs import Trainer
    from some.runs.faults import Faults

    with pytest.raises(Exception, match=f"stopped after step {step}"):
        Trainer(config, out, progress=False, echo=False, faults=Faults(stop_after_step=step)).run(make_plots=False)
    resumed = Trainer(None, out, resume=True, progress=False, echo=False)
    resumed.run(make_plots=False)
    return resumed
