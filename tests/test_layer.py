"""SoMELayer: composition of the ops, gradients, key-store bookkeeping, options."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import kernels_on

from some import SoMELayer, ops
from some.nn import SoMELayerConfig
from some.ops.reference import experts_ref, keystore_stats_ref, keystore_update_ref, route_ref

# The tests that compute take conftest's `device` ("cuda" is skipped, with the reason, where it
# cannot run). Inputs are drawn on the CPU and moved, so the "cpu" case is what it always was;
# a layer is built on its device (its keys from that device's generator, its experts by the
# device's kernels); references are computed on the CPU from copies.


@pytest.fixture()
def device(device):
    """conftest's device; on CUDA the native kernels (helpers.kernels_on)."""
    with kernels_on(device):
        yield device


def make_layer(dtype=torch.float64, seed=0, device=None, **kw):
    cfg = SoMELayerConfig(**{**dict(d_model=12, num_experts=6, d_ffn=10, top_k=2), **kw})
    return SoMELayer(cfg, seed=seed, dtype=dtype, device=device)


def cpu(t):
    """A CPU copy (a new tensor on the CPU too)."""
    return t.detach().to("cpu", copy=True)


def test_forward_matches_reference_composition(device):
    layer = make_layer(device=device)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y = layer(x.to(device))
    q = cpu(layer.router.net(x.to(device)).reshape(15, 12))
    idx, gates, _ = route_ref(q, cpu(layer.keys), 2, 0.8)
    want = experts_ref(x.reshape(15, 12), idx, gates, *map(cpu, (layer.w1, layer.b1, layer.w2, layer.b2)))
    torch.testing.assert_close(y.cpu(), want.reshape(3, 5, 12))


def test_gradients_reach_router_and_input_only(device):
    layer = make_layer(device=device)
    x = torch.randn(2, 4, 12, dtype=torch.float64).to(device).requires_grad_()
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in layer.router.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        assert not p.requires_grad and p.grad is None
    assert not layer.keys.requires_grad


def test_parameter_counts():
    d, N, h = 12, 6, 10
    layer = make_layer()
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in layer.parameters())
    assert trainable == (d * 2 * d + 2 * d) + (2 * d * d + d)  # router MLP d -> 2d -> d
    assert total - trainable == N * (2 * h * d + h + d)  # frozen experts


def test_default_init_is_seeded_and_nn_linear_like(device):
    a, b, c = make_layer(seed=3, device=device), make_layer(seed=3, device=device), make_layer(seed=4, device=device)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.keys, b.keys)
    assert not torch.equal(a.w1, c.w1) and not torch.equal(a.keys, c.keys)
    assert a.w1.abs().max() <= 1 / math.sqrt(12) and a.w2.abs().max() <= 1 / math.sqrt(10)
    assert a.w1.abs().max() > 0.8 / math.sqrt(12)  # uniform, filling the nn.Linear range
    torch.testing.assert_close(a.keys.norm(dim=1), torch.ones(6, dtype=torch.float64, device=device))


def test_update_keys_uses_all_micro_batches(device):
    layer = make_layer(device=device)
    layer.train()
    x1, x2 = torch.randn(2, 4, 12, dtype=torch.float64), torch.randn(3, 4, 12, dtype=torch.float64)
    keys0, vel0, use0 = cpu(layer.keys), cpu(layer.key_velocity), cpu(layer.key_usage)
    with torch.no_grad():
        layer(x1.to(device))
        layer(x2.to(device))
        q = cpu(layer.router.net(torch.cat([x1, x2]).to(device)).reshape(-1, 12))
    idx, gates, _ = route_ref(q, keys0, 2, 0.8)
    stats = keystore_stats_ref(q, idx, gates, 6)
    c = layer.config
    want = keystore_update_ref(keys0, vel0, use0, *stats, c.alpha, c.beta, c.delta, c.theta_percentile, c.ema_decay)
    assert layer.update_keys(wait=True) is True  # (the default on the CPU; a GPU's default leaves a tensor)
    torch.testing.assert_close(layer.keys.cpu(), want[0])
    torch.testing.assert_close(layer.key_velocity.cpu(), want[1])
    torch.testing.assert_close(layer.key_usage.cpu(), want[2])
    assert layer.update_keys() is None  # nothing pending any more
    assert layer.pending_stats() is None


def test_no_statistics_in_eval_mode(device):
    layer = make_layer(device=device).eval()
    layer(torch.randn(2, 3, 12, dtype=torch.float64).to(device))
    assert layer.pending_stats() is None


def test_padding_tokens_get_no_expert(device):
    layer = make_layer(device=device)
    layer.train()
    layer.usage.start()
    x = torch.randn(2, 5, 12, dtype=torch.float64).to(device)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool).to(device)
    y = layer(x, token_mask=mask)
    assert torch.equal(y[0, 3:], torch.zeros(2, 12, dtype=torch.float64, device=device))
    assert int(layer.usage.counts.sum()) == 8 * 2  # 8 real tokens, k = 2
    assert int(layer.pending_stats().counts.sum()) == 8 * 2
    y_real = layer(x[:, :3], token_mask=None)
    torch.testing.assert_close(y[:, :3], y_real)  # masking does not change real tokens


def test_sequence_level_routing_shares_experts(device):
    layer = make_layer(routing_level="sequence", device=device)
    layer.usage.start()
    x = torch.randn(3, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.to(device).requires_grad_()
    layer(x).sum().backward()
    idx = layer.usage.last_indices.reshape(3, 7, 2)
    assert (idx == idx[:, :1]).all()
    # the shared query is the mean of the sequence's router outputs
    q_seq = layer.router.net(x).mean(1)
    want, _, _ = route_ref(cpu(q_seq), cpu(layer.keys), 2, 0.8)
    assert torch.equal(idx[:, 0].cpu(), want)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("gating", ops.GATINGS)
def test_every_gating_trains(gating, device):
    layer = make_layer(gating=gating, top_k=3, device=device)
    x = torch.randn(4, 6, 12, dtype=torch.float64).to(device).requires_grad_()
    layer.train()
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if gating == "top_any":
        assert layer.thresholds.grad is not None
    assert layer.update_keys(wait=True) is True


def test_router_kinds(device):
    lin = make_layer(router="linear", device=device)
    assert sum(p.numel() for p in lin.parameters() if p.requires_grad) == 12 * 12 + 12
    frozen = make_layer(router="frozen", device=device)
    assert not any(p.requires_grad for p in frozen.parameters())
    rnd = make_layer(router="random", device=device)
    w0 = rnd.router.net[0].weight.clone()
    rnd.train()
    rnd(torch.randn(1, 2, 12, dtype=torch.float64).to(device))
    rnd.update_keys()
    assert not torch.equal(w0, rnd.router.net[0].weight)  # re-drawn every step


def test_a_random_router_redraws_the_same_weights_on_every_device_and_after_a_move(device):
    # the re-drawing generator lives on the CPU: a layer moved with .to() draws what a CPU
    # layer draws, and its state resumes on any device
    moved = make_layer(router="random").to(device)
    here = make_layer(router="random")
    for layer in (moved, here):
        layer.train()
        layer(torch.randn(1, 2, 12, dtype=torch.float64).to(layer.keys.device))
        layer.update_keys(wait=True)
    assert torch.equal(cpu(moved.router.net[0].weight), here.router.net[0].weight)
    assert moved.router_rng_state().device.type == "cpu"
    here.set_router_rng_state(moved.router_rng_state())  # a state saved on one device resumes on another


def test_dot_score_mode_keeps_key_norms(device):
    layer = make_layer(score_mode="dot", alpha=0.5, device=device)
    layer.train()
    layer(torch.randn(4, 4, 12, dtype=torch.float64).to(device))
    layer.update_keys()
    norms = layer.keys.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # no re-normalization in dot mode


def test_inactive_experts_never_selected(device):
    layer = make_layer(device=device)
    layer.usage.start()
    layer.expert_active[[1, 4]] = False
    layer(torch.randn(5, 6, 12, dtype=torch.float64).to(device))
    assert layer.usage.counts[[1, 4]].sum() == 0 and layer.usage.counts.sum() == 60


def test_bfloat16_experts_float32_model(device):
    """(d and h multiples of 8: on sm_90 the stored bf16 experts take at::_grouped_mm.)"""
    cfg = SoMELayerConfig(d_model=16, num_experts=4, d_ffn=24, top_k=2)
    layer = SoMELayer(cfg, expert_dtype=torch.bfloat16, device=device)
    x = torch.randn(2, 3, 16).to(device).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.float32 and layer.w1.dtype == torch.bfloat16 and layer.keys.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32


def test_meta_device_builds_without_init():
    layer = SoMELayer(SoMELayerConfig(d_model=512, num_experts=64, d_ffn=1024), device="meta")
    assert sum(p.numel() for p in layer.parameters() if not p.requires_grad) == 64 * 1_050_112


@pytest.mark.parametrize("bad", [dict(top_k=7), dict(top_k=0), dict(gating="max"), dict(router="gru"),
                                 dict(temperature=0.0), dict(ema_decay=1.5), dict(routing_level="doc")])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        make_layer(**bad)


def test_bad_input_shape():
    layer = make_layer()
    with pytest.raises(ValueError, match="expected x of shape"):
        layer(torch.randn(2, 3, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="token_mask"):
        layer(torch.randn(2, 3, 12, dtype=torch.float64), token_mask=torch.ones(2, 4, dtype=torch.bool))


def test_adaptive_process_removes_unused_and_adds_keyed_expert(device):
    """A constructed case: experts 4 and 5 start inactive (spare capacity); all
    tokens point at expert 0's key, so expert 3 is never used and is removed;
    with a threshold above every score, all tokens count as unmatched and a
    new expert is added at the normalized sum of their queries."""
    layer = make_layer(adaptive=True, adaptive_window=2, adaptive_threshold=2.0, initial_experts=4, device=device)
    assert layer.active_experts == 4 and not layer.expert_active[4:].any()
    with torch.no_grad():
        layer.keys.copy_(torch.eye(6, 12, dtype=torch.float64, device=device))
        # a linear router that maps everything onto +e0 (plus a little of e1, e2)
        lin = layer.router.net[2]
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, 0.3, 0.2] + [0.0] * 9, dtype=torch.float64, device=device))
    layer.train()
    x = torch.randn(2, 4, 12, dtype=torch.float64).to(device)
    q = torch.nn.functional.normalize(layer.router.net(x).reshape(-1, 12), dim=-1)
    for step in range(2):
        layer(x)
        assert layer.update_keys()
        if step == 0:
            assert layer.active_experts == 4  # the window is not over yet
    # every token's top-2 is {0, 1} (q ∝ e0 + .3 e1 + .2 e2), so experts 2 and 3
    # are unused -> removed; one expert is added in the lowest free slot (2),
    # keyed at the normalized sum of the (all unmatched) queries
    assert layer.expert_active.tolist() == [True, True, True, False, False, False]
    want = torch.nn.functional.normalize(q.sum(0), dim=0)
    torch.testing.assert_close(layer.keys[2], want)
    torch.testing.assert_close(layer.key_velocity[2], torch.zeros(12, dtype=torch.float64, device=device))
    assert int(layer.key_store.window_steps) == 0 and int(layer.key_store.window_counts.sum()) == 0


def test_adaptive_process_state_is_in_state_dict():
    layer = make_layer(adaptive=True, adaptive_window=5)
    layer.train()
    layer(torch.randn(2, 3, 12, dtype=torch.float64))
    layer.update_keys()
    sd = layer.state_dict()
    assert int(sd["key_store.window_steps"]) == 1 and int(sd["key_store.window_counts"].sum()) == 12
    fresh = make_layer(adaptive=True, adaptive_window=5)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.key_store.window_counts, layer.key_store.window_counts)


def test_experts_per_token_counts_real_tokens(device):
    layer = make_layer(gating="top_p", top_k=4, top_p=0.5, device=device)
    layer.usage.start()
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool).to(device)
    layer(torch.randn(1, 3, 12, dtype=torch.float64).to(device), token_mask=mask)
    assert int(layer.usage.tokens) == 2
    assert 1 <= layer.usage.experts_per_token <= 4


def test_sequence_routing_of_a_single_sequence(device):
    """One sequence: the expanded routing tensors are views with stride 0."""
    layer = make_layer(routing_level="sequence", device=device)
    x = torch.randn(1, 5, 12, dtype=torch.float64).to(device).requires_grad_()
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y[0], layer(x.expand(2, 5, 12))[1])
    assert torch.isfinite(x.grad).all()
