"""How experts are constructed from a dense FFN (docs/method.md §7): the fields of expert init ``cluster``."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..fields import check_choice, check_field_types, validator
from .clustering import METHODS

__all__ = ["DENSE_SOURCES", "DENSE_TRANSFERS", "ConstructionConfig"]

DENSE_SOURCES = ("random", "pretrained")
DENSE_TRANSFERS = ("all", "ffn")


@dataclass
class ConstructionConfig:
    """Used when ``expert_init = "cluster"``: experts cut from a dense FFN of
    width N·h by clustering its neurons (``cluster_method``), keys at each
    cluster's mean raw ``W1`` row and bias ``b2 / top_k`` per expert (EMoE's
    construction). The dense FFN is ``dense_source``:
    ``random`` (freshly initialized) or ``pretrained`` (a dense LM trained first
    on the same data for ``dense_pretrain_epochs``; with ``dense_transfer`` =
    ``all`` the SoME model also takes its embedding, attention, LayerNorms and
    LM head, ``ffn``: only the experts and keys). The router is never taken
    from the dense model."""

    cluster_method: str = "balanced_kmeans"  # some.construction.METHODS
    cluster_n_init: int = 1  # k-means restarts (kmeans, balanced_kmeans only)
    cluster_max_iter: int = 100  # Lloyd iterations (kmeans, balanced_kmeans only): their cost at H = N·h
    dense_source: str = "random"  # random | pretrained
    dense_pretrain_epochs: int = 1
    dense_grad_accum: int = 1  # micro-batches per dense step (its FFN activations are N times wider)
    dense_transfer: str = "all"  # all | ffn (with dense_source = pretrained)

    @validator
    def validate(self) -> ConstructionConfig:
        check_field_types(self)
        for name in ("cluster_n_init", "cluster_max_iter", "dense_pretrain_epochs", "dense_grad_accum"):
            value = getattr(self, name)
            if not 1 <= value <= 1_000_000:
                raise ConfigError(f"config field '{name}' must be {'>= 1' if value < 1 else '<= 1000000'}, got {value}")
        for name, allowed in (("cluster_method", METHODS), ("dense_source", DENSE_SOURCES),
                              ("dense_transfer", DENSE_TRANSFERS)):
            check_choice(name, getattr(self, name), allowed)
        return self
