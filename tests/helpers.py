"""What several test files share that is not an op input (those are in inputs.py)."""
from __future__ import annotations

import os

import pytest
import torch

import some

# ENV: the environment of the subprocesses the tests start: OpenMP threads that sleep when idle,
# so processes that share the cores (pytest and its child) do not spin against each other.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}

# The CUDA tests need both a GPU and the CUDA kernels: a CPU-only build on a GPU machine would
# run its "cuda" tests on the torch backend only, and the native ones would fail for the
# missing kernels instead of saying why.
CUDA_OK = torch.cuda.is_available() and bool(some.build_info()["cuda"])
needs_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA device and `some` built with its CUDA kernels (some.build_info()['cuda'])")
