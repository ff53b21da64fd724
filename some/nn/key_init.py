"""Keys from data (docs/method.md §4.1, ``key_init = data``): k-means centroids of router outputs.

The VQ codebook habit (VQ-VAE, vector-quantize-pytorch's ``kmeans_init``): instead of
random unit vectors, the keys start where the first training batch's queries are, so no
key begins far from every token. Cosine scoring clusters directions (spherical k-means:
unit rows, assignment by the largest dot product, centroids renormalized); dot scoring
clusters the rows as they are (Euclidean k-means).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans_keys"]

KMEANS_ITERATIONS = 20


@torch.no_grad()
def kmeans_keys(rows: Tensor, num_keys: int, generator: torch.Generator, *, cosine: bool,
                iterations: int = KMEANS_ITERATIONS) -> Tensor:
    """``min(num_keys, R)`` centroids ``(n, d)`` of ``rows`` ``(R, d)`` in float64 on the CPU
    (so every device starts from the same keys): k-means++ seeding with ``generator``, then
    Lloyd's iterations; a cluster that loses all its rows keeps its centroid. With
    ``cosine`` the rows and centroids are unit vectors."""
    x = rows.detach().to("cpu", torch.float64)
    if cosine:  # directions: a zero row has none
        norm = x.norm(dim=1, keepdim=True)
        x = x[norm.squeeze(1) > 0] / norm[norm.squeeze(1) > 0]
    # distinct rows only: a repeated row would give two keys in one place, always chosen together
    x = torch.unique(x, dim=0)
    n = min(num_keys, x.shape[0])
    if n == 0:
        return x
    centroids = _kmeans_plus_plus(x, n, generator)
    for _ in range(iterations):
        if cosine:
            assign = (x @ centroids.T).argmax(dim=1)
        else:
            assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n).to(x.dtype).unsqueeze(1)
        new = sums / counts.clamp_min(1)
        if cosine:  # (unit rows that cancel out have no direction: that centroid stays)
            norm = new.norm(dim=1, keepdim=True)
            counts = torch.where(norm > 1e-12, counts, 0)
            new = new / norm.clamp_min(1e-12)
        new = torch.where(counts > 0, new, centroids)
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def _kmeans_plus_plus(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): the first centroid a random row,
    each next one a row drawn with probability proportional to its squared distance to the
    nearest centroid so far (a row already chosen has distance 0 and is not drawn again
    while any other row is left)."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(1, n):
        weights = nearest.clamp_min(0)
        if not bool(weights.sum() > 0):  # every row sits on a centroid: any row not yet chosen
            weights = torch.ones_like(weights)
            weights[chosen] = 0
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, ((x - x[nxt]) ** 2).sum(dim=1))
    return x[chosen].clone()
