"""The two backends of the ops (docs/method.md §8): the choice, the torch backend never
touching torch.ops.some, both agreeing with each other, and training with either."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ENV
from inputs import make_experts, make_route_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from some import ops
from some.data import build_data, collate, epoch_order
from some.engine import make_optimizer, train_step
from some.nn import SoMEForCausalLM
from some.ops.torch_backend import grouped_matmul
from some.runs import Trainer, apply_overrides, get_preset


class CountSomeOps(TorchDispatchMode):
    """Counts every dispatcher call of a `some::` op (forward or backward)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "some":
            self.calls[str(func)] = self.calls.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _all_ops_forward_backward():
    q, K, thr = make_route_inputs(20, 8, 6, torch.float32)
    q.requires_grad_()
    x = torch.randn(20, 8, requires_grad=True)
    w = make_experts(6, 8, 12, torch.float32)
    r = ops.route(q, K, 2, 0.8)
    y = ops.experts(x, r.indices, r.gates, *w)
    y.square().sum().backward()
    stats = ops.keystore_stats(q, r.indices, r.gates, 6)
    assert ops.keystore_update(K.clone(), torch.zeros_like(K), torch.zeros(6), *stats, 0.01, 0.005, 0.001, 0.05, 0.99)
    return q.grad, x.grad


def test_torch_backend_never_calls_the_dispatcher_ops():
    with ops.use_backend("torch"), CountSomeOps() as mode:
        gq, gx = _all_ops_forward_backward()
    assert mode.calls == {}
    assert gq.abs().sum() > 0 and gx.abs().sum() > 0
    with ops.use_backend("native"), CountSomeOps() as mode:
        _all_ops_forward_backward()
    assert {"some.route.default", "some.experts.default", "some.experts_backward.default",
            "some.keystore_update.default"} <= set(mode.calls)  # the counter sees native calls


def test_choice_of_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SOME_OPS_BACKEND", raising=False)
    assert ops.backend_for(cpu) == "native" and ops.forced_backend() == "auto"
    with ops.use_backend("torch") as choice:
        assert ops.backend_for(cpu) == "torch" and choice.name == "torch"
        with ops.use_backend("native"):
            assert ops.backend_for(cpu) == "native"
        assert ops.backend_for(cpu) == "torch"
    assert ops.backend_for(cpu) == "native"  # the block did not leak
    monkeypatch.setenv("SOME_OPS_BACKEND", "torch")
    assert ops.backend_for(cpu) == "torch"
    with ops.use_backend("native"):  # use_backend comes before the environment
        assert ops.backend_for(cpu) == "native"
    monkeypatch.setenv("SOME_OPS_BACKEND", "cuda-kernels")
    with pytest.raises(ValueError, match=r"\$SOME_OPS_BACKEND: unknown ops backend 'cuda-kernels'"):
        ops.backend_for(cpu)
    with pytest.raises(ValueError, match="unknown ops backend 'fast'"):
        ops.use_backend("fast")


def test_use_backend_as_a_function_stays_in_force():
    code = ("from some import ops; import torch\n"
            "ops.use_backend('torch')\n"
            "print(ops.backend_for(torch.device('cpu')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"


def test_without_the_extension_auto_is_torch_and_native_is_a_clear_error():
    code = ("import sys; sys.modules['some._C'] = None\n"
            "import torch; from some import ops\n"
            "q, K = torch.randn(5, 4), torch.randn(3, 4)\n"
            "print(ops.backend_for(q.device), ops.route(q, K, 2, 0.8).indices.shape[1])\n"
            "ops.use_backend('native')\n"
            "ops.route(q, K, 2, 0.8)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.stdout.split() == ["torch", "2"]
    assert out.returncode != 0 and "the native backend was asked for" in out.stderr


@pytest.mark.parametrize("gating", ops.GATINGS)
def test_backends_select_the_same_experts(gating):
    q, K, thr = make_route_inputs(300, 16, 24, torch.float32, seed=5)
    active = torch.rand(24, generator=torch.Generator().manual_seed(1)) > 0.2
    kw = dict(thresholds=thr if gating == "top_any" else None, active=active, fallback_top1=gating == "top_any")
    with ops.use_backend("native"):
        a = ops.route(q, K, 4, 0.5, gating, **kw)
    with ops.use_backend("torch"):
        b = ops.route(q, K, 4, 0.5, gating, **kw)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.gates, b.gates, atol=2e-6, rtol=2e-5)


def test_nan_scores_are_never_selected_by_the_torch_backend():
    q, K, _ = make_route_inputs(6, 4, 5, torch.float64)
    K[2] = float("nan")  # expert 2 scores NaN for every token
    with ops.use_backend("torch"):
        r = ops.route(q, K, 4, 0.8)
    assert not (r.indices == 2).any() and (r.indices[:, :4] >= 0).all()
    assert torch.isfinite(r.gates).all()


@pytest.mark.parametrize("dtype, d, h", [(torch.float32, 16, 32), (torch.float64, 5, 7), (torch.bfloat16, 6, 10),
                                         (torch.bfloat16, 16, 32)])
def test_grouped_matmul_and_its_fallback(dtype, d, h):
    """grouped_mm where it takes the inputs (fp32; bf16 with 16-byte aligned widths), else the loop."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(11, d, generator=g).to(dtype)
    b = torch.randn(4, d, h, generator=g).to(dtype)
    offsets = torch.tensor([3, 3, 9, 11], dtype=torch.int32)
    got = grouped_matmul(a, b, offsets)
    bounds = [0, 3, 3, 9, 11]
    want = torch.cat([a[bounds[e]:bounds[e + 1]].double() @ b[e].double() for e in range(4)])
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_training_with_the_torch_backend_calls_no_native_op(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", "ops_backend=torch", f"cache_dir={tmp_path}"])
    trainer = Trainer(config, tmp_path / "torch", progress=False, echo=False)
    with CountSomeOps() as mode:
        trainer.run(make_plots=False)
    assert mode.calls == {}
    info = json.loads((tmp_path / "torch" / "run.json").read_text())
    assert info["ops_backend"] == "torch"
    assert "Ops backend: torch (ops_backend = torch)" in (tmp_path / "torch" / "train.log").read_text()
    native = apply_overrides(config, ["ops_backend=native"])
    with CountSomeOps() as mode:
        Trainer(native, tmp_path / "native", progress=False, echo=False).run(make_plots=False)
    assert mode.calls.get("some.experts.default", 0) > 0


def _step_losses(config, backend: str, steps: int) -> list[float]:
    data = build_data(config.data_config())
    model = SoMEForCausalLM(config)
    model.train()
    optimizer = make_optimizer(model, config)
    order = epoch_order(len(data.train), config.seed, 0)
    total = (len(data.train) // config.batch_size) * config.epochs
    losses = []
    with ops.use_backend(backend):
        for s in range(steps):
            batch = collate(data.train, order[s * config.batch_size:(s + 1) * config.batch_size], "cpu")
            losses.append(train_step(model, batch, optimizer, config, step=s + 1, total_steps=total,
                                     grad_accum=config.grad_accum).loss)
    return losses


@pytest.mark.slow
def test_first_twenty_steps_of_tiny_agree_between_backends(tmp_path):
    config = apply_overrides(get_preset("tiny"), [f"cache_dir={tmp_path}"])
    native, torch_ = _step_losses(config, "native", 20), _step_losses(config, "torch", 20)
    for step, (a, b) in enumerate(zip(native, torch_), 1):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
