"""On CUDA, `auto` serves the native kernels only where `some selftest --device cuda` passed
with this exact build and GPU (some.ops.verification). No GPU is needed: the tests describe
one (name, capability), say the extension was built with CUDA kernels, and keep the record in
a temporary cache."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from some import ops
from some.ops import native, verification
from some.ops.selftest import CheckResult, record_verification

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
A100 = {"gpu": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
CUDA = torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A simulated GPU (H100 unless the test changes it) with native kernels built for it."""
    described = dict(H100)
    monkeypatch.setenv("SOME_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    built_for = native.built_for
    monkeypatch.setattr(native, "built_for", lambda d: True if torch.device(d).type == "cuda" else built_for(d))
    monkeypatch.setattr(verification, "describe_device", lambda index: dict(described))
    verification.refresh()
    yield described
    verification.refresh()


def _backend_and_warnings(device=CUDA) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend = ops.backend_for(device)
    return backend, [str(w.message) for w in caught]


def test_auto_serves_torch_on_an_unverified_gpu_and_says_so_once(gpu):
    backend, said = _backend_and_warnings()
    assert backend == "torch"
    assert len(said) == 1 and "H100" in said[0] and "sm_90" in said[0]
    assert "some selftest --device cuda" in said[0] and "SOME_OPS_BACKEND=native" in said[0]
    assert _backend_and_warnings() == ("torch", [])  # once per process and device


def test_a_recorded_verification_lets_auto_serve_the_kernels(gpu, tmp_path):
    path = verification.record_verified(CUDA)
    assert path == tmp_path / verification.RECORD_NAME
    (entry,) = json.loads(path.read_text())
    assert entry["gpu"] == H100["gpu"] and entry["capability"] == "9.0"
    assert entry["torch"] == torch.__version__ and len(entry["extension_sha256"]) == 64
    assert _backend_and_warnings() == ("native", [])
    assert ops.backend_for("cpu") == "native"  # the CPU kernels need no verification


@pytest.mark.parametrize("change", ["other_gpu", "other_torch", "other_build"])
def test_a_verification_holds_for_its_build_and_gpu_only(gpu, monkeypatch, change):
    verification.record_verified(CUDA)
    if change == "other_gpu":
        gpu.update(A100)
    elif change == "other_torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:  # a rebuilt extension file
        monkeypatch.setattr(verification, "extension_sha256", lambda: "0" * 64)
    verification.refresh()
    assert _backend_and_warnings()[0] == "torch"


def test_forcing_native_needs_no_verification(gpu):
    with ops.use_backend("native"):
        assert _backend_and_warnings() == ("native", [])


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"gpu": "x"}', ""])
def test_an_unreadable_record_verifies_nothing(gpu, tmp_path, content):
    path = tmp_path / verification.RECORD_NAME
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert _backend_and_warnings()[0] == "torch"
    verification.record_verified(CUDA)  # and the next verification rewrites it
    assert _backend_and_warnings()[0] == "native"


def _results(ok: bool = True, dtypes=("float32", "bfloat16")) -> list[CheckResult]:
    return [CheckResult("experts", "T=1", dt, backend, 0.0 if ok else 1.0, 1e-3, 0.0)
            for dt in dtypes for backend in ("native", "torch")]


def test_the_selftest_records_only_a_full_passing_check(gpu):
    said: list[str] = []
    record_verification(CUDA, _results(), quick=True, echo=said.append)
    assert not verification.is_verified(CUDA) and "without --quick" in said[-1]
    record_verification(CUDA, _results(dtypes=("float64",)), quick=False, echo=said.append)
    assert not verification.is_verified(CUDA)  # float32 and bfloat16 are what training runs in
    record_verification(CUDA, _results(), quick=False, echo=said.append)
    assert verification.is_verified(CUDA) and said[-1].startswith("verified:")
    # a later failure on the same build and GPU withdraws it
    record_verification(CUDA, _results(ok=False), quick=False, echo=said.append)
    assert not verification.is_verified(CUDA) and "torch backend" in said[-1]
    assert json.loads(verification.record_path().read_text()) == []
