import pytest
import torch

import some  # noqa: F401  (loads the extension)


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and some.build_info()["cuda"]:
        devs.append("cuda")
    return devs


DEVICES = _devices()


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
