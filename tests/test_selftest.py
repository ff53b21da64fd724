"""`some selftest`: passes on a correct build, fails (exit 1) when a backend is wrong."""
from __future__ import annotations

import pytest

from some import ops
from some.cli import main
from some.ops import selftest, torch_backend


def test_selftest_passes_on_the_cpu(capsys):
    results = selftest.run_selftest("cpu", quick=True)
    assert results and all(r.ok for r in results)
    ops_seen = {r.op for r in results}
    assert {f"route[{g}]" for g in ops.GATINGS} | {"experts", "keystore"} <= ops_seen
    assert {r.backend for r in results} == {"native", "torch"}
    assert {r.dtype for r in results} == {"float64", "float32", "bfloat16"}
    out = capsys.readouterr().out
    assert "max error" in out and f"{len(results)} of {len(results)} checks passed" in out


def test_selftest_catches_a_wrong_backend(monkeypatch, capsys):
    right = torch_backend.experts
    monkeypatch.setattr(torch_backend, "experts", lambda *a: right(*a) * 1.01)  # a 1% error
    assert main(["selftest", "--device", "cpu", "--quick", "--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    assert "FAILED experts float32 torch" in out and "experts float32 native" not in out.split("FAILED")[1]


def test_selftest_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        selftest.run_selftest("cpu", ["float8"])
