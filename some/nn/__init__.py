"""Modules: the SoME layer, the transformer around it, and their configurations.

    SoMELayer(SoMELayerConfig(d_model=512, num_experts=64, d_ffn=1024))   # router + key store + experts
    SoMEForCausalLM(ModelConfig(num_experts=64))                          # docs/method.md §2
"""
from .attention import CausalSelfAttention, RotaryEmbedding
from .config import EXPERT_INITS, ROUTERS, ROUTING_LEVELS, ModelConfig, SoMELayerConfig
from .layer import SoMELayer
from .model import (
    Block,
    CausalLM,
    CausalLMOutput,
    DenseFFN,
    DenseLM,
    SoMEForCausalLM,
    format_parameter_counts,
    lm_loss,
    seeded,
)
from .revision import METHODS_REVISION, warn_if_methods_changed

__all__ = [
    "EXPERT_INITS",
    "METHODS_REVISION",
    "ROUTERS",
    "ROUTING_LEVELS",
    "Block",
    "CausalLM",
    "CausalLMOutput",
    "CausalSelfAttention",
    "DenseFFN",
    "DenseLM",
    "ModelConfig",
    "RotaryEmbedding",
    "SoMEForCausalLM",
    "SoMELayer",
    "SoMELayerConfig",
    "format_parameter_counts",
    "lm_loss",
    "seeded",
    "warn_if_methods_changed",
]
