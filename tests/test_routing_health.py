"""SPEC §4.1's routing-health options: center_queries (the running mean μ of the routed rows)."""
from __future__ import annotations

import pytest
import torch

from some import ops
from some.errors import ConfigError
from some.nn import SoMELayer, SoMELayerConfig


def _layer(**kw):
    torch.manual_seed(0)
    return SoMELayer(SoMELayerConfig(d_model=16, num_experts=12, top_k=3, d_ffn=8, **kw)).train()


def test_off_leaves_the_layer_as_it_was():
    assert not any("query_mean" in k for k in _layer().state_dict())
    a, b = _layer(), _layer(center_queries=False)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_centering_uses_real_tokens_and_moves_by_momentum():
    layer = _layer(center_queries=True, center_momentum=0.25)
    store = layer.key_store
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    layer(x, mask)
    q = layer.router.net(x).reshape(12, 16).detach()
    first = q[mask.reshape(-1)].mean(0)
    layer.update_keys()
    torch.testing.assert_close(store.query_mean, first)  # the first step sets μ
    # the next forward scores q − μ
    y = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    layer.usage.start()
    layer(y)
    q2 = layer.router.net(y).reshape(12, 16).detach()
    want = ops.route(q2 - first, store.keys, 3, layer.config.temperature, active=store.expert_active)
    assert torch.equal(layer.usage.last_indices, want.indices)
    layer.update_keys()
    torch.testing.assert_close(store.query_mean, first + 0.25 * (q2.mean(0) - first))
    # evaluation uses μ and leaves it alone
    before = store.query_mean.clone()
    layer.eval()
    layer(y)
    layer.update_keys()
    assert torch.equal(store.query_mean, before) and int(store.query_mean_updates) == 2


def test_query_mean_is_saved_and_restored():
    layer = _layer(center_queries=True)
    layer(torch.randn(1, 4, 16))
    layer.update_keys()
    other = _layer(center_queries=True)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.key_store.query_mean, layer.key_store.query_mean)
    assert int(other.key_store.query_mean_updates) == 1


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5, float("nan")])
def test_bad_center_momentum_names_the_field(momentum):
    with pytest.raises(ConfigError, match="center_momentum"):
        SoMELayerConfig(d_model=16, num_experts=12, top_k=3, d_ffn=8, center_queries=True,
                        center_momentum=momentum).validate()
