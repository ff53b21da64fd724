"""SoME models in Hugging Face ``transformers`` (``pip install "some[hf]"``).

    import some.hf                                    # registers model_type "some" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model = AutoModelForCausalLM.from_pretrained("runs/tiny/model")
    tok = AutoTokenizer.from_pretrained("runs/tiny/model")
    model.generate(**tok("Q: Why", return_tensors="pt"), max_new_tokens=20, do_sample=False)
    pipeline("text-generation", model="runs/tiny/model")("Q: Why", max_new_tokens=20, do_sample=False)

Without importing ``some``, ``from_pretrained(DIR, trust_remote_code=True)`` does the same:
every model directory carries ``modeling_some.py``, which imports this module from the
installed ``some``, and an ``auto_map`` in ``config.json`` pointing at it (both written by
:func:`some.nn.pretrained.save_model_files`). Directories written before that load with
``AutoModelForCausalLM.from_pretrained(DIR, config=SoMEHFConfig.from_model_dir(DIR))``,
or re-saved: ``SoMEForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)``.

:class:`SoMEHFForCausalLM` wraps a :class:`~some.nn.SoMEForCausalLM` loaded by its own
``from_pretrained`` (the same checks of the files, the same weights, procedural experts
regenerated from the seed): its forward is the model's forward, with transformers'
``DynamicCache`` in place of :class:`~some.nn.attention.KVCache`. With sequence-level
routing every step recomputes the whole sequence (``use_cache`` is False), as
:func:`some.nn.generate.generate` does. The tokenizer (``tokenizer_config.json``) prepends
``<|endoftext|>`` as training framed every document, so ``pipeline`` and ``lm_eval`` see
the inputs that ``some generate`` and ``some eval`` give the model.

Not supported: left padding (the model attends causally without a padding mask, so
prompts of different lengths are generated one at a time), ``inputs_embeds``, static
caches, hidden states / attentions as outputs; ``save_pretrained`` writes the some
directory (:mod:`some.nn.pretrained`), not transformers' layout.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import ModelFileError
from .nn import ModelConfig, SoMEForCausalLM, lm_loss
from .nn.pretrained import FORMAT, HF_MODEL_TYPE, check_written_version, read_model_config

__all__ = ["SoMEHFConfig", "SoMEHFForCausalLM", "register"]

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_DERIVED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
_SEQUENCE_NO_CACHE = "sequence-level routing pools the whole sequence: it runs without a cache (use_cache=False)"
# the output's cache field: "cache" in recent transformers, "past_key_values" before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class SoMEHFConfig(PretrainedConfig):
    """The transformers config of a SoME model: the :class:`~some.nn.ModelConfig` fields of
    ``config.json`` in ``some_config`` (apart: ``temperature``, ``top_k`` and ``top_p`` are the
    router's, and transformers would read them as sampling settings), the usual
    transformers names (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``max_position_embeddings`` = ``seq_len``) and the special token
    ids. Made from a directory of a newer some, of another format, or with invalid fields,
    it raises :class:`~some.errors.ModelFileError`."""

    model_type = HF_MODEL_TYPE

    def __init__(self, some_config: dict[str, Any] | None = None, **kwargs):
        fmt, architecture = kwargs.pop("format", FORMAT), kwargs.pop("architecture", SoMEForCausalLM.__name__)
        if fmt != FORMAT:
            raise ModelFileError(f"config.json: format {fmt!r} is not {FORMAT!r} (not written by some, or by an "
                                 f"incompatible version)")
        if architecture != SoMEForCausalLM.__name__:
            raise ModelFileError(f"config.json: the model is a {architecture}, not a {SoMEForCausalLM.__name__}")
        some_version = kwargs.pop("some_version", None)
        check_written_version(some_version)
        # the fields: config.json's top level (as some writes it), or some_config (as this class keeps them)
        fields = {**dataclasses.asdict(ModelConfig()), **(some_config or {}),
                  **{name: kwargs.pop(name) for name in _FIELDS if name in kwargs}}
        try:
            model = ModelConfig(**fields).validate()
        except (ValueError, TypeError) as e:
            raise ModelFileError(f"config.json: {e}") from None
        for name in _DERIVED:  # made from the fields below
            kwargs.pop(name, None)
        eos = kwargs.pop("eos_token_id", None)
        # bos = eos: every document follows an <|endoftext|>
        tokens = {"eos_token_id": eos, "bos_token_id": kwargs.pop("bos_token_id", eos),
                  "pad_token_id": kwargs.pop("pad_token_id", None)}
        # sequence-level routing pools the whole sequence: a cache of earlier positions does not fit
        use_cache = kwargs.pop("use_cache", model.decodes_with_cache)
        kwargs.pop("tie_word_embeddings", None)
        methods_revision = kwargs.pop("methods_revision", None)
        super().__init__(**kwargs)
        self.some_config, self.some_version, self.methods_revision = fields, some_version, methods_revision
        self.vocab_size, self.hidden_size, self.num_hidden_layers = model.vocab_size, model.d_model, model.n_layers
        self.num_attention_heads, self.max_position_embeddings = model.n_heads, model.seq_len
        for name, value in tokens.items():
            setattr(self, name, value)
        self.use_cache, self.tie_word_embeddings = use_cache, False

    def model_config(self) -> ModelConfig:
        """The :class:`~some.nn.ModelConfig` of these fields."""
        return ModelConfig(**self.some_config).validate()

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike) -> SoMEHFConfig:
        """The config of a local model directory, read (and checked) as :mod:`some.nn.pretrained`
        reads it; also of directories written before ``model_type`` was in ``config.json``."""
        config, meta = read_model_config(directory)
        meta = {k: v for k, v in meta.items() if k not in ("model_type", "auto_map")}
        out = cls(**dataclasses.asdict(config), **meta)
        out.name_or_path = str(directory)
        return out


class _LayerCache:
    """One layer's view of a transformers cache with the interface of
    :class:`some.nn.attention.KVCache` (``length``, ``append``), which the attention calls."""

    def __init__(self, cache, layer: int):
        self.cache, self.layer = cache, layer

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.layer)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, self.layer)  # (B, H, past + S, hd) each


def _device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"SoME models load whole onto one device; device_map={device_map!r} splits them")
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None  # as stored
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        return value
    return dtype


# from_pretrained arguments that change nothing for a some directory (hub access, loading hints)
_IGNORED = {"trust_remote_code", "_from_auto", "_from_pipeline", "adapter_kwargs", "code_revision", "proxies",
            "low_cpu_mem_usage", "use_safetensors", "attn_implementation", "use_cache", "_commit_hash",
            "offload_folder", "max_memory", "key_mapping", "weights_only"}


class SoMEHFForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~some.nn.SoMEForCausalLM` (``self.model``) as a transformers causal LM:
    ``forward(input_ids, attention_mask, labels, cache)`` returns ``CausalLMOutputWithPast``
    (``labels`` aligned with ``input_ids`` as transformers has them; the model shifts), and
    ``generate`` / ``pipeline`` / ``lm_eval --model hf`` run on it."""

    config_class = SoMEHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def __init__(self, config: SoMEHFConfig, model: SoMEForCausalLM | None = None):
        super().__init__(config)
        self.model = model if model is not None else SoMEForCausalLM(config.model_config())
        self.post_init()
        self.generation_config.use_cache = bool(config.use_cache)

    def _init_weights(self, module) -> None:
        """Nothing: the model initialized itself from its seed, or holds the loaded weights."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        raise NotImplementedError("a SoME model's vocabulary is fixed (its LM head and experts are built for it)")

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: SoMEHFConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, revision=None, cache_dir=None,
                        force_download: bool = False, local_files_only: bool = False, token=None,
                        subfolder: str = "", **kwargs) -> SoMEHFForCausalLM:
        """A model directory (or hub id) written by some, loaded by
        :meth:`SoMEForCausalLM.from_pretrained <some.nn.SoMEForCausalLM.from_pretrained>`
        onto ``device_map`` (one device) in ``dtype`` (default: as stored)."""
        unsupported = [*map(repr, model_args), *sorted(k for k, v in kwargs.items()
                                                        if k not in _IGNORED and v is not None)]
        if unsupported:  # (quantization, gguf files, ...)
            raise TypeError(f"{cls.__name__}.from_pretrained: unsupported arguments {unsupported}")
        where = str(Path(pretrained_model_name_or_path, subfolder))  # (subfolder "" adds nothing)
        if config is None:
            config = (SoMEHFConfig.from_model_dir(where) if Path(where).is_dir() else
                      SoMEHFConfig.from_pretrained(where, revision=revision, cache_dir=cache_dir, token=token,
                                                   force_download=force_download, local_files_only=local_files_only))
        elif not isinstance(config, SoMEHFConfig):
            raise TypeError(f"config must be a SoMEHFConfig, got {type(config).__name__}")
        model = SoMEForCausalLM.from_pretrained(where, revision=revision, cache_dir=cache_dir, token=token,
                                                force_download=force_download, local_files_only=local_files_only,
                                                device=_device(device_map), dtype=_dtype(dtype or torch_dtype))
        if config.model_config() != model.config:
            raise ModelFileError(f"the config given does not describe the model in {where}")
        config.name_or_path = where
        return cls(config, model).eval()

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; with sequence-level routing always without a cache, as
        :func:`some.nn.generate.generate` (every token's experts depend on the whole sequence)."""
        if not self.model.config.decodes_with_cache:
            config = kwargs.get("generation_config")
            if kwargs.get("use_cache") or (config is not None and config.use_cache):
                warnings.warn(f"{_SEQUENCE_NO_CACHE}: generate recomputes the sequence at every step", stacklevel=2)
            kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the some model directory (config.json, model.safetensors, tokenizer, modeling_some.py)."""
        self.model.save_pretrained(save_directory)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache=None, past_key_values=None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        # position_ids are not read: the positions follow the cache (rotary offset), as
        # right-padded or unpadded rows have them
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("SoME models take input_ids (inputs_embeds are not supported)")
        if output_attentions or output_hidden_states:
            raise ValueError("SoME models do not return attentions or hidden states")
        cache = cache if cache is not None else past_key_values
        # a plain forward keeps no cache (it computes as SoMEForCausalLM's forward, bit for bit);
        # one given (generate gives a DynamicCache) or asked for is used and returned
        use_cache = cache is not None or bool(use_cache)
        if use_cache and not self.model.config.decodes_with_cache:
            raise ValueError(_SEQUENCE_NO_CACHE)
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"SoME models use transformers' DynamicCache, not {type(cache).__name__}")
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()
            if mask.dim() != 2:
                raise ValueError(f"attention_mask must be (B, S), got shape {tuple(mask.shape)}")
            # real tokens first in each row: a later real token after padding means left padding or holes
            if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
                raise ValueError("SoME models attend causally without a padding mask: padding must be at the end "
                                 "of each row (generate prompts of different lengths one at a time)")
            mask = mask[:, -input_ids.shape[1]:]  # the new positions' (generate passes the whole mask)
        layers = None if not use_cache else [_LayerCache(cache, i) for i in range(len(self.model.blocks))]
        logits = self.model(input_ids, mask, cache=layers).logits  # (B, S, V)
        loss = None
        if labels is not None:  # transformers' labels are the inputs: the target of position t is labels[t + 1]
            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = lm_loss(logits, shifted, mask)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


def register() -> None:
    """Register ``model_type = "some"`` with ``AutoConfig`` and ``AutoModelForCausalLM``
    (done on ``import some.hf``; calling it again changes nothing)."""
    AutoConfig.register(HF_MODEL_TYPE, SoMEHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(SoMEHFConfig, SoMEHFForCausalLM, exist_ok=True)


register()
