"""Experts cut from a dense FFN (docs/method.md §7: the expert-construction and
pre-trained-vs-random studies): clustering of the FFN's neurons, the dense
pre-training, and loading the experts into SoME layers."""
from .clustering import (
    BALANCED_METHODS,
    METHODS,
    ClusterResult,
    ExpertsFromDense,
    cluster_neurons,
    experts_from_dense,
    load_into_layer,
    normalized_keys,
    rebalance,
)
from .config import DENSE_SOURCES, DENSE_TRANSFERS, ConstructionConfig
from .dense import (
    TRANSFERRED,
    dense_cache_path,
    init_experts_from_dense,
    load_or_pretrain_dense,
    pretrain_dense,
    random_dense_ffn,
)

__all__ = [
    "BALANCED_METHODS",
    "DENSE_SOURCES",
    "DENSE_TRANSFERS",
    "METHODS",
    "TRANSFERRED",
    "ClusterResult",
    "ConstructionConfig",
    "ExpertsFromDense",
    "cluster_neurons",
    "dense_cache_path",
    "experts_from_dense",
    "init_experts_from_dense",
    "load_into_layer",
    "load_or_pretrain_dense",
    "normalized_keys",
    "pretrain_dense",
    "random_dense_ffn",
    "rebalance",
]
