"""What a run or a study measures: usage metrics, FLOPs, latency, memory,
specialization, statistics across variants, and the pictures."""
from .measure import (
    RoutingPass,
    analytic_flops_per_token,
    count_flops,
    current_rss_mb,
    inference_latency,
    memory_kind,
    peak_memory_mb,
    routing_pass,
    token_batch,
)
from .metrics import (
    ExpertsUsed,
    as_counts,
    entropy_bits,
    experts_used,
    format_experts_used,
    gini,
    max_entropy_bits,
    usage_counts,
    usage_summary,
)
from .specialization import TOKEN_CLASSES, mutual_information_bits, specialization, token_classes
from .stats import FriedmanResult, friedman

__all__ = [
    "TOKEN_CLASSES",
    "ExpertsUsed",
    "FriedmanResult",
    "RoutingPass",
    "analytic_flops_per_token",
    "as_counts",
    "count_flops",
    "current_rss_mb",
    "entropy_bits",
    "experts_used",
    "format_experts_used",
    "friedman",
    "gini",
    "inference_latency",
    "max_entropy_bits",
    "memory_kind",
    "mutual_information_bits",
    "peak_memory_mb",
    "routing_pass",
    "specialization",
    "token_batch",
    "token_classes",
    "usage_counts",
    "usage_summary",
]
