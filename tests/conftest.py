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


@pytest.fixture(scope="session")
def tiny_test_run(tmp_path_factory):
    """One tiny-test run on the synthetic corpus trained to the end, ``(trainer, run dir)``: the
    test modules that only read a finished run and its exported model share it."""
    from some.runs import Trainer, apply_overrides, get_preset

    out = tmp_path_factory.mktemp("tiny_test") / "run"
    cfg = apply_overrides(get_preset("tiny-test"), [f"cache_dir={out.parent / 'cache'}"])
    trainer = Trainer(cfg, out, progress=False, echo=False)
    trainer.run(make_plots=False)
    return trainer, out


def pytest_report_header(config):
    info = some.build_info()
    return (f"some {info['version']} (torch {info['torch_version']}, cuda kernels: {info['cuda']}, "
            f"omp threads: {info['omp_max_threads']})")
