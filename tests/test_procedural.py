"""Weightless experts (docs/method.md §9): the generator, procedural == materialized bit
for bit, no stored experts anywhere, and checkpoints that hold the generator.

The tests that compute take conftest's `device` ("cuda" is skipped, with the reason, where it
cannot run); inputs are drawn on the CPU and moved, so the "cpu" case is what it always was."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from helpers import ENV, kernels_on, repeatable, stop_and_resume, without_timing
from inputs import random_routing

from some import ops
from some.engine import load_checkpoint
from some.errors import ConfigError
from some.nn import SoMEForCausalLM, SoMELayer, SoMELayerConfig
from some.ops import ExpertSpec, philox
from some.runs import Trainer, apply_overrides, get_preset

# Known-answer vectors of Philox-4x32-10 (Random123's kat_vectors; also what the
# independent randomgen package gives): (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.fixture()
def device(device):
    """conftest's device; on CUDA the native kernels (helpers.kernels_on) unless the test's
    `backend` forces one."""
    with kernels_on(device):
        yield device


@pytest.mark.parametrize("counter, key, want", KAT)
def test_philox_matches_the_published_test_vectors(counter, key, want):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    assert tuple(int(o) for o in philox.philox4x32_10(*c, *key)) == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_and_torch_generators_give_the_same_bits(dtype, device):
    N, h, d = 3, 40, 24
    shapes = ((N, h, d), (N, h), (N, d, h), (N, d))
    native = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    torch.ops.some.fill_expert_weights(*native, 42, 7, 5)
    plain = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    with ops.use_backend("torch"):
        philox.fill_expert_weights(*plain, 42, 7, 5)
    assert all(torch.equal(a, b) for a, b in zip(native, plain))
    # element i of tensor t of expert e is a pure function of (seed, layer, e, t, i)
    one = philox.expert_tensor(42, 7, expert=6, tensor=philox.W2, shape=(d, h), fan_in=h, dtype=dtype, device=device)
    assert torch.equal(one, native[2][1])
    if device.type != "cpu":  # and of nothing else: a GPU's experts are the CPU's, bit for bit
        on_cpu = [torch.empty(s, dtype=dtype) for s in shapes]
        torch.ops.some.fill_expert_weights(*on_cpu, 42, 7, 5)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(native, on_cpu))


def test_draws_are_nn_linear_uniform():
    h, d = 256, 128
    w = philox.expert_tensor(0, 0, 0, philox.W1, (h, d), fan_in=d)
    bound = 1 / math.sqrt(d)
    assert w.abs().max() <= bound and w.min() < -0.99 * bound and w.max() > 0.99 * bound
    assert abs(float(w.mean())) < 0.01 * bound
    assert float(w.var()) == pytest.approx(bound**2 / 3, rel=0.02)  # U(-b, b): b² / 3
    other = [philox.expert_tensor(0, 0, 1, philox.W1, (h, d), d), philox.expert_tensor(0, 1, 0, philox.W1, (h, d), d),
             philox.expert_tensor(1, 0, 0, philox.W1, (h, d), d), philox.expert_tensor(0, 0, 0, philox.W2, (h, d), d)]
    for o in other:  # another expert, layer, seed or tensor: independent draws
        assert abs(float(torch.corrcoef(torch.stack([w.flatten(), o.flatten()]))[0, 1])) < 0.02


def _pair(storage_cfg, **kw):
    cfg = SoMELayerConfig(**{**dict(d_model=12, num_experts=7, d_ffn=20, top_k=3), **kw})
    a = SoMELayer(cfg, seed=3, layer=2, **storage_cfg)
    b = SoMELayer(SoMELayerConfig(**{**cfg.__dict__, "expert_storage": "procedural"}), seed=3, layer=2, **storage_cfg)
    b.load_state_dict(a.state_dict())  # the same router and keys; the experts regenerate
    return a, b


@pytest.mark.parametrize("gating", ops.GATINGS)
@pytest.mark.parametrize("dtype, expert_dtype", [(torch.float32, None), (torch.float64, None),
                                                 (torch.float32, torch.bfloat16)])
def test_procedural_layer_equals_materialized_bit_for_bit(gating, dtype, expert_dtype, backend, device,
                                                          monkeypatch):
    if device.type == "cuda":
        # the native kernels' own GEMMs for the stored experts too (bf16 may otherwise take
        # at::_grouped_mm, which sums in another order: the next test)
        monkeypatch.setenv("SOME_CUDA_GEMM", "kernels")
    a, b = _pair(dict(dtype=dtype, expert_dtype=expert_dtype, device=device), gating=gating)
    x = torch.randn(3, 9, 12, dtype=dtype).to(device)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding: -1 slots
    mask = mask.to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with repeatable(device, backend):
        ya, yb = a(xa, mask), b(xb, mask)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for (name, pa), pb in zip(a.router.named_parameters(), b.router.parameters()):
        assert (pa.grad is None and pb.grad is None) or torch.equal(pa.grad, pb.grad), name  # avg_k: no router grad


def test_procedural_layer_matches_materialized_under_the_default_gemm(backend, device, monkeypatch):
    """bf16 experts with d and h multiples of 8: on sm_90 the stored experts take PyTorch's
    grouped GEMM (at::_grouped_mm in the native kernels, F.grouped_mm in the torch backend),
    which sums in another order than the loops the procedural experts take, so there the two
    agree to bf16 rounding, not bit for bit (the test above forces SOME_CUDA_GEMM=kernels).
    Elsewhere they are equal; the bound holds either way."""
    monkeypatch.delenv("SOME_CUDA_GEMM", raising=False)
    a, b = _pair(dict(dtype=torch.float32, expert_dtype=torch.bfloat16, device=device), d_model=16, d_ffn=32)
    x = torch.randn(4, 16, 16).to(device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for got, want in ((yb.detach(), ya.detach()), (xb.grad, xa.grad)):
        err = float((got - want).norm() / want.norm())
        assert err < 1e-2, err


@pytest.mark.parametrize("T, k", [(1, 1), (13, 4)])
def test_procedural_op_equals_stored_experts_at_odd_sizes(T, k, backend, device):
    N, d, h = 5, 7, 9
    spec = ExpertSpec(11, 4, N, d, h, torch.float32)
    w = [torch.empty(s, device=device) for s in ((N, h, d), (N, h), (N, d, h), (N, d))]
    philox.fill_expert_weights(*w, 11, 4)
    idx, gates = random_routing(T, N, k, torch.float32, device)
    x = torch.randn(T, d).to(device)
    xa, ga = x.clone().requires_grad_(), gates.clone().requires_grad_()
    xb, gb = x.clone().requires_grad_(), gates.clone().requires_grad_()
    with repeatable(device, backend):
        ya, yb = ops.experts(xa, idx, ga, *w), ops.procedural_experts(xb, idx, gb, spec)
        assert torch.equal(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(ga.grad, gb.grad)


def test_procedural_storage_holds_no_experts(device):
    layer = SoMELayer(SoMELayerConfig(d_model=16, num_experts=8, d_ffn=32, expert_storage="procedural"), seed=1,
                      device=device)
    assert not [n for n, _ in layer.named_parameters() if n in ("w1", "b1", "w2", "b2")]
    assert layer.num_expert_parameters == 8 * (2 * 32 * 16 + 32 + 16)
    with pytest.raises(AttributeError, match="procedural expert storage holds no expert tensors"):
        layer.w1  # noqa: B018
    stored = SoMELayer(SoMELayerConfig(d_model=16, num_experts=8, d_ffn=32), seed=1, device=device)
    for got, want in zip(layer.materialize_experts(), stored.materialize_experts()):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="procedural expert storage holds no expert tensors"):
        layer.set_experts(*stored.materialize_experts())


def test_procedural_storage_is_refused_for_constructed_experts():
    with pytest.raises(ConfigError, match="procedural.*needs expert_init = 'default'"):
        apply_overrides(get_preset("tiny-test"), ["expert_init=cluster", "expert_storage=procedural"])


def test_parameter_counts_do_not_depend_on_the_storage():
    for storage in ("materialized", "procedural"):
        model = SoMEForCausalLM(apply_overrides(get_preset("A4"), [f"expert_storage={storage}"]), device="meta")
        total, trainable = model.parameter_counts()
        assert (round(total / 1e6, 2), round(trainable / 1e6, 2)) == (701.49, 29.42)


def test_a_b3_width_layer_in_procedural_storage_allocates_under_one_percent():
    """Peak RSS of building a B3-width layer (N=512, d=512, h=1024) and running a forward and
    backward on it, in a fresh process, against the bytes its stored experts would take."""
    code = """
import sys, torch
from some import ops
from some.analysis import current_rss_mb, peak_memory_mb
from some.nn import SoMELayer, SoMELayerConfig
torch.set_num_threads(2)
x = torch.randn(1, 256, 512, requires_grad=True)
base = current_rss_mb()
layer = SoMELayer(SoMELayerConfig(d_model=512, num_experts=512, d_ffn=1024, expert_storage=sys.argv[1]))
built = current_rss_mb()
layer(x).sum().backward()
print(built - base, peak_memory_mb("cpu") - base)
"""
    stored = 512 * (2 * 1024 * 512 + 1024 + 512) * 4 / 2**20  # MiB of float32 experts
    out = subprocess.run([sys.executable, "-c", code, "procedural"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    built, peak = map(float, out.stdout.split())
    assert built < 0.01 * stored, (built, stored)  # router (2.1M params) and key store only
    assert peak < 0.05 * stored, (peak, stored)  # plus one expert's scratch and the activations


def test_a_procedural_run_checkpoints_no_expert_and_resumes_exactly(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=2", "checkpoint_every=3", "expert_storage=procedural",
                                                       f"cache_dir={tmp_path}"])
    ref = Trainer(config, tmp_path / "ref", progress=False, echo=False)
    ref.run(make_plots=False)
    state = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    assert not [k for k in state["model"] if k.split(".")[-1] in ("w1", "b1", "w2", "b2")]
    record = state["model"]["blocks.1.ffn.experts._extra_state"]
    assert record == {"generator": philox.GENERATOR, "storage": "procedural", "seed": config.seed, "layer": 1,
                      "from_generator": True}
    resumed = stop_and_resume(config, tmp_path / "stopped", 5)
    assert without_timing(resumed.history) == without_timing(ref.history)


def test_a_checkpoint_of_other_generated_experts_is_refused(tmp_path):
    config = apply_overrides(get_preset("tiny-test"), ["epochs=1", f"cache_dir={tmp_path}"])
    Trainer(config, tmp_path / "run", progress=False, echo=False).run(make_plots=False)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    name = "blocks.0.ffn.experts._extra_state"
    state["model"][name] = {**state["model"][name], "digest": "0" * 64}
    from some.engine import save_checkpoint
    from some.errors import CheckpointError

    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        Trainer(None, tmp_path / "run", resume=True, progress=False, echo=False)


@pytest.mark.slow
def test_an_a4_checkpoint_is_trainable_plus_optimizer_size(tmp_path):
    """Procedural A4: the checkpoint holds the 29.42M trainable parameters, their two Adam moments
    and the key stores, not the 2.8 GB of experts."""
    from some.engine import make_optimizer, save_checkpoint

    config = apply_overrides(get_preset("A4"), ["expert_storage=procedural"])
    model = SoMEForCausalLM(config)
    optimizer = make_optimizer(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments
    path = tmp_path / "a4.pt"
    save_checkpoint(path, {"format": "x", "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = 3 * trainable * 4 + sum(b.numel() * b.element_size() for b in model.buffers())
    size = path.stat().st_size
    assert 0.98 * expected < size < 1.05 * expected, (size, expected)
    assert size < 0.2 * 2.8e9
