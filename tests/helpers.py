"""What several test files share that is not an op input (those are in inputs.py)."""
from __future__ import annotations

import os

# ENV: the environment of the subprocesses the tests start: OpenMP threads that sleep when idle,
# so processes that share the cores (pytest and its child) do not spin against each other.
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
