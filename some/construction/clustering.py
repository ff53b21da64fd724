"""Experts cut from a dense FFN by clustering its neurons (EMoE / MoEfication),
for the "expert construction" and "pre-trained vs random source" studies of
docs/method.md §7.

A dense FFN ``F(x) = W2 GELU(W1 x + b1) + b2`` (``W1 (H, d)``, ``b1 (H,)``,
``W2 (d, H)``, ``b2 (d,)``, ``H = N·h``) is a sum over its neurons, so any
partition of the ``H`` neurons into ``N`` groups of ``h`` gives ``N`` experts
``E_e(x) = W2[:, g_e] GELU(W1[g_e] x + b1[g_e]) + b2 / k``. As in EMoE's code
(qiuzh20/EMoE, ``Language/moe_utils.py``), each expert carries ``b2 / k`` for
a layer that selects ``k`` experts with gate 1 (``avg_k`` gating): the ``k``
selected experts add ``b2`` once, and with ``k = N`` the layer is the dense FFN
exactly.

Which neurons go together: we cluster the neurons' *key vectors*, the rows of
``W1`` L2-normalized. In the key-value-memory view of an FFN (Geva et al.
2021) row ``i`` of ``W1`` is the pattern that neuron ``i`` detects; neurons
with similar keys fire on similar inputs, so grouping them gives experts that
are each "about" one region of input space. This is the MoEfication (Zhang et
al. 2022) / EMoE (Qiu et al. 2024) choice; normalizing first makes the
clustering about direction, not the scale of a neuron's weights. The expert's
key is EMoE's gate vector, the mean of its neurons' *raw* ``W1`` rows, so a
``dot`` score is the mean pre-activation of the expert's neurons; a layer that
scores by cosine takes its direction (:func:`load_into_layer`).

Methods (``METHODS``):

- ``balanced_kmeans`` (default): k-means with every cluster of size exactly
  ``h`` (the ``k-means-constrained`` package, a min-cost-flow assignment step
  inside Lloyd's iterations) — the EMoE/MoEfication default.
- ``kmeans``: scikit-learn ``KMeans``.
- ``agglomerative``: scikit-learn ``AgglomerativeClustering`` (Ward).
- ``spectral``: scikit-learn ``SpectralClustering`` on a 10-nearest-neighbour
  graph (sparse; the dense RBF affinity would need an ``H x H`` matrix), with
  ``assign_labels="cluster_qr"`` (no random restarts, several times faster than
  k-means on the embedding, and it came out more balanced in our trials).
- ``random``: a seeded random equal-size partition (the control).

Unbalanced methods give clusters of different sizes, but a SoME layer needs
``N`` experts of equal width ``h``. They are rebalanced deterministically
(:func:`rebalance`): a cluster that is too big keeps its ``h`` neurons closest
to its centroid and gives up the rest; the given-up neurons are placed by
taking (neuron, cluster-with-room) pairs in increasing distance from the
neuron to the cluster's centroid. The number of moved neurons,
``Σ_c max(0, size_c − h)``, is the least any equal-size partition needs, and
no neuron of a cluster that was not too big moves. The method's own sizes are
kept in ``raw_sizes`` (and the number moved in ``n_moved``) so a study can
show how unbalanced the method was.

Scale notes (times on 2 CPU cores, random ``W1`` with ``H = 8192``, ``d = 512``,
``N = 64``): ``balanced_kmeans`` with ``n_init=1, max_iter=20`` 22 s (it solves
a min-cost flow with ``H·N`` arcs per iteration; the default ``n_init=10,
max_iter=300`` can be far slower — bound it through ``method_kwargs``);
``kmeans`` ``n_init=1`` 6 s; ``agglomerative`` 15 s but ``O(H²)`` memory (34 GB
at the reference ``H = 65536``); ``spectral`` 208 s (ARPACK eigenvectors;
``eigen_solver="amg"`` with ``pyamg`` installed is the usual remedy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

METHODS = ("balanced_kmeans", "kmeans", "agglomerative", "spectral", "random")
# Methods whose clusters are equal-size by construction (rebalancing is a no-op).
BALANCED_METHODS = ("balanced_kmeans", "random")


@dataclass(frozen=True)
class ClusterResult:
    """A partition of ``H`` neurons into ``N`` equal-size experts.

    Attributes:
        assignment: ``(H,)`` int64, the expert of each neuron.
        groups: ``(N, h)`` int64, the neuron ids of each expert, ascending;
            experts are ordered by their smallest neuron id (a canonical order,
            independent of the arbitrary label numbering of the method).
        raw_sizes: the size of the method's cluster that became expert ``e``,
            before rebalancing (all ``h`` for balanced methods; sums to ``H``).
        method: the clustering method used.
        n_moved: neurons moved out of their method-assigned cluster by rebalancing.
    """

    assignment: Tensor
    groups: Tensor
    raw_sizes: list[int]
    method: str
    n_moved: int


@dataclass(frozen=True)
class ExpertsFromDense:
    """Experts cut from a dense FFN, in the layout of :class:`some.SoMELayer`.

    ``w1 (N, h, d)``, ``b1 (N, h)``, ``w2 (N, d, h)``, ``b2 (N, d)`` (each
    ``b2 / top_k``), ``keys (N, d)`` the mean raw ``W1`` row of each expert's
    neurons (EMoE's gate vectors, not normalized), ``top_k``, plus the partition
    (``groups``, ``raw_sizes``, ``method``, ``n_moved``; see
    :class:`ClusterResult`). Tensors have the dense FFN's dtype and device.
    """

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    keys: Tensor
    top_k: int
    groups: Tensor
    raw_sizes: list[int]
    method: str
    n_moved: int


# ----------------------------------------------------------------- helpers
def _check_n_experts(H: int, n_experts: Any) -> int:
    if isinstance(n_experts, bool) or not isinstance(n_experts, (int, np.integer)) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
    n_experts = int(n_experts)
    if H % n_experts != 0:
        raise ValueError(
            f"the dense FFN has H = {H} neurons, which do not split into n_experts = {n_experts} "
            f"experts of equal width (H must be a multiple of n_experts)"
        )
    return n_experts


def _check_w1(W1: Any) -> Tensor:
    if not isinstance(W1, Tensor):
        raise TypeError(f"W1 must be a torch.Tensor of shape (H, d), got {type(W1).__name__}")
    if W1.dim() != 2 or W1.shape[0] < 1 or W1.shape[1] < 1:
        raise ValueError(f"W1 must have shape (H, d) with H, d >= 1, got {tuple(W1.shape)}")
    if not W1.is_floating_point():
        raise ValueError(f"W1 must be a floating-point tensor, got {W1.dtype}")
    if not bool(torch.isfinite(W1).all()):
        raise ValueError("W1 contains NaN or Inf; cannot cluster its neurons")
    return W1


def normalized_keys(W1: Tensor) -> np.ndarray:
    """The neurons' key vectors: rows of ``W1`` L2-normalized, float64 numpy
    ``(H, d)``. An all-zero row stays zero (it has no direction)."""
    X = _check_w1(W1).detach().to("cpu", torch.float64).numpy()
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def _cluster_means(X: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster mean of the rows of ``X`` (NaN rows for empty clusters) and sizes."""
    sizes = np.bincount(labels, minlength=n)
    sums = np.zeros((n, X.shape[1]))
    np.add.at(sums, labels, X)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / sizes[:, None]
    return means, sizes


def _raw_labels(X: np.ndarray, n: int, method: str, seed: int, method_kwargs: dict) -> np.ndarray:
    """The method's own cluster label (0..n-1) of each neuron."""
    H = X.shape[0]
    h = H // n
    if n == 1:  # one expert holds everything (and SpectralClustering rejects n_clusters=1)
        return np.zeros(H, dtype=np.int64)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(H, generator=gen).numpy()
        labels = np.empty(H, dtype=np.int64)
        labels[perm] = np.arange(H) // h  # consecutive slices of the permutation
        return labels
    if method == "balanced_kmeans":
        try:
            from k_means_constrained import KMeansConstrained
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "method 'balanced_kmeans' needs the 'k-means-constrained' package "
                "(pip install k-means-constrained)"
            ) from e
        model = KMeansConstrained(n_clusters=n, size_min=h, size_max=h, random_state=seed, **method_kwargs)
        return np.asarray(model.fit_predict(X), dtype=np.int64)
    if method == "kmeans":
        from sklearn.cluster import KMeans

        kw = {"n_init": 10, **method_kwargs}  # explicit: sklearn's default changed across versions
        return np.asarray(KMeans(n_clusters=n, random_state=seed, **kw).fit_predict(X), dtype=np.int64)
    if method == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        kw = {"linkage": "ward", **method_kwargs}  # deterministic, no seed needed
        return np.asarray(AgglomerativeClustering(n_clusters=n, **kw).fit_predict(X), dtype=np.int64)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        kw = {"affinity": "nearest_neighbors", "n_neighbors": min(10, H - 1), "assign_labels": "cluster_qr",
              **method_kwargs}
        return np.asarray(SpectralClustering(n_clusters=n, random_state=seed, **kw).fit_predict(X), dtype=np.int64)
    raise ValueError(f"unknown clustering method {method!r}; expected one of {METHODS}")


def rebalance(X: np.ndarray, labels: np.ndarray, n_experts: int) -> tuple[np.ndarray, int]:
    """Make a clustering equal-size (``h = H / n_experts`` each), moving as few
    neurons as possible; deterministic.

    1. Every cluster larger than ``h`` keeps the ``h`` members closest to its
       centroid (mean of its members' rows of ``X``; ties: lower neuron id
       stays) and gives up the rest.
    2. The given-up neurons are placed greedily: (neuron, cluster with room)
       pairs in increasing Euclidean distance to the cluster's centroid (ties:
       lower neuron id, then lower cluster id); a pair is taken when the neuron
       is unplaced and the cluster still has room. Empty clusters have no
       centroid and are filled last, in neuron-id order.

    Returns ``(labels, n_moved)``.
    """
    H = X.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (H,) or (labels.size and (labels.min() < 0 or labels.max() >= n_experts)):
        raise ValueError(f"labels must have shape ({H},) with values in 0..{n_experts - 1}")
    h = H // n_experts
    means, sizes = _cluster_means(X, labels, n_experts)
    if np.all(sizes == h):
        return labels.copy(), 0

    out = labels.copy()
    excess: list[np.ndarray] = []
    for c in np.flatnonzero(sizes > h):
        members = np.flatnonzero(labels == c)
        dist = np.linalg.norm(X[members] - means[c], axis=1)
        order = np.lexsort((members, dist))  # closest first, ties by neuron id
        excess.append(members[order[h:]])
    moved = np.sort(np.concatenate(excess))
    room = np.maximum(h - sizes, 0)
    targets = np.flatnonzero(room > 0)

    # Distance of each moved neuron to each cluster with room; empty clusters
    # (NaN centroid) get +inf so they are used only when nothing else has room.
    from scipy.spatial.distance import cdist

    dist = cdist(X[moved], means[targets])  # (moved, targets), no (moved, targets, d) temporary
    dist = np.where(np.isnan(dist), np.inf, dist)
    ni, ci = np.meshgrid(np.arange(len(moved)), np.arange(len(targets)), indexing="ij")
    order = np.lexsort((ci.ravel(), ni.ravel(), dist.ravel()))
    placed = np.zeros(len(moved), dtype=bool)
    left = room[targets].copy()
    remaining = len(moved)
    for flat in order:
        i, j = divmod(int(flat), len(targets))
        if placed[i] or left[j] == 0:
            continue
        out[moved[i]] = targets[j]
        placed[i] = True
        left[j] -= 1
        remaining -= 1
        if remaining == 0:
            break
    return out, len(moved)


# --------------------------------------------------------------------- API
def cluster_neurons(W1: Tensor, n_experts: int, method: str = "balanced_kmeans", seed: int = 0,
                    **method_kwargs: Any) -> ClusterResult:
    """Partition the ``H`` neurons of a dense FFN (rows of ``W1 (H, d)``) into
    ``n_experts`` equal-size groups by clustering their normalized key vectors.

    ``method`` is one of :data:`METHODS`; ``seed`` makes every method
    deterministic; ``method_kwargs`` go to the underlying estimator (e.g.
    ``n_init``, ``max_iter`` for the k-means methods). See the module doc for
    the rebalancing of unbalanced methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; expected one of {METHODS}")
    if method == "random" and method_kwargs:
        raise ValueError(f"method 'random' takes no method_kwargs, got {sorted(method_kwargs)}")
    W1 = _check_w1(W1)
    H = W1.shape[0]
    n = _check_n_experts(H, n_experts)
    X = normalized_keys(W1)

    raw = _raw_labels(X, n, method, int(seed), method_kwargs)
    raw_sizes_by_label = np.bincount(raw, minlength=n)
    labels, n_moved = rebalance(X, raw, n)

    # Canonical expert order: by smallest neuron id (labels are arbitrary ids).
    first = np.full(n, H, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(H))
    label_order = np.argsort(first, kind="stable")  # new expert e <- label label_order[e]
    new_id = np.empty(n, dtype=np.int64)
    new_id[label_order] = np.arange(n)
    assignment = new_id[labels]
    groups = np.argsort(assignment, kind="stable").reshape(n, H // n)  # ascending ids within each expert

    return ClusterResult(
        assignment=torch.from_numpy(assignment),
        groups=torch.from_numpy(np.ascontiguousarray(groups)),
        raw_sizes=[int(s) for s in raw_sizes_by_label[label_order]],
        method=method,
        n_moved=int(n_moved),
    )


def _check_dense(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor) -> None:
    for name, t in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_w1(W1)
    H, d = W1.shape
    want = {"b1": (H,), "W2": (d, H), "b2": (d,)}
    for name, t in (("b1", b1), ("W2", W2), ("b2", b2)):
        if tuple(t.shape) != want[name]:
            raise ValueError(
                f"dense FFN shape mismatch: W1 is {tuple(W1.shape)} (H, d), so {name} must be "
                f"{want[name]}, got {tuple(t.shape)}"
            )
    for name, t in (("b1", b1), ("W2", W2), ("b2", b2)):
        if t.device != W1.device:
            raise ValueError(f"{name} is on {t.device} but W1 is on {W1.device}")


def experts_from_dense(W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, n_experts: int,
                       method: str = "balanced_kmeans", seed: int = 0,
                       clusters: ClusterResult | None = None, *, top_k: int, **method_kwargs: Any) -> ExpertsFromDense:
    """Cut the dense FFN ``W2 GELU(W1 x + b1) + b2`` into ``n_experts`` experts
    for a layer that selects ``top_k`` of them per token (EMoE's construction).

    Expert ``e`` holds the neurons ``g = groups[e]``: ``w1[e] = W1[g]``,
    ``b1[e] = b1[g]``, ``w2[e] = W2[:, g]``, ``b2[e] = b2 / top_k``, so that
    the ``top_k`` experts a token selects with gate 1 add ``b2`` once, and with
    ``top_k = N`` they sum to ``F(x)`` exactly. ``keys[e]`` is the mean of the
    raw ``W1`` rows of ``g`` (EMoE's gate vector). Pass ``clusters`` to reuse a
    partition (then ``method``/``seed`` are not used).
    """
    _check_dense(W1, b1, W2, b2)
    H = W1.shape[0]
    n = _check_n_experts(H, n_experts)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n:
        raise ValueError(f"experts_from_dense: top_k must be an int in 1..{n} (the experts a token selects), "
                         f"got {top_k!r}")
    if clusters is None:
        clusters = cluster_neurons(W1, n, method, seed, **method_kwargs)
    elif tuple(clusters.groups.shape) != (n, H // n):
        raise ValueError(f"clusters.groups has shape {tuple(clusters.groups.shape)}, expected {(n, H // n)}")

    with torch.no_grad():
        g = clusters.groups.to(W1.device)
        w1 = W1.detach()[g].clone()  # (N, h, d)
        eb1 = b1.detach()[g].clone()  # (N, h)
        w2 = W2.detach()[:, g].permute(1, 0, 2).contiguous()  # (d, N, h) -> (N, d, h)
        eb2 = (b2.detach() / top_k).unsqueeze(0).expand(n, -1).contiguous()  # (N, d)
        keys = w1.mean(dim=1)  # (N, d): the mean raw W1 row of each expert's neurons

    return ExpertsFromDense(w1=w1, b1=eb1, w2=w2, b2=eb2, keys=keys, top_k=top_k, groups=clusters.groups,
                            raw_sizes=list(clusters.raw_sizes), method=clusters.method, n_moved=clusters.n_moved)


@torch.no_grad()
def load_into_layer(layer: torch.nn.Module, result: ExpertsFromDense) -> torch.nn.Module:
    """Copy the experts and keys of ``result`` into a :class:`some.SoMELayer`
    (in the layer's own dtypes and device; the layer saves them from then on,
    since no generator makes them) and reset its key velocity and usage EMA,
    which belong to the keys being replaced. A layer that scores by cosine
    takes each key's direction (a key of zero length, whose neurons' rows
    cancel, takes the first basis vector). Returns the layer."""
    if not hasattr(layer, "set_experts") or not hasattr(layer, "keys"):
        raise TypeError(f"load_into_layer: {type(layer).__name__} is not a SoMELayer")
    if tuple(layer.keys.shape) != tuple(result.keys.shape):
        raise ValueError(
            f"load_into_layer: layer.keys has shape {tuple(layer.keys.shape)} but the constructed experts' "
            f"keys are {tuple(result.keys.shape)} (check num_experts, d_ffn and d_model against the dense FFN)"
        )
    if layer.config.top_k != result.top_k:
        raise ValueError(f"load_into_layer: the experts were cut for top_k = {result.top_k} (each carries "
                         f"b2 / {result.top_k}) but the layer selects top_k = {layer.config.top_k}")
    try:
        layer.set_experts(result.w1, result.b1, result.w2, result.b2)
    except ValueError as e:
        raise ValueError(f"load_into_layer: {e} (check num_experts, d_ffn and d_model against the "
                         f"dense FFN)") from None
    keys = result.keys.to(device=layer.keys.device, dtype=layer.keys.dtype)
    if layer.config.score_mode == "cosine":
        norms = keys.norm(dim=1, keepdim=True)
        basis = torch.zeros_like(keys[:1])
        basis[0, 0] = 1
        keys = torch.where(norms > 1e-12, keys / norms.clamp_min(1e-12), basis)
    layer.keys.copy_(keys)
    for name in ("key_velocity", "key_usage"):
        buf = getattr(layer, name, None)
        if isinstance(buf, Tensor):
            buf.zero_()
    return layer


__all__ = [
    "BALANCED_METHODS",
    "METHODS",
    "ClusterResult",
    "ExpertsFromDense",
    "cluster_neurons",
    "experts_from_dense",
    "load_into_layer",
    "normalized_keys",
    "rebalance",
]
