"""Configurations of the modules: one SoME layer, and the whole language model.

:class:`SoMELayerConfig` is the one definition of the SoME layer's fields;
:class:`ModelConfig` adds the rest of the architecture (as a transformers
config holds the architecture only). The experiment configuration
(:class:`some.runs.SoMEConfig`) inherits both, so every field here is also a
flat ``--set key=value`` key and a line of a run's ``config.yaml``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..fields import check_choice, check_field_types, check_range, check_size, project, validator
from ..ops.checks import MIN_TEMPERATURE
from ..ops.types import GATINGS, SCORE_MODES

__all__ = ["EXPERT_DTYPES", "EXPERT_INITS", "EXPERT_STORAGES", "FFNS", "KEY_INITS", "ROUTERS", "ROUTING_LEVELS",
           "ModelConfig", "SoMELayerConfig"]

ROUTERS = ("mlp", "linear", "frozen", "random")
ROUTING_LEVELS = ("token", "sequence")
# "default": experts initialized as nn.Linear does, from the seed; "cluster":
# experts cut from a dense FFN after construction (some.construction), which
# replaces the default ones.
EXPERT_INITS = ("default", "cluster")
EXPERT_DTYPES = ("float32", "bfloat16")
# "some": every feed-forward part is a SoME layer; "dense": a trainable dense FFN of width
# dense_width in its place (the controls an MoE result is read against)
FFNS = ("some", "dense")
EXPERT_STORAGES = ("materialized", "procedural")
# "random": unit keys drawn from seed + layer; "data": k-means centroids of the first
# training batch's (centered) router outputs (docs/method.md §4.1, the VQ codebook habit)
KEY_INITS = ("random", "data")


@dataclass
class SoMELayerConfig:
    """Hyper-parameters of one SoME layer (docs/method.md §2-§4; names follow the seed's)."""

    d_model: int = 512  # d
    num_experts: int = 64  # N
    d_ffn: int = 1024  # h, width of each frozen expert
    top_k: int = 4  # k (k_max for top_p / top_any)
    temperature: float = 0.8  # τ, TRAINING_TEMP
    gating: str = "softmax"  # softmax | sigmoid | relu | avg_k | top_p | top_any
    score_mode: str = "cosine"  # cosine | dot
    top_p: float = 0.4  # p of the top_p gating
    router: str = "mlp"  # mlp | linear | frozen | random
    routing_level: str = "token"  # token | sequence
    alpha: float = 0.01  # attraction
    beta: float = 0.005  # peer-pull
    delta: float = 0.001  # repulsion
    theta_percentile: float = 0.05
    ema_decay: float = 0.99  # γ, inertia
    expert_init: str = "default"  # default | cluster (see EXPERT_INITS)
    # materialized: the experts are frozen tensors; procedural: none are
    # stored, the kernels regenerate them from (seed, layer) where used (docs/method.md §9)
    expert_storage: str = "materialized"
    # DynMoE-style adaptive process (docs/method.md §7): every `adaptive_window` key-store
    # updates, experts unused in the window are masked out of routing and, if
    # tokens matched no expert well (best score < adaptive_threshold; for
    # top_any: no expert fired), one expert is added in the first free slot, its
    # key at the normalized sum of those tokens' raw router outputs and its
    # top_any threshold at 0 (DynMoE's add_experts). Capacity is the N
    # preallocated experts; `initial_experts` of them start active (None: all).
    adaptive: bool = False
    adaptive_window: int = 100  # key-store updates per window
    adaptive_threshold: float = 0.0  # a token "matched no expert well" below this best score
    initial_experts: int | None = None  # experts active at the start (None: all N)
    # Dead-expert revival (a research knob, VQ-VAE style; 0 = off): a key that
    # no token selected in the last `revive_after` key-store updates moves to
    # the normalized query of a token routed in the current step (drawn with a
    # generator seeded by seed, layer and step: the same on every rank), with
    # its velocity and usage reset.
    revive_after: int = 0
    # Routing health (docs/method.md §4.1, off in the seed's presets). center_queries: score and
    # update with q − μ, μ a running mean of the real tokens' router outputs (rows routed),
    # updated after every optimizer step from the step's tokens (all micro-batches and
    # ranks; the first step sets it, later ones move it by center_momentum), frozen in eval.
    center_queries: bool = False
    center_momentum: float = 0.1
    # balance_bias: loss-free balancing (DeepSeek-V3): a per-expert bias b added to the scores
    # for choosing the top-k only (gates use the unbiased scores, in training and evaluation),
    # after every optimizer step b_e += balance_rate · sign(mean(c) − c_e) with c the step's
    # selection counts over the active experts (all micro-batches and ranks).
    balance_bias: bool = False
    balance_rate: float = 0.01
    key_init: str = "random"  # random | data (see KEY_INITS)

    @validator
    def validate(self) -> SoMELayerConfig:
        """Check every field; raise :class:`~some.errors.ConfigError` naming the field."""
        check_field_types(self)
        for name in ("d_model", "num_experts", "d_ffn", "top_k", "adaptive_window"):
            check_size(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ConfigError(f"config field top_k = {self.top_k} must be in 1..num_experts = 1..{self.num_experts}")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise ConfigError(f"config field 'temperature' must be a finite number >= {MIN_TEMPERATURE:.4g} "
                              f"(the smallest normal float32), got {self.temperature!r}")
        for name, allowed in (("gating", GATINGS), ("score_mode", SCORE_MODES), ("router", ROUTERS),
                              ("routing_level", ROUTING_LEVELS), ("expert_init", EXPERT_INITS),
                              ("expert_storage", EXPERT_STORAGES)):
            check_choice(name, getattr(self, name), allowed)
        if self.expert_storage == "procedural" and self.expert_init != "default":
            raise ConfigError(f"expert_storage = 'procedural' needs expert_init = 'default' (experts from "
                              f"{self.expert_init!r} come from data, not from the generator, and must be stored)")
        check_range("top_p", self.top_p, 0, 1, lo_open=True)
        # Each rule moves a key by a fraction of a distance between unit vectors:
        # beyond 1 it overshoots, and huge values overflow the store.
        for name in ("alpha", "beta", "delta", "theta_percentile", "ema_decay"):
            check_range(name, getattr(self, name), 0, 1)
        check_range("adaptive_threshold", self.adaptive_threshold)
        check_size("revive_after", self.revive_after, 0)
        check_range("center_momentum", self.center_momentum, 0, 1, lo_open=True)
        check_range("balance_rate", self.balance_rate, 0, lo_open=True)
        check_choice("key_init", self.key_init, KEY_INITS)
        if self.balance_bias and self.gating in ("top_p", "top_any"):
            raise ConfigError(f"balance_bias reorders a top-k: it needs a top-k gating (softmax, sigmoid, relu, "
                              f"avg_k), not gating = {self.gating!r}")
        if self.key_init == "data" and self.expert_init == "cluster":
            raise ConfigError("key_init = 'data' and expert_init = 'cluster' both set the keys: the clustering "
                              "starts each key at its expert's cluster mean; use one of them")
        if self.initial_experts is not None and not self.top_k <= self.initial_experts <= self.num_experts:
            raise ConfigError(f"config field 'initial_experts' must be in top_k..num_experts = "
                              f"{self.top_k}..{self.num_experts}, got {self.initial_experts}")
        return self


@dataclass
class ModelConfig(SoMELayerConfig):
    """The architecture of :class:`some.nn.SoMEForCausalLM` (docs/method.md §2): the SoME
    layer's fields plus the transformer around it. Defaults are the seed's
    reference values (``V = 8192, d = 512, L = 10, 8 heads, 768 tokens``)."""

    vocab_size: int = 8192  # V
    n_layers: int = 10  # L
    n_heads: int = 8
    seq_len: int = 768  # SEQ_LEN: the longest input the model takes
    rope_base: float = 10000.0
    expert_dtype: str = "float32"  # storage dtype of the frozen experts: float32 | bfloat16
    # The feed-forward parts (see FFNS). A dense control of width 2d has the SoME layer's
    # trainable parameters (its router MLP: does the frozen store add anything beyond it?);
    # of width k·h its active FFN FLOPs per token. The SoME layer's fields do not apply to it.
    ffn: str = "some"
    dense_width: int = 0  # hidden width of the dense FFN (ffn = dense)
    # Initialization is a pure function of the seed: SoME layer i's experts (the generator's,
    # any device) and keys (drawn on the CPU from seed + i) are the same on every device; the
    # trainable weights come from torch's generator of the device the model is built on.
    seed: int = 42

    @validator
    def validate(self) -> ModelConfig:
        SoMELayerConfig.validate(self)
        check_size("vocab_size", self.vocab_size, 1, 2**21)
        check_size("n_layers", self.n_layers, 1, 4096)
        check_size("n_heads", self.n_heads)
        check_size("seq_len", self.seq_len, 1, 2**20)
        check_size("seed", self.seed, 0, 2**32 - 1)
        check_range("rope_base", self.rope_base, 0, lo_open=True)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head size d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary)")
        check_choice("expert_dtype", self.expert_dtype, EXPERT_DTYPES)
        check_choice("ffn", self.ffn, FFNS)
        check_size("dense_width", self.dense_width, 0)
        if self.ffn == "dense" and self.expert_init == "cluster":
            raise ConfigError("ffn = 'dense' has no experts to cut from a dense FFN: expert_init = 'cluster' "
                              "applies to ffn = 'some' only")
        if self.ffn == "dense" and self.dense_width < 1:
            raise ConfigError("ffn = 'dense' needs its hidden width: set dense_width (e.g. 2·d_model for the "
                              "router's trainable parameters, top_k·d_ffn for the active FLOPs)")
        return self

    @property
    def decodes_with_cache(self) -> bool:
        """Whether generation can keep a key/value cache: not with sequence-level routing, whose
        pooled query makes every token's experts depend on the whole sequence."""
        return self.ffn == "dense" or self.routing_level == "token"

    def describe(self) -> str:
        """The architecture in one sentence (the report's and the model card's)."""
        shape = (f"V = {self.vocab_size}, d = {self.d_model}, L = {self.n_layers}, {self.n_heads} heads, "
                 f"seq_len = {self.seq_len}")
        if self.ffn == "dense":
            return (f"Dense control decoder LM: {shape}; per layer a trainable dense FFN of width {self.dense_width} "
                    f"in place of the SoME layer (no experts, router or key store).")
        return (f"SoME decoder LM: {shape}; per layer N = {self.num_experts} frozen experts (h = {self.d_ffn}), "
                f"top-{self.top_k} {self.gating} gating (τ = {self.temperature}), {self.router} router at "
                f"{self.routing_level} level.")

    def layer_config(self) -> SoMELayerConfig:
        """The :class:`SoMELayerConfig` of every SoME layer (this config's layer fields)."""
        return project(self, SoMELayerConfig)

    def model_config(self) -> ModelConfig:
        """The architecture alone (e.g. of an experiment configuration that inherits it)."""
        return project(self, ModelConfig)
