import pytest
import torch
from helpers import needs_cuda

import some  # noqa: F401  (loads the extension)

# The "cuda" params are always collected and skipped, with the reason, where they cannot run,
# so a CPU run shows what it left out. A test that takes both `device` and `backend` runs
# every pair: cuda-native, cuda-torch as cpu-native, cpu-torch.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["native", "torch"])
def backend(request):
    """Run the test with each ops backend forced (some.ops.use_backend)."""
    from some import ops

    with ops.use_backend(request.param):
        yield request.param


def pytest_report_header(config):
    info = some.build_info()
    return (f"some {info['version']} (torch {info['torch_version']}, cuda kernels: {info['cuda']}, "
            f"omp threads: {info['omp_max_threads']})")
