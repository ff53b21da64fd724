"""some.construction: experts cut from a dense FFN by clustering its neurons."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from some import ops
from some.construction import (
    BALANCED_METHODS,
    METHODS,
    cluster_neurons,
    experts_from_dense,
    load_into_layer,
    normalized_keys,
    rebalance,
)
from some.nn import SoMELayer, SoMELayerConfig

D, N, HW = 16, 6, 16  # d, experts, expert width: H = 96 neurons
H = N * HW


def dense_ffn(seed=0, H=H, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(H, d, generator=g, dtype=dtype)
    b1 = torch.randn(H, generator=g, dtype=dtype)
    W2 = torch.randn(d, H, generator=g, dtype=dtype) / H**0.5
    b2 = torch.randn(d, generator=g, dtype=dtype)
    return W1, b1, W2, b2


def dense_forward(x, W1, b1, W2, b2):
    return F.gelu(x @ W1.T + b1, approximate="none") @ W2.T + b2


def planted_w1(seed=0):
    """W1 whose rows are N well-separated directions plus small noise, with
    random row scales (so only the normalized rows reveal the clusters)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.linalg.qr(torch.randn(D, N, generator=g, dtype=torch.float64))[0].T  # (N, d) orthonormal
    truth = torch.randperm(H, generator=g) % N  # planted cluster of each neuron, HW each
    rows = centers[truth] + 0.05 * torch.randn(H, D, generator=g, dtype=torch.float64)
    scale = torch.empty(H, 1, dtype=torch.float64).uniform_(0.1, 10.0, generator=g)
    return rows * scale, truth


# The test-suite runs k-means with fewer restarts to stay fast.
FAST = {"balanced_kmeans": {"n_init": 3}, "kmeans": {"n_init": 3}}


@pytest.fixture(scope="module")
def ffn():
    return dense_ffn()


@pytest.fixture(scope="module")
def clusters(ffn):
    return {m: cluster_neurons(ffn[0], N, m, seed=0, **FAST.get(m, {})) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_equal_size_partition_of_all_neurons(clusters, method):
    r = clusters[method]
    assert r.method == method
    assert r.groups.shape == (N, HW) and r.groups.dtype == torch.int64
    assert torch.equal(r.groups.flatten().sort().values, torch.arange(H))  # every neuron exactly once
    assert torch.equal(r.groups, r.groups.sort(dim=1).values)  # ascending within each expert
    assert torch.all(r.groups[1:, 0] > r.groups[:-1, 0])  # canonical expert order
    assert r.assignment.shape == (H,) and r.assignment.dtype == torch.int64
    for e in range(N):
        assert torch.all(r.assignment[r.groups[e]] == e)
    assert sum(r.raw_sizes) == H and len(r.raw_sizes) == N
    # Rebalancing moves exactly the surplus of the too-big clusters.
    assert r.n_moved == sum(max(0, s - HW) for s in r.raw_sizes)


@pytest.mark.parametrize("method", BALANCED_METHODS)
def test_balanced_methods_need_no_rebalancing(clusters, method):
    assert clusters[method].raw_sizes == [HW] * N
    assert clusters[method].n_moved == 0


def test_unbalanced_methods_report_their_own_sizes(clusters):
    # On random (unclustered) keys the free methods do not come out equal-size by
    # chance; the raw sizes must show it rather than echo the rebalanced h.
    assert any(clusters[m].raw_sizes != [HW] * N for m in ("kmeans", "agglomerative", "spectral"))


# The planted clusters are disconnected in the k-NN graph, which sklearn warns about.
@pytest.mark.filterwarnings("ignore:Graph is not fully connected")
@pytest.mark.parametrize("method", ["balanced_kmeans", "kmeans", "agglomerative", "spectral"])
def test_planted_clusters_are_recovered_from_normalized_keys(method):
    W1, truth = planted_w1()
    r = cluster_neurons(W1, N, method, seed=0, **FAST.get(method, {}))
    for e in range(N):  # each expert is exactly one planted cluster
        assert truth[r.groups[e]].unique().numel() == 1
    assert r.raw_sizes == [HW] * N and r.n_moved == 0


def test_random_partition_ignores_structure():
    W1, truth = planted_w1()
    r = cluster_neurons(W1, N, "random", seed=0)
    assert any(truth[r.groups[e]].unique().numel() > 1 for e in range(N))


@pytest.mark.parametrize("method", METHODS)
def test_sum_of_experts_is_the_dense_ffn(ffn, clusters, method):
    W1, b1, W2, b2 = ffn
    res = experts_from_dense(W1, b1, W2, b2, N, clusters=clusters[method], top_k=N)
    assert res.w1.shape == (N, HW, D) and res.b1.shape == (N, HW)
    assert res.w2.shape == (N, D, HW) and res.b2.shape == (N, D) and res.keys.shape == (N, D)
    torch.testing.assert_close(res.b2, (b2 / N).expand(N, D))  # b2 / k, here k = N
    x = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = dense_forward(x, W1, b1, W2, b2)

    direct = sum(F.gelu(x @ res.w1[e].T + res.b1[e], approximate="none") @ res.w2[e].T + res.b2[e] for e in range(N))
    torch.testing.assert_close(direct, want, rtol=1e-12, atol=1e-12)

    idx = torch.arange(N).expand(x.shape[0], N).contiguous()  # k = N: every expert
    gates = torch.ones(x.shape[0], N, dtype=torch.float64)
    via_op = ops.experts(x, idx, gates, res.w1, res.b1, res.w2, res.b2)
    torch.testing.assert_close(via_op, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["balanced_kmeans", "agglomerative"])
def test_keys_are_raw_cluster_means_and_bias_is_b2_over_k(ffn, clusters, method):
    """EMoE's gate vector: the mean of the cluster's raw W1 rows; each expert carries b2 / k."""
    W1, b1, W2, b2 = ffn
    res = experts_from_dense(W1, b1, W2, b2, N, clusters=clusters[method], top_k=2)
    for e in range(N):
        torch.testing.assert_close(res.keys[e], W1[res.groups[e]].mean(0))
    assert res.keys.dtype == W1.dtype and res.top_k == 2
    torch.testing.assert_close(res.b2, (b2 / 2).expand(N, D))


def test_experts_from_dense_clusters_itself_like_cluster_neurons(ffn):
    W1, b1, W2, b2 = ffn
    res = experts_from_dense(W1, b1, W2, b2, N, method="random", seed=3, top_k=2)
    r = cluster_neurons(W1, N, "random", seed=3)
    assert torch.equal(res.groups, r.groups) and res.method == "random" and res.raw_sizes == r.raw_sizes
    torch.testing.assert_close(res.w1, W1[r.groups])
    torch.testing.assert_close(res.w2, W2[:, r.groups].permute(1, 0, 2))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_for_a_seed(ffn, clusters, method):
    again = cluster_neurons(ffn[0], N, method, seed=0, **FAST.get(method, {}))
    assert torch.equal(again.groups, clusters[method].groups)
    assert again.raw_sizes == clusters[method].raw_sizes


def test_random_partition_depends_on_seed(ffn):
    a = cluster_neurons(ffn[0], N, "random", seed=0).groups
    b = cluster_neurons(ffn[0], N, "random", seed=1).groups
    assert not torch.equal(a, b)


def test_single_expert_holds_everything(ffn):
    for method in METHODS:
        r = cluster_neurons(ffn[0], 1, method)
        assert torch.equal(r.groups, torch.arange(H).unsqueeze(0)) and r.raw_sizes == [H]


def test_normalized_keys_scale_free():
    W1 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    X = normalized_keys(W1)
    np.testing.assert_allclose(X, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])


# --------------------------------------------------------------- rebalancing
def test_rebalance_keeps_closest_and_moves_surplus_to_nearest_with_room():
    # 3 clusters of width 2. Cluster 0 has 4 members: 0, 1 near (1, 0); 2 near
    # cluster 1's centroid; 3 near cluster 2's. Clusters 1, 2 have one each.
    X = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 0.6], [-0.6, -0.5], [0.0, 1.0], [-1.0, -1.0]])
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 0, 1, 2])
    out, moved = rebalance(X, labels, 3)
    assert moved == 2
    assert out.tolist() == [0, 0, 1, 2, 1, 2]
    assert np.bincount(out).tolist() == [2, 2, 2]


def test_rebalance_is_identity_on_equal_sizes_and_fills_empty_clusters():
    X = np.eye(4)
    out, moved = rebalance(X, np.array([1, 0, 1, 0]), 2)
    assert moved == 0 and out.tolist() == [1, 0, 1, 0]
    out, moved = rebalance(X, np.array([0, 0, 0, 0]), 2)  # cluster 1 empty: no centroid
    assert moved == 2 and np.bincount(out).tolist() == [2, 2]
    with pytest.raises(ValueError, match="labels"):
        rebalance(X, np.array([0, 0, 2, 1]), 2)


# -------------------------------------------------------------------- layer
def test_load_into_layer_gives_dense_ffn_through_the_layer(ffn):
    W1, b1, W2, b2 = ffn
    res = experts_from_dense(W1, b1, W2, b2, N, method="random", top_k=N)
    cfg = SoMELayerConfig(d_model=D, num_experts=N, d_ffn=HW, top_k=N, gating="avg_k")
    layer = SoMELayer(cfg, dtype=torch.float64)
    layer.key_velocity.fill_(1.0)
    assert load_into_layer(layer, res) is layer
    assert torch.equal(layer.w1, res.w1) and torch.equal(layer.w2, res.w2)
    torch.testing.assert_close(layer.keys, F.normalize(res.keys, dim=1))  # cosine scores: the direction
    assert not layer.w1.requires_grad
    assert torch.all(layer.key_velocity == 0)  # velocity of the replaced keys is dropped
    # avg_k (gate 1) with k = N: y = Σ_e E_e(x) = F(x).
    x = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_forward(x, W1, b1, W2, b2))
    dot = SoMELayer(SoMELayerConfig(d_model=D, num_experts=N, d_ffn=HW, top_k=N, score_mode="dot"),
                    dtype=torch.float64)
    assert torch.equal(load_into_layer(dot, res).keys, res.keys)  # dot scores: the raw gate vector
    with pytest.raises(ValueError, match="cut for top_k = 6"):
        load_into_layer(SoMELayer(SoMELayerConfig(d_model=D, num_experts=N, d_ffn=HW, top_k=2)), res)


def test_load_into_layer_casts_to_layer_dtype(ffn):
    res = experts_from_dense(*ffn, N, method="random", top_k=2)
    layer = SoMELayer(SoMELayerConfig(d_model=D, num_experts=N, d_ffn=HW, top_k=2), dtype=torch.float32)
    load_into_layer(layer, res)
    assert layer.w1.dtype == torch.float32 and layer.keys.dtype == torch.float32
    torch.testing.assert_close(layer.w1, res.w1.float())


def test_load_into_layer_shape_mismatch(ffn):
    res = experts_from_dense(*ffn, N, method="random", top_k=2)
    layer = SoMELayer(SoMELayerConfig(d_model=D, num_experts=N, d_ffn=2 * HW, top_k=2), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer\.w1 has shape"):
        load_into_layer(layer, res)
    with pytest.raises(TypeError, match="SoMELayer"):
        load_into_layer(torch.nn.Linear(2, 2), res)


# ------------------------------------------------------------------- errors
def test_errors(ffn):
    W1, b1, W2, b2 = ffn
    with pytest.raises(ValueError, match="multiple of n_experts"):
        cluster_neurons(W1, 5, "random")
    with pytest.raises(ValueError, match="multiple of n_experts"):
        experts_from_dense(W1, b1, W2, b2, 7, top_k=2)
    with pytest.raises(ValueError, match="unknown clustering method 'kmedoids'"):
        cluster_neurons(W1, N, "kmedoids")
    with pytest.raises(ValueError, match="positive int"):
        cluster_neurons(W1, 0, "random")
    with pytest.raises(ValueError, match=r"shape \(H, d\)"):
        cluster_neurons(W1[0], 1, "random")
    with pytest.raises(ValueError, match="NaN"):
        cluster_neurons(torch.full((4, 2), float("nan")), 2, "random")
    with pytest.raises(ValueError, match=r"b1 must be \(96,\)"):
        experts_from_dense(W1, b1[:-1], W2, b2, N, top_k=2)
    with pytest.raises(ValueError, match=r"W2 must be \(16, 96\)"):
        experts_from_dense(W1, b1, W2.T, b2, N, top_k=2)
    with pytest.raises(ValueError, match=r"b2 must be \(16,\)"):
        experts_from_dense(W1, b1, W2, b1, N, top_k=2)
    with pytest.raises(ValueError, match="clusters.groups"):
        experts_from_dense(W1, b1, W2, b2, 3, clusters=cluster_neurons(W1, N, "random"), top_k=2)
    for bad in (0, N + 1, 1.5, True):
        with pytest.raises(ValueError, match="top_k must be an int"):
            experts_from_dense(W1, b1, W2, b2, N, method="random", top_k=bad)
