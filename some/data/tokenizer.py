"""The byte-level BPE tokenizer of a run (HuggingFace ``tokenizers``), trained once and cached."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..files import atomic_write, resolve_cache_dir

if TYPE_CHECKING:  # the tokenizers import stays lazy: `import some` must not need it
    from tokenizers import Tokenizer

__all__ = ["EOT_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "tokenizer_cache_key", "train_tokenizer"]

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOT_TOKEN)  # ids 0 and 1, in this order


def _tokenizer_settings(vocab_size: int, min_frequency: int) -> dict[str, Any]:
    # Everything that changes the trained tokenizer goes into its cache key.
    return {"format": 1, "model": "bpe", "pre_tokenizer": "byte_level", "add_prefix_space": False,
            "special_tokens": list(SPECIAL_TOKENS), "vocab_size": vocab_size, "min_frequency": min_frequency}


def tokenizer_cache_key(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> str:
    """SHA-256 of the tokenizer settings and the training texts (each length-prefixed)."""
    h = hashlib.sha256(json.dumps(_tokenizer_settings(vocab_size, min_frequency), sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, cache_dir: str | os.PathLike | None = None,
                    min_frequency: int = 2, use_cache: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer (HuggingFace ``tokenizers``) with ``vocab_size`` tokens, trained on
    ``texts``; ``<|pad|>`` is id 0 and ``<|endoftext|>`` id 1.

    Cached in ``<cache root>/tokenizers/bpe-<V>-<hash>.json`` (see :func:`resolve_cache_dir`), keyed
    by a hash of the texts and settings; a second call with the same inputs loads the file. A
    corpus too small to learn ``vocab_size`` tokens gives a smaller vocabulary (with a warning):
    every id is still ``< vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + len(SPECIAL_TOKENS)  # the byte alphabet + the special tokens
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be an int >= {min_vocab} (256 bytes + special tokens), got {vocab_size!r}")
    if not texts:
        raise ValueError("train_tokenizer needs at least one training text")
    path = None
    if use_cache:
        key = tokenizer_cache_key(texts, vocab_size, min_frequency)
        path = resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key[:20]}.json"
        if path.is_file():
            try:
                tok = Tokenizer.from_file(str(path))
                log.info("loaded cached tokenizer %s", path)
                return tok
            except Exception as e:  # noqa: BLE001 -- a damaged cache file is retrained, not fatal
                log.warning("ignoring unreadable tokenizer cache %s (%s)", path, e)
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    if tok.get_vocab_size() < vocab_size:
        warnings.warn(f"the training texts are too small to learn {vocab_size} BPE tokens; the tokenizer has "
                      f"{tok.get_vocab_size()} (ids stay < vocab_size, the model keeps V = {vocab_size})",
                      stacklevel=2)
    if path is not None:
        atomic_write(path, tok.to_str())
        log.info("trained tokenizer (%d tokens) cached in %s", tok.get_vocab_size(), path)
    return tok
