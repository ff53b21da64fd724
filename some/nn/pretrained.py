"""A trained SoME model as a directory others can load (the Hugging Face layout):

    config.json         the architecture (ModelConfig fields) and the tokenizer's special ids
    model.safetensors   the weights; experts the generator can make again are not stored
                        (each layer's record of how they were made is in the file's metadata)
    tokenizer.json      the byte-level BPE tokenizer (``tokenizers``), when one is attached
    README.md           a model card: architecture, parameter counts, data, final metrics
    modeling_some.py    for transformers' ``trust_remote_code=True``: imports :mod:`some.hf` from the
                        installed some (``config.json`` has ``model_type`` and the ``auto_map`` to it)
    tokenizer_config.json  with tokenizer.json, the tokenizer for transformers' ``AutoTokenizer``
                        (tokenizer.json's encode prepends ``<|endoftext|>`` as training framed documents)

:meth:`SoMEForCausalLM.save_pretrained` / :meth:`~SoMEForCausalLM.from_pretrained`
(``huggingface_hub``'s ``ModelHubMixin``: also a hub id, and ``push_to_hub``)
call :func:`save_model_files` / :func:`load_model_files`. Every file is written
atomically; loading checks names, shapes and the experts' digest and names the
file and the problem when something does not fit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from ..errors import ConfigError, ModelFileError
from ..files import atomic_write, read_text_file
from ..version import __version__
from .config import ModelConfig
from .revision import METHODS_REVISION, warn_if_methods_changed

__all__ = ["AUTO_MAP", "CONFIG_FILE", "FORMAT", "HF_MODEL_TYPE", "MODEL_CARD", "REMOTE_CODE_FILE",
           "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE", "WEIGHTS_FILE", "check_written_version", "framed_tokenizer",
           "load_model_files", "model_card", "read_model_config", "remote_code", "save_model_files",
           "tokenizer_config"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
TOKENIZER_FILE, MODEL_CARD = "tokenizer.json", "README.md"
FORMAT = "some-model-1"
# transformers (some.hf): config.json's model_type, and where trust_remote_code finds the classes
HF_MODEL_TYPE, REMOTE_CODE_FILE, TOKENIZER_CONFIG_FILE = "some", "modeling_some.py", "tokenizer_config.json"
AUTO_MAP = {"AutoConfig": "modeling_some.SoMEHFConfig", "AutoModelForCausalLM": "modeling_some.SoMEHFForCausalLM"}
# config.json keys besides the ModelConfig fields
_META_KEYS = ("format", "architecture", "some_version", "methods_revision", "eos_token_id", "pad_token_id",
              "model_type", "auto_map")
_EXTRA = "._extra_state"
_EOT, _PAD = "<|endoftext|>", "<|pad|>"  # (as some.data.tokenizer names them: data is a layer above)
# training state that an exported model does not carry (a resumed run has it in checkpoint.pt)
_TRAINING_ONLY = (".telemetry.", ".window_counts", ".window_unmatched", ".window_steps")


def _weights(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, extra = {}, {}
    for name, value in model.state_dict().items():
        if name.endswith(_EXTRA):
            extra[name] = value
        elif not any(part in f".{name}" for part in _TRAINING_ONLY):
            tensors[name] = value.detach().cpu().contiguous()
    return tensors, {"format": FORMAT, "extra_state": json.dumps(extra)}


def model_card(model, info: dict[str, Any] | None = None) -> str:
    """The README.md of an exported model: what it is and, from ``info`` (a run's
    ``data``, ``metrics``, ``run``), what it was trained on and how it did."""
    cfg = model.config
    total, trainable = model.parameter_counts()
    info = info or {}
    experts = ("regenerated from (seed, layer) by the Philox generator of some" if cfg.expert_init == "default"
               else "stored in model.safetensors")
    tags = "[mixture-of-experts, some, self-organizing-moe]" if cfg.ffn == "some" else "[some, dense-control]"
    lines = ["---", "library_name: some", f"tags: {tags}", "---", "",
             f"# SoME language model ({info.get('name', 'some')})", "",
             cfg.describe(), "",
             f"- Parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable"
             + (f"; the frozen experts are {experts} (seed {cfg.seed})." if cfg.ffn == "some" else "."),
             f"- Written by some {__version__}."]
    if info.get("data"):
        lines.append(f"- Data: {info['data']}")
    metrics = info.get("metrics") or {}
    if metrics:
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        lines.append(f"- Final metrics: {', '.join(parts)}")
    lines += ["", "```python", "from some import SoMEForCausalLM", "model = SoMEForCausalLM.from_pretrained(\"PATH\")",
              "```", "", "or `some generate PATH --prompt \"...\"`; `some eval PATH --data SOURCE`; with transformers "
              "(`pip install \"some[hf]\"`):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"PATH\", trust_remote_code=True)  # or: import some.hf",
              "tokenizer = AutoTokenizer.from_pretrained(\"PATH\", trust_remote_code=True)", "```", ""]
    return "\n".join(lines)


def remote_code() -> str:
    """The text of ``modeling_some.py``: transformers imports it for ``trust_remote_code=True``
    (``auto_map`` in config.json); it takes the classes from the installed some."""
    return f'''"""A SoME model in transformers (trust_remote_code=True): the classes are the installed
some package's (some.hf); this directory was written by some {__version__}."""
try:
    from some.hf import SoMEHFConfig, SoMEHFForCausalLM  # noqa: F401
except ImportError as e:  # some is missing, or an old version without the transformers integration
    raise ImportError(f"this SoME model needs the some package with its transformers integration "
                      f"(some >= {__version__}; pip install 'some[hf]'): {{e}}") from e
'''


def framed_tokenizer(tokenizer):
    """A copy of ``tokenizer`` (``tokenizers.Tokenizer``) whose ``encode`` with special tokens
    (its default; transformers' and lm_eval's) prepends ``<|endoftext|>``, as training framed
    every document; ``add_special_tokens=False`` (what some itself calls) encodes as before."""
    from tokenizers import Tokenizer, processors

    eot = tokenizer.token_to_id(_EOT)
    if eot is None or tokenizer.token_to_id(_PAD) is None:
        raise ValueError(f"the tokenizer has no {_EOT} or {_PAD} token")
    framed = Tokenizer.from_str(tokenizer.to_str())
    framed.post_processor = processors.TemplateProcessing(single=f"{_EOT} $A", pair=f"{_EOT} $A {_EOT}:1 $B:1",
                                                          special_tokens=[(_EOT, eot)])
    return framed


def tokenizer_config(seq_len: int) -> dict[str, Any]:
    """``tokenizer_config.json``: ``tokenizer.json`` as transformers' fast tokenizer with its
    special tokens, right padding (the only padding the model takes)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": _EOT, "eos_token": _EOT, "pad_token": _PAD,
            "padding_side": "right", "model_max_length": seq_len, "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"]}


def save_model_files(model, directory: str | Path, *, tokenizer=None, info: dict[str, Any] | None = None) -> Path:
    """Write the model directory (see the module docstring); returns it."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, metadata = _weights(model)
    architecture = model.config.model_config()  # the architecture alone (of any config given)
    config = {"format": FORMAT, "architecture": type(model).__name__, "some_version": __version__,
              "methods_revision": getattr(model, "methods_revision", METHODS_REVISION),
              "model_type": HF_MODEL_TYPE, "auto_map": AUTO_MAP, **dataclasses.asdict(architecture)}
    if tokenizer is not None:
        config["eos_token_id"] = tokenizer.token_to_id(_EOT)
        config["pad_token_id"] = tokenizer.token_to_id(_PAD)
        atomic_write(directory / TOKENIZER_FILE, framed_tokenizer(tokenizer).to_str())
        atomic_write(directory / TOKENIZER_CONFIG_FILE, json.dumps(tokenizer_config(architecture.seq_len), indent=2)
                     + "\n")
    atomic_write(directory / REMOTE_CODE_FILE, remote_code())
    atomic_write(directory / WEIGHTS_FILE, save(tensors, metadata=metadata))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    atomic_write(directory / MODEL_CARD, model_card(model, info))
    return directory


def check_written_version(written: Any) -> None:
    """Raise :class:`ModelFileError` when a model directory was written by a newer ``some``
    than the installed one (its config fields or its integration with transformers may need the newer code)."""
    if written is None:
        return
    try:
        theirs = Version(str(written))
    except InvalidVersion:
        raise ModelFileError(f"config.json: some_version {written!r} is not a version number") from None
    if __version__ == "0+unknown":  # a source tree that is not installed: nothing to compare with
        return
    ours = Version(__version__)
    if theirs.release > ours.release or (theirs.release == ours.release and theirs > ours):
        raise ModelFileError(f"this model was written by some {written}, newer than the installed some "
                             f"{__version__}: upgrade it (pip install -U some) to load the model")


def read_model_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The :class:`ModelConfig` of a model directory and its other config.json keys."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ModelFileError(f"{directory} is not a some model directory: no {CONFIG_FILE}")
    try:
        raw = json.loads(read_text_file(path, "model config"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: expected a JSON object of config fields")
    if raw.get("format") != FORMAT:
        raise ModelFileError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r} (not written by some, or by "
                             f"an incompatible version)")
    if raw.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        raise ModelFileError(f"{path}: model_type {raw['model_type']!r} is not {HF_MODEL_TYPE!r}")
    check_written_version(raw.get("some_version"))  # a newer some's fields are not "unknown": say why
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - fields - set(_META_KEYS))
    if unknown:
        raise ModelFileError(f"{path}: unknown config fields {unknown}")
    revision = raw.get("methods_revision", 1)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ModelFileError(f"{path}: methods_revision must be a positive integer, got {revision!r}")
    try:
        config = ModelConfig(**{k: v for k, v in raw.items() if k in fields}).validate()
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"{path}: {e}") from None
    return config, {k: raw[k] for k in _META_KEYS if k in raw}


def load_model_files(cls, directory: str | Path, *, device="cpu", dtype=None):
    """Build ``cls`` from a model directory, check and load its weights; attach the
    tokenizer (``model.tokenizer``, None without tokenizer.json) and the config's
    special token ids (``model.eos_token_id``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"model directory not found: {directory}")
    config, meta = read_model_config(directory)
    if meta.get("architecture") not in (None, cls.__name__):
        raise ModelFileError(f"{directory / CONFIG_FILE}: the model is a {meta['architecture']}, not a {cls.__name__}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{directory} has no {WEIGHTS_FILE}")
    data = weights.read_bytes()
    try:
        tensors = load(data)
        from safetensors import safe_open  # the metadata (the header was just read whole)

        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{weights}: not a readable safetensors file ({e}); it is truncated or damaged") from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{weights}: metadata format {metadata.get('format')!r} is not {FORMAT!r}")
    try:
        extra = json.loads(metadata.get("extra_state", "{}"))
    except json.JSONDecodeError:
        raise ModelFileError(f"{weights}: damaged metadata (extra_state is not JSON)") from None
    model = cls(config, device=device, dtype=dtype)
    state = {**tensors, **extra}
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise ModelFileError(f"{weights} does not fit {CONFIG_FILE}: {detail[:600]}") from None
    missing = [k for k in result.missing_keys if not any(part in f".{k}" for part in _TRAINING_ONLY)]
    if missing or result.unexpected_keys:
        raise ModelFileError(f"{weights} does not fit {CONFIG_FILE}: missing {missing[:8]}, unexpected "
                             f"{result.unexpected_keys[:8]}")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelFileError(f"{weights} holds NaN or Inf in {bad[:4]}")
    model.tokenizer = None
    if (directory / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        try:
            model.tokenizer = Tokenizer.from_str(read_text_file(directory / TOKENIZER_FILE, "tokenizer"))
        except Exception as e:  # noqa: BLE001 -- the tokenizers library raises its own exception type
            raise ModelFileError(f"{directory / TOKENIZER_FILE}: not a tokenizer file ({e})") from None
    model.eos_token_id = meta.get("eos_token_id")
    model.pad_token_id = meta.get("pad_token_id")
    model.methods_revision = meta.get("methods_revision", 1)  # directories before the field: revision 1
    warn_if_methods_changed(config, model.methods_revision, str(directory))
    return model.eval()
