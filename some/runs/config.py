"""The configuration of a SoME experiment, its presets and ``--set`` overrides.

:class:`SoMEConfig` is flat on purpose: every field is one ``--set key=value``
away, one line of ``config.yaml``, and one column of a study's comparison
table. It is composed of the configurations of the layers below, each the one
definition of its fields: the SoME layer and the architecture
(:class:`~some.nn.ModelConfig`), expert construction
(:class:`~some.construction.ConstructionConfig`), the optimizer step
(:class:`~some.engine.OptimConfig`), plus the data and run fields here.

    cfg = get_preset("A4")                         # the reference run, N = 64
    cfg = apply_overrides(cfg, ["num_experts=128", "epochs=2"])
    cfg.save_yaml("runs/x/config.yaml"); SoMEConfig.load_yaml("runs/x/config.yaml")
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..construction.config import ConstructionConfig
from ..data import DataConfig
from ..engine.device import PRECISIONS, resolve_precision
from ..engine.optim import OptimConfig
from ..errors import ConfigError
from ..fields import (
    check_choice,
    check_field_types,
    check_key,
    check_range,
    check_size,
    coerce_floats,
    field_names,
    parse_value,
    validator,
)
from ..files import atomic_write, load_yaml_text, read_text_file
from ..nn.config import ModelConfig
from ..ops.backend import BACKENDS

__all__ = ["PRESETS", "DataFields", "RunFields", "SoMEConfig", "apply_overrides", "get_preset", "parse_value"]

# Keys of config files written before the test hooks left the configuration
# (they are ignored, with a warning).
RETIRED_KEYS = ("debug_nan_step", "debug_state_digest", "debug_stop_after_step", "debug_die_at_step",
                "debug_die_rank")


@dataclass
class DataFields:
    """The corpora of a run (:class:`some.data.DataConfig` is built from them)."""

    data_source: str = "tinystories"  # fortunes | bible | tinystories | synthetic | files:PATH
    ood_source: str | None = None  # held-out corpus of another domain (OOD perplexity)
    train_subset_size: int = 10000  # training documents
    val_subset_size: int = 2000  # validation documents
    packed: bool = False  # concatenate documents instead of one padded document per sample
    cache_dir: str | None = None  # tokenizer/data cache; None = the data module's default


@dataclass
class RunFields:
    """How long a run trains and how it is kept safe."""

    epochs: int = 4
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at epoch ends
    # data parallel (torchrun): seconds a collective may wait for the other
    # ranks before the run stops with an error (a dead rank never hangs it)
    dist_timeout: float = 600.0
    # which implementation of the SoME ops trains (some.ops): auto = the
    # native kernels where built for the device, else plain PyTorch; auto
    # leaves $SOME_OPS_BACKEND in charge
    ops_backend: str = "auto"  # auto | native | torch
    # bf16: frozen experts stored in bf16 and the trainable parts under bf16 autocast
    # (fp32 master weights, key store in full precision); auto = bf16 on CUDA, fp32 on
    # the CPU. config.yaml keeps the value given; run.json records what it resolved to.
    precision: str = "auto"  # auto | fp32 | bf16
    # routing dynamics (dynamics.jsonl): optimizer steps per record; 0 = about
    # 250 records per run
    log_every: int = 0
    dead_after: int = 100  # a key is "dead" in the dynamics after this many updates without a selection
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard (pip install some[tensorboard])
    compile: bool = False  # train the forward through torch.compile (the SoME ops have fake kernels)

    def dynamics_interval(self, total_steps: int) -> int:
        """Optimizer steps between two dynamics records."""
        return self.log_every if self.log_every else max(1, round(total_steps / 250))


@dataclass
class SoMEConfig(RunFields, DataFields, OptimConfig, ConstructionConfig, ModelConfig):
    """Everything a SoME experiment needs; defaults are the seed's reference values (docs/method.md §6)."""

    @validator
    def validate(self) -> SoMEConfig:
        """Check every field's value; raise :class:`ConfigError` naming the field."""
        check_field_types(self)
        ModelConfig.validate(self)
        ConstructionConfig.validate(self)
        OptimConfig.validate(self)
        check_size("epochs", self.epochs, 1, 1_000_000)
        check_size("checkpoint_every", self.checkpoint_every, 0)
        check_size("train_subset_size", self.train_subset_size)
        check_size("val_subset_size", self.val_subset_size)
        check_range("dist_timeout", self.dist_timeout, 0, 7 * 24 * 3600, lo_open=True)
        check_choice("ops_backend", self.ops_backend, BACKENDS)
        check_choice("precision", self.precision, PRECISIONS)
        check_size("log_every", self.log_every, 0)
        check_size("dead_after", self.dead_after, 1)
        if self.dense_source == "pretrained" and self.expert_init != "cluster":
            raise ConfigError("dense_source = 'pretrained' needs expert_init = 'cluster' (the experts are cut "
                              "from the dense model's FFNs)")
        if self.batch_size % self.dense_grad_accum:
            raise ConfigError(f"batch_size = {self.batch_size} must be divisible by "
                              f"dense_grad_accum = {self.dense_grad_accum}")
        try:  # the data module knows its own rules (sources, vocabulary)
            self.data_config().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def for_device(self, device) -> SoMEConfig:
        """The configuration as it runs on ``device``: ``precision`` resolved (auto: bf16 on
        CUDA, fp32 on the CPU), and with bf16 the frozen experts stored in bfloat16."""
        precision = resolve_precision(self.precision, device)
        expert_dtype = "bfloat16" if precision == "bf16" else self.expert_dtype
        return dataclasses.replace(self, precision=precision, expert_dtype=expert_dtype)

    # ------------------------------------------------------------- sub-configs
    def data_config(self) -> DataConfig:
        """The :class:`some.data.DataConfig` of the run's corpus."""
        kwargs = dict(source=self.data_source, ood_source=self.ood_source, seq_len=self.seq_len,
                      vocab_size=self.vocab_size, train_subset_size=self.train_subset_size,
                      val_subset_size=self.val_subset_size, packed=self.packed, seed=self.seed)
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        return DataConfig(**kwargs)

    @property
    def nominal_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch *if* the corpus has ``train_subset_size`` documents (the
        seed's 10000 // 32 = 312); a run counts its own from the documents it has."""
        return self.train_subset_size // self.batch_size

    # -------------------------------------------------------- dict and YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> SoMEConfig:
        """Build from a mapping of field names; unknown names are an error
        (the retired test-hook keys of older files are ignored with a warning)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
        retired = [k for k in d if k in RETIRED_KEYS]
        if any(d[k] for k in retired):
            warnings.warn(f"{source}: ignoring the retired test-hook keys {retired} (fault injection for tests "
                          f"is set by SOME_FAULT_* environment variables now)", stacklevel=2)
        d = {k: v for k, v in d.items() if k not in RETIRED_KEYS}
        for key in d:
            check_key(field_names(cls), str(key), source)
        return cls(**coerce_floats(cls, d)).validate()

    def diff(self, other: SoMEConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self's, other's)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> SoMEConfig:
        data = load_yaml_text(read_text_file(path, "config file"), f"config file {path}")
        return cls.from_dict(data or {}, source=str(path))


# --------------------------------------------------------------------- presets

# The reference runs of the seed (docs/method.md §6): d=512, L=10, 8 heads, SEQ_LEN 768,
# batch 32, V 8192, D_FFN 1024, k 4, TinyStories; only N differs.
_REFERENCE: dict[str, Any] = {}  # the dataclass defaults are the seed's values
PRESETS: dict[str, dict[str, Any]] = {
    "A4": {**_REFERENCE, "num_experts": 64},
    "B1": {**_REFERENCE, "num_experts": 128},
    "B2": {**_REFERENCE, "num_experts": 256},
    "B3": {**_REFERENCE, "num_experts": 512},
    # A CPU demo on the offline corpus: 4 epochs x 125 steps, about 100 s on 2 idle cores.
    "tiny": dict(
        vocab_size=1024, d_model=64, n_layers=2, n_heads=4, seq_len=128, num_experts=16, d_ffn=128, top_k=2,
        epochs=4, batch_size=16, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=10,
        train_subset_size=2000, val_subset_size=200, data_source="fortunes", ood_source="bible",
        checkpoint_every=50,
    ),
    # CPU-scale runs with the seed's ratios (k = 4, h = 2d, 4 epochs; docs/method.md §6) on
    # the offline corpus with OOD: about 5 minutes at N = 64 on 2 cores; the
    # -B1/-B2/-B3 variants scale N as the seed's B series does.
    **{name: dict(
        vocab_size=1024, d_model=128, n_layers=4, n_heads=4, seq_len=128, num_experts=n, d_ffn=256, top_k=4,
        epochs=4, batch_size=16, learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=20,
        train_subset_size=2000, val_subset_size=200, data_source="fortunes", ood_source="bible",
        checkpoint_every=100,
    ) for name, n in (("small", 64), ("small-B1", 128), ("small-B2", 256), ("small-B3", 512))},
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
        check_key(field_names(SoMEConfig), key, "--set")
        try:
            changes[key] = parse_value(text.strip(), hints[key])
        except ValueError as e:
            raise ConfigError(f"--set {key}={text}: {e}") from None
    return dataclasses.replace(config, **changes).validate()
