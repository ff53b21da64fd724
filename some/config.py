"""One flat dataclass for a SoME experiment: model, key store, training, data.

Flat on purpose: every field is one ``--set key=value`` away, one line of
``config.yaml``, and one column of a study's comparison table.

    cfg = get_preset("A4")                         # the reference run, N = 64
    cfg = apply_overrides(cfg, ["num_experts=128", "epochs=2"])
    cfg.save_yaml("runs/x/config.yaml"); SoMEConfig.load_yaml("runs/x/config.yaml")
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

__all__ = ["PRESETS", "ConfigError", "SoMEConfig", "apply_overrides", "get_preset", "parse_value"]


EXPERT_INITS = ("default", "cluster")
DENSE_SOURCES = ("random", "pretrained")
DENSE_TRANSFERS = ("all", "ffn")


class ConfigError(ValueError):
    """A user error in a configuration: unknown key or preset, bad value."""


@dataclass
class SoMEConfig:
    # ---- model (SPEC §2); defaults are the seed's reference values
    vocab_size: int = 8192  # V
    d_model: int = 512  # d
    n_layers: int = 10  # L
    n_heads: int = 8
    seq_len: int = 768  # SEQ_LEN: documents are truncated/padded to this
    rope_base: float = 10000.0
    # ---- SoME layer (SPEC §2-§4)
    num_experts: int = 64  # N
    d_ffn: int = 1024  # h, width of each frozen expert
    top_k: int = 4  # k
    temperature: float = 0.8  # τ, TRAINING_TEMP
    gating: str = "softmax"  # softmax | sigmoid | relu | avg_k | top_p | top_any
    score_mode: str = "cosine"  # cosine | dot
    top_p: float = 0.4  # p of the top_p gating
    router: str = "mlp"  # mlp | linear | frozen | random
    routing_level: str = "token"  # token | sequence
    # Expert construction (SPEC §7, some.dense): "default" = independently
    # initialized experts and random keys; "cluster" = experts cut from a dense
    # FFN of width N·h by clustering its neurons (cluster_method), keys at each
    # cluster's mean normalized key. The dense FFN is dense_source: "random"
    # (freshly initialized) or "pretrained" (a dense LM trained first on the same
    # data for dense_pretrain_epochs; with dense_transfer "all" the SoME model
    # also takes its embedding, attention, LayerNorms and LM head, "ffn": only
    # the experts and keys). The router is never taken from the dense model.
    expert_init: str = "default"  # default | cluster
    cluster_method: str = "balanced_kmeans"  # some.construction.METHODS
    cluster_n_init: int = 1  # k-means restarts (kmeans, balanced_kmeans only)
    cluster_max_iter: int = 100  # Lloyd iterations (kmeans, balanced_kmeans only): their cost at H = N·h
    dense_source: str = "random"  # random | pretrained
    dense_pretrain_epochs: int = 1
    dense_grad_accum: int = 1  # micro-batches per dense step (its FFN activations are N times wider)
    dense_transfer: str = "all"  # all | ffn (with dense_source = pretrained)
    expert_dtype: str = "float32"  # storage dtype of the frozen experts: float32 | bfloat16
    alpha: float = 0.01  # attraction
    beta: float = 0.005  # peer-pull
    delta: float = 0.001  # repulsion
    theta_percentile: float = 0.05
    ema_decay: float = 0.99  # γ, inertia
    # DynMoE-style adaptive process (SPEC §7), see some.layer.SoMELayerConfig
    adaptive: bool = False
    adaptive_window: int = 100  # key-store updates per window
    adaptive_threshold: float = 0.0  # a token "matched no expert well" below this best score
    initial_experts: int | None = None  # experts active at the start (None: all N)
    # ---- training (SPEC §6)
    epochs: int = 4
    batch_size: int = 32  # sequences per optimizer step (all micro-batches together)
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 6e-4  # peak LR, after linear warmup, then cosine decay
    min_learning_rate: float = 6e-5  # LR at the end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings only
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 42
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at epoch ends
    # ---- data (some.data.DataConfig)
    data_source: str = "tinystories"  # fortunes | bible | tinystories | synthetic | files:PATH
    ood_source: str | None = None  # held-out corpus of another domain (OOD perplexity)
    train_subset_size: int = 10000  # training documents
    val_subset_size: int = 2000  # validation documents
    packed: bool = False  # concatenate documents instead of one padded document per sample
    cache_dir: str | None = None  # tokenizer/data cache; None = the data module's default
    # ---- data parallel (torchrun): seconds a collective may wait for the
    # other ranks before the run stops with an error (a dead rank never hangs it)
    dist_timeout: float = 600.0
    # ---- debugging hooks (tests): 0 / False = off
    debug_nan_step: int = 0  # make the loss NaN at this optimizer step (1-based)
    debug_state_digest: bool = False  # write digest.rank{R}.jsonl: key-store/parameter digests per step
    debug_stop_after_step: int = 0  # stop (error) after this step's checkpoint, like a preempted job
    debug_die_at_step: int = 0  # the rank debug_die_rank exits abruptly at this step (peer-loss tests)
    debug_die_rank: int = 0

    # ------------------------------------------------------------ validation
    def validate(self) -> SoMEConfig:
        """Check every field's value; raise :class:`ConfigError` naming the field."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                raise ConfigError(f"config field '{f.name}' must be {_type_name(hints[f.name])}, got {value!r}")
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "num_experts", "d_ffn", "top_k",
                    "epochs", "batch_size", "grad_accum", "train_subset_size", "val_subset_size",
                    "cluster_n_init", "cluster_max_iter", "dense_pretrain_epochs", "dense_grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "debug_nan_step", "debug_stop_after_step",
                     "debug_die_at_step", "debug_die_rank", "weight_decay", "grad_clip",
                     "alpha", "beta", "delta", "min_learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "rope_base"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"config field '{name}' must be a positive number, got {value}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head size d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary)")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ConfigError(f"config field 'dist_timeout' must be a positive number of seconds, got {self.dist_timeout}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size = {self.batch_size} must be divisible by grad_accum = {self.grad_accum}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError(f"adam betas must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        from .construction import METHODS

        for name, allowed in (("expert_init", EXPERT_INITS), ("cluster_method", METHODS),
                              ("dense_source", DENSE_SOURCES), ("dense_transfer", DENSE_TRANSFERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}; expected one of {allowed}")
        if self.dense_source == "pretrained" and self.expert_init != "cluster":
            raise ConfigError("dense_source = 'pretrained' needs expert_init = 'cluster' (the experts are cut "
                              "from the dense model's FFNs)")
        if self.batch_size % self.dense_grad_accum:
            raise ConfigError(f"batch_size = {self.batch_size} must be divisible by "
                              f"dense_grad_accum = {self.dense_grad_accum}")
        if self.expert_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"config field 'expert_dtype' must be 'float32' or 'bfloat16', got {self.expert_dtype!r}")
        try:  # the layer knows its own rules (choices of gating, router, ...)
            self.layer_config().validate()
        except ValueError as e:
            raise ConfigError(str(e).replace("SoMELayerConfig.", "config field ")) from None
        return self

    # ------------------------------------------------------------- sub-configs
    def layer_config(self):
        """The :class:`some.layer.SoMELayerConfig` of every SoME layer (the
        fields both have; tests check that every layer field has one here)."""
        from .layer import SoMELayerConfig

        names = {f.name for f in dataclasses.fields(SoMELayerConfig)} & {f.name for f in dataclasses.fields(self)}
        kwargs = {n: getattr(self, n) for n in names}
        # "cluster" experts are the layer's default ones replaced after construction
        # (some.dense.init_experts_from_dense, called by the Trainer)
        if kwargs.get("expert_init") == "cluster":
            kwargs["expert_init"] = "default"
        return SoMELayerConfig(**kwargs)

    def data_config(self):
        """The :class:`some.data.DataConfig` of the run's corpus."""
        from .data import DataConfig

        kwargs = dict(source=self.data_source, ood_source=self.ood_source, seq_len=self.seq_len,
                      vocab_size=self.vocab_size, train_subset_size=self.train_subset_size,
                      val_subset_size=self.val_subset_size, packed=self.packed, seed=self.seed)
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        return DataConfig(**kwargs)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch if the corpus has ``train_subset_size`` documents."""
        return self.train_subset_size // self.batch_size

    # -------------------------------------------------------- dict and YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> SoMEConfig:
        """Build from a mapping of field names; unknown names are an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
        for key in d:
            _check_key(str(key), source)
        hints = typing.get_type_hints(cls)
        # YAML writes 1.0 as 1: keep float fields floats.
        d = {k: float(v) if hints[k] is float and isinstance(v, int) and not isinstance(v, bool) else v
             for k, v in d.items()}
        return cls(**d).validate()

    def diff(self, other: SoMEConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self's, other's)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> SoMEConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        return cls.from_dict(data or {}, source=str(path))


# --------------------------------------------------------------------- presets

# The reference runs of the seed (SPEC §6): d=512, L=10, 8 heads, SEQ_LEN 768,
# batch 32, V 8192, D_FFN 1024, k 4, TinyStories; only N differs.
_REFERENCE: dict[str, Any] = {}  # the dataclass defaults are the seed's values
PRESETS: dict[str, dict[str, Any]] = {
    "A4": {**_REFERENCE, "num_experts": 64},
    "B1": {**_REFERENCE, "num_experts": 128},
    "B2": {**_REFERENCE, "num_experts": 256},
    "B3": {**_REFERENCE, "num_experts": 512},
    # A CPU demo on the offline corpus: 4 epochs x 125 steps, about a minute on 2 idle cores.
    "tiny": dict(
        vocab_size=1024, d_model=64, n_layers=2, n_heads=4, seq_len=128, num_experts=16, d_ffn=128, top_k=2,
        epochs=4, batch_size=16, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=10,
        train_subset_size=2000, val_subset_size=200, data_source="fortunes", ood_source="bible",
        checkpoint_every=50,
    ),
    # For the test suite: seconds per run on the synthetic source.
    "tiny-test": dict(
        vocab_size=320, d_model=32, n_layers=2, n_heads=2, seq_len=32, num_experts=8, d_ffn=32, top_k=2,
        epochs=2, batch_size=8, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=2,
        train_subset_size=64, val_subset_size=16, data_source="synthetic",
    ),
}


def get_preset(name: str) -> SoMEConfig:
    """The named preset as a validated config."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint}; available presets: {', '.join(PRESETS)}")
    return SoMEConfig(**PRESETS[name]).validate()


# ------------------------------------------------------------------- overrides


def apply_overrides(config: SoMEConfig, overrides: Iterable[str]) -> SoMEConfig:
    """A copy of ``config`` with ``key=value`` strings applied (``--set``).

    Values are converted to the field's type (``int``, ``float``, ``bool``,
    ``str``, ``none`` for optional fields); the result is validated.
    """
    hints = typing.get_type_hints(SoMEConfig)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        _check_key(key, "--set")
        try:
            changes[key] = parse_value(text.strip(), hints[key])
        except ValueError as e:
            raise ConfigError(f"--set {key}={text}: {e}") from None
    return dataclasses.replace(config, **changes).validate()


def parse_value(text: str, tp: Any) -> Any:
    """Convert the string ``text`` to the type ``tp`` (as a dataclass field type)."""
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:  # Optional[X] / X | None
        if text.lower() in ("none", "null", "~", ""):
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected a boolean (true/false), got '{text}'")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            # allow 1e4 / 10_000 style when it is a whole number
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected an integer, got '{text}'") from None
            if not value.is_integer():
                raise ValueError(f"expected an integer, got '{text}'") from None
            return int(value)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got '{text}'") from None
    if tp is str:
        return text
    raise ValueError(f"cannot parse a value of type {tp}")


# --------------------------------------------------------------------- helpers


def _check_key(key: str, source: str) -> None:
    names = [f.name for f in dataclasses.fields(SoMEConfig)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)  # Optional[X] and X | None


def _has_type(value: Any, tp: Any) -> bool:
    if _is_union(tp):
        return any(_has_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an int is a fine float (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else tp.__name__
