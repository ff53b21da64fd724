"""The routing-health options (docs/method.md §4.1): center_queries (the running mean μ of the routed rows),
balance_bias (a selection bias from the usage imbalance) and key_init = data (k-means keys)."""
from __future__ import annotations

import pytest
import torch
from helpers import metrics_records, stop_and_resume, without_timing

from some import ops
from some.errors import ConfigError
from some.nn import SoMELayer, SoMELayerConfig
from some.nn.key_init import kmeans_keys


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


@pytest.mark.parametrize("option,buffers", [("center_queries", ("query_mean", "query_mean_updates")),
                                            ("balance_bias", ("selection_bias",))])
def test_the_options_state_is_saved_and_restored(option, buffers):
    layer = _layer(**{option: True})
    layer(torch.randn(1, 4, 16))
    layer.update_keys()
    other = _layer(**{option: True})
    other.load_state_dict(layer.state_dict())
    for name in buffers:
        assert torch.equal(getattr(other.key_store, name), getattr(layer.key_store, name)), name
    if option == "center_queries":
        assert int(other.key_store.query_mean_updates) == 1


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5, float("nan")])
def test_bad_center_momentum_names_the_field(momentum):
    with pytest.raises(ConfigError, match="center_momentum"):
        SoMELayerConfig(d_model=16, num_experts=12, top_k=3, d_ffn=8, center_queries=True,
                        center_momentum=momentum).validate()


# ------------------------------------------------------------- balance_bias


def test_balance_bias_off_registers_nothing():
    assert not any("selection_bias" in k or "keys_from_data" in k for k in _layer().state_dict())


def test_balance_bias_chooses_by_the_bias_and_moves_it_by_the_sign_of_the_imbalance():
    layer = _layer(balance_bias=True, balance_rate=0.05)
    store = layer.key_store
    store.expert_active[7] = False  # an inactive expert keeps its bias
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    layer.usage.start()
    layer(x, mask)
    first = layer.usage.last_indices.clone()
    counts = torch.bincount(first[first >= 0], minlength=12).float()
    layer.update_keys()
    active = store.expert_active
    want = torch.where(active, 0.05 * torch.sign(counts[active].mean() - counts), 0.0)
    torch.testing.assert_close(store.selection_bias, want, rtol=0, atol=0)
    assert float(store.selection_bias[7]) == 0.0 and bool((store.selection_bias != 0).any())
    # the next forward chooses by score + bias and gates by the score
    layer.usage.start()
    layer(x, mask)
    q = layer.router.net(x).reshape(12, 16).detach()
    want_route = ops.route(q, store.keys, 3, layer.config.temperature, active=active,
                           selection_bias=store.selection_bias)
    got = layer.usage.last_indices
    real = mask.reshape(-1)
    assert torch.equal(got[real], want_route.indices[real])
    layer.update_keys()
    # evaluation chooses with the bias too and leaves it alone
    before = store.selection_bias.clone()
    layer.eval()
    layer(x, mask)
    layer.update_keys()
    assert torch.equal(store.selection_bias, before)


def test_balance_bias_evens_out_usage_on_skewed_queries():
    # queries clustered around one key: without the bias a few experts take every token
    torch.manual_seed(0)
    counts = {}
    for on in (False, True):
        layer = _layer(balance_bias=on, balance_rate=0.02, alpha=0.0, beta=0.0, delta=0.0, router="frozen")
        g = torch.Generator().manual_seed(3)
        for _ in range(60):
            layer(torch.randn(4, 8, 16, generator=g) + 3.0)
            layer.update_keys()
        layer.eval()
        layer.usage.start()
        layer(torch.randn(8, 8, 16, generator=g) + 3.0)
        idx = layer.usage.last_indices
        counts[on] = torch.bincount(idx[idx >= 0], minlength=12)
    assert int((counts[True] > 0).sum()) > int((counts[False] > 0).sum())
    assert counts[True].max() < counts[False].max()


def test_a_revived_key_starts_without_the_bias_its_idle_steps_earned():
    torch.manual_seed(0)
    layer = _layer(balance_bias=True, revive_after=1)
    layer.usage.start()
    layer(torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0)) + 2)  # a few experts take all
    used = set(layer.usage.last_indices.flatten().tolist())
    layer.update_keys()
    idle = [e for e in range(12) if e not in used]
    assert idle and int(layer.telemetry.revived) == len(idle)  # each idle one got +rate, then was revived
    assert all(float(layer.key_store.selection_bias[e]) == 0.0 for e in idle)
    assert any(float(layer.key_store.selection_bias[e]) != 0.0 for e in used)


@pytest.mark.parametrize("kw,match", [
    (dict(balance_bias=True, gating="top_p"), "balance_bias.*top-k gating"),
    (dict(balance_bias=True, gating="top_any"), "balance_bias.*top-k gating"),
    (dict(balance_bias=True, balance_rate=0.0), "balance_rate"),
    (dict(balance_bias=True, balance_rate=float("inf")), "balance_rate"),
    (dict(key_init="kmeans"), "key_init"),
    (dict(key_init="data", expert_init="cluster"), "key_init = 'data' and expert_init = 'cluster'"),
])
def test_bad_routing_health_options_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        SoMELayerConfig(d_model=16, num_experts=12, top_k=3, d_ffn=8, **kw).validate()


# --------------------------------------------------------------- key_init = data


def test_kmeans_keys_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(6, 16, dtype=torch.float64)
    rows = centers.repeat(20, 1) + 0.05 * torch.randn(120, 16, generator=g, dtype=torch.float64)
    got = kmeans_keys(rows, 6, torch.Generator().manual_seed(1), cosine=True)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6, dtype=torch.float64))
    # each center is matched by one centroid (cosine > 0.99)
    assert sorted((got @ centers.T).argmax(dim=0).tolist()) == list(range(6))
    assert bool(((got @ centers.T).max(dim=0).values > 0.99).all())
    # fewer rows than keys: as many centroids as rows; repeated rows count once, zero rows not at all
    assert kmeans_keys(rows[:4], 6, torch.Generator().manual_seed(1), cosine=True).shape == (4, 16)
    repeated = torch.cat([centers[:3].repeat(5, 1), torch.zeros(4, 16, dtype=torch.float64)])
    got3 = kmeans_keys(repeated, 6, torch.Generator().manual_seed(1), cosine=True)
    assert got3.shape == (3, 16) and torch.linalg.matrix_rank(got3) == 3
    # dot scoring: Euclidean means, not unit vectors
    far = kmeans_keys(5 * rows, 6, torch.Generator().manual_seed(1), cosine=False)
    assert bool((far.norm(dim=1) > 4).all())


@pytest.mark.parametrize("center", [False, True])
def test_key_init_data_sets_the_keys_once_from_the_first_batch(center):
    layer = _layer(key_init="data", center_queries=center)
    store = layer.key_store
    random_keys = store.keys.clone()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:] = False  # 8 real rows for 12 experts: keys 8..11 stay random
    layer.eval()
    layer(x, mask)  # evaluation does not initialize
    assert torch.equal(store.keys, random_keys) and not bool(store.keys_from_data)
    layer.train()
    layer(x, mask)
    q = layer.router.net(x).reshape(12, 16).detach()[mask.reshape(-1)]
    if center:
        torch.testing.assert_close(store.query_mean, q.mean(0))
        q = q - q.mean(0)
    want = kmeans_keys(q, 12, torch.Generator().manual_seed(layer.key_store.seed + layer.key_store.layer),
                       cosine=True)
    torch.testing.assert_close(store.keys[:8], want.float())
    assert torch.equal(store.keys[8:], random_keys[8:]) and bool(store.keys_from_data)
    layer.update_keys()
    after_update = store.keys.clone()
    layer(torch.randn(2, 6, 16))  # the second batch routes with them, and sets nothing
    assert torch.equal(store.keys, after_update)
    # saved and restored: a resumed run does not initialize again
    other = _layer(key_init="data", center_queries=center)
    other.load_state_dict(layer.state_dict())
    assert bool(other.key_store.keys_from_data) and torch.equal(other.key_store.keys, store.keys)


# ------------------------------------------------------------- in a training run

ALL_OPTIONS = ["center_queries=true", "balance_bias=true", "key_init=data"]


def test_a_run_with_every_option_resumes_bit_identically(tmp_path):
    from some.engine import load_checkpoint
    from some.runs import Trainer, apply_overrides, get_preset

    config = apply_overrides(get_preset("tiny-test"), ["epochs=2", "checkpoint_every=3", f"cache_dir={tmp_path}",
                                                       *ALL_OPTIONS])
    ref = Trainer(config, tmp_path / "ref", progress=False, echo=False)
    ref.run(make_plots=False)
    out = tmp_path / "stopped"
    resumed = stop_and_resume(config, out, 5)
    assert without_timing(resumed.history) == without_timing(ref.history)
    a, b = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (tmp_path / "ref", out))
    state = [k for k in a if k.split(".")[-1] in ("keys", "query_mean", "selection_bias", "keys_from_data")]
    assert len(state) == 4 * 2  # the two SoME layers of tiny-test
    for k in state:
        assert torch.equal(a[k], b[k]), k
    assert bool((a["blocks.1.ffn.key_store.selection_bias"] != 0).any())


def test_the_options_state_is_exported_with_the_model(tmp_path):
    from some.nn import SoMEForCausalLM
    from some.runs import apply_overrides, get_preset
    from some.runs.build import build_model

    model, _ = build_model(apply_overrides(get_preset("tiny-test"), ALL_OPTIONS), torch.device("cpu"))
    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, torch.ones_like(ids, dtype=torch.bool))
    for layer in model.some_layers():
        layer.update_keys()
    model.save_pretrained(tmp_path / "model")
    loaded = SoMEForCausalLM.from_pretrained(tmp_path / "model")
    a, b = model.state_dict(), loaded.state_dict()
    state = [k for k in a if k.split(".")[-1] in ("query_mean", "selection_bias", "keys_from_data")]
    assert len(state) == 6 and all(torch.equal(a[k], b[k]) for k in state)
    assert loaded.config.balance_bias and loaded.config.key_init == "data"


def test_the_options_off_reproduce_the_small_run_bit_for_bit(tmp_path):
    """A short `small` run (its architecture, on the synthetic source) with every option off
    gives the metrics and the exported model, tensor by tensor, that the code before the
    options existed wrote (tests/fixtures/small_v0_1, written at the commit it names)."""
    import hashlib
    import json
    from pathlib import Path

    import tokenizers
    from safetensors.torch import load_file

    from some.runs import Trainer, apply_overrides, get_preset

    expected = json.loads((Path(__file__).parent / "fixtures" / "small_v0_1" / "expected.json").read_text())
    # the run trains its BPE tokenizer and computes in float32 on the CPU: the bits hold for the
    # library versions that wrote them
    versions = {"torch": torch.__version__, "tokenizers": tokenizers.__version__}
    if any(expected[k] != v for k, v in versions.items()):
        pytest.skip(f"the fixture was written with torch {expected['torch']}, tokenizers {expected['tokenizers']}; "
                    f"this is {versions}")
    sets = ["data_source=synthetic", "ood_source=none", "epochs=1", "train_subset_size=128", "val_subset_size=32",
            "center_queries=false", "balance_bias=false", "key_init=random", f"cache_dir={tmp_path}"]
    trainer = Trainer(apply_overrides(get_preset("small"), sets), tmp_path / "run", progress=False, echo=False)
    trainer.run(make_plots=False)
    assert metrics_records(tmp_path / "run" / "metrics.jsonl") == expected["metrics"]
    state = load_file(tmp_path / "run" / "model" / "model.safetensors")

    def sha(t):
        return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    got = {k: sha(t) for k, t in sorted(state.items())}
    assert got.keys() == expected["model_sha256"].keys()
    differ = [k for k in got if got[k] != expected["model_sha256"][k]]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
