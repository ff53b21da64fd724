"""One call builds everything a training run needs: corpus, split, tokenizer, datasets."""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..fields import validator
from .corpora import NO_TOPICS, load_corpus, load_documents, parse_source, split_indices
from .dataset import DocumentDataset
from .tinystories import load_tinystories, parse_tinystories_options
from .tokenizer import SPECIAL_TOKENS, train_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["DataConfig", "EvalData", "LMData", "build_data", "build_eval_data"]

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """What :func:`build_data` builds. Defaults are the reference runs' (docs/method.md §6)."""

    source: str = "tinystories"  # see the module docstring
    ood_source: str | None = None  # a held-out corpus of another domain (OOD perplexity), or None
    seq_len: int = 768  # tokens per sample (inputs and targets, each)
    vocab_size: int = 8192  # V: BPE vocabulary size, and the model's
    train_subset_size: int = 10000  # training documents
    val_subset_size: int = 2000  # validation documents
    ood_subset_size: int | None = None  # OOD documents; None = val_subset_size
    packed: bool = False  # concatenate documents into full chunks instead of padding each
    seed: int = 0  # the train/val split and the subsets
    cache_dir: str | None = None  # cache root; None = $SOME_CACHE_DIR or ~/.cache/some
    tokenizer_min_frequency: int = 2  # BPE merges need a pair seen at least this often
    token_cache: bool = True  # keep the tokenized datasets on disk for later runs (some.data.token_cache)

    @validator
    def validate(self) -> DataConfig:
        for name in ("seq_len", "vocab_size", "train_subset_size", "val_subset_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if self.ood_subset_size is not None and (not isinstance(self.ood_subset_size, int) or self.ood_subset_size < 1):
            raise ValueError(f"DataConfig.ood_subset_size must be a positive int or None, got {self.ood_subset_size!r}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"DataConfig.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                             f"(byte-level BPE: 256 bytes + special tokens), got {self.vocab_size}")
        parse_source(self.source)
        if self.ood_source is not None:
            parse_source(self.ood_source)
            if self.ood_source.strip() == self.source.strip():
                raise ValueError(f"DataConfig.ood_source must be another corpus than source ({self.source!r})")
        return self


@dataclass
class LMData:
    """The output of :func:`build_data`.

    ``vocab_size`` is the model's vocabulary size (``DataConfig.vocab_size``); every token id is
    below it, even when a small corpus gave the tokenizer fewer tokens.
    """

    train: DocumentDataset
    val: DocumentDataset
    ood: DocumentDataset | None
    tokenizer: Tokenizer
    vocab_size: int
    pad_id: int
    eot_id: int
    description: str
    config: DataConfig
    # the topic of each topic id of train/val's ``topic_ids`` (None: the corpus has no topics)
    topic_names: list[str] | None = None
    topic_kind: str | None = None  # what a topic is ("fortune file", "book", ...) or why there are none
    token_seconds: float = 0.0  # time spent tokenizing (or loading tokens from the cache)
    token_cache: str = "off"  # hit | miss | partial | off

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of a token sequence, without padding or special tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def _select(source: str, n_train: int, n_val: int, seed: int, cache_dir):
    """(train docs, val docs, train topic ids, val topic ids, topic names, topic kind)."""
    kind, arg = parse_source(source)
    if kind == "tinystories":
        # The official splits: train documents from "train", validation from "validation".
        where = parse_tinystories_options(arg)
        return (load_tinystories("train", n_train, seed, **where, cache_dir=cache_dir),
                load_tinystories("validation", n_val, seed, **where, cache_dir=cache_dir), None, None, None,
                NO_TOPICS["tinystories"])
    corpus = load_corpus(source, cache_dir=cache_dir)
    train, val = split_indices(len(corpus.documents), n_train, n_val, seed, name=repr(source))
    docs = corpus.documents
    if corpus.topics is None:
        return [docs[i] for i in train], [docs[i] for i in val], None, None, None, corpus.topic_kind
    # topic ids over the whole corpus (sorted names): the same id means the same topic in train and val
    names = sorted(set(corpus.topics))
    ids = {name: i for i, name in enumerate(names)}
    topic = [ids[t] for t in corpus.topics]
    return ([docs[i] for i in train], [docs[i] for i in val], [topic[i] for i in train], [topic[i] for i in val],
            names, corpus.topic_kind)


def _select_ood(source: str, n: int, seed: int, cache_dir) -> list[str]:
    kind, arg = parse_source(source)
    if kind == "tinystories":
        return load_tinystories("validation", n, seed, **parse_tinystories_options(arg), cache_dir=cache_dir)
    docs = load_documents(source, cache_dir=cache_dir)
    if len(docs) < n:
        warnings.warn(f"OOD corpus {source!r} has only {len(docs)} documents (< {n} requested); using all of them",
                      stacklevel=3)
    return [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))[:n]]


def build_data(cfg: DataConfig) -> LMData:
    """Load the corpus, split it, train (or load) the tokenizer, and tokenize train/val/OOD.

    Raises :class:`CorpusUnavailableError` when a corpus is missing here (its message names the
    fix), ``ValueError`` for a bad configuration.
    """
    cfg.validate()
    train_docs, val_docs, train_topics, val_topics, topic_names, topic_kind = _select(
        cfg.source, cfg.train_subset_size, cfg.val_subset_size, cfg.seed, cfg.cache_dir)
    if not val_docs:
        raise ValueError(f"no validation documents from {cfg.source!r}")
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cache_dir=cfg.cache_dir,
                                min_frequency=cfg.tokenizer_min_frequency)
    t0 = time.perf_counter()
    hits = []

    def tokenized(docs, topics=None) -> DocumentDataset:
        if not cfg.token_cache:
            return DocumentDataset.from_texts(docs, tokenizer, cfg.seq_len, packed=cfg.packed, topics=topics)
        dataset, hit = DocumentDataset.cached(docs, tokenizer, cfg.seq_len, packed=cfg.packed, topics=topics,
                                              cache_dir=cfg.cache_dir)
        hits.append(hit)
        return dataset

    train = tokenized(train_docs, train_topics)
    val = tokenized(val_docs, val_topics)
    ood = None
    if cfg.ood_source is not None:
        n_ood = cfg.ood_subset_size or cfg.val_subset_size
        ood = tokenized(_select_ood(cfg.ood_source, n_ood, cfg.seed, cfg.cache_dir))
    token_seconds = time.perf_counter() - t0
    cache_state = "off" if not cfg.token_cache else "hit" if all(hits) else "miss" if not any(hits) else "partial"
    log.info("data: tokens %s in %.2f s (token cache: %s)", "loaded" if cache_state == "hit" else "prepared",
             token_seconds, cache_state)
    mode = "packed" if cfg.packed else "one document per sample"
    parts = [f"{cfg.source}: {train.num_documents} train / {val.num_documents} val documents "
             f"({train.num_tokens:,} / {val.num_tokens:,} tokens)"]
    if ood is not None:
        parts.append(f"OOD {cfg.ood_source}: {ood.num_documents} documents ({ood.num_tokens:,} tokens)")
    parts.append(f"byte-level BPE V={cfg.vocab_size} ({tokenizer.get_vocab_size()} learned), "
                 f"seq_len {cfg.seq_len}, {mode}, seed {cfg.seed}")
    parts.append(f"topics: {len(topic_names)} ({topic_kind})" if topic_names else f"topics: {topic_kind}")
    description = "; ".join(parts)
    log.info("data: %s", description)
    return LMData(train=train, val=val, ood=ood, tokenizer=tokenizer, vocab_size=cfg.vocab_size,
                  pad_id=train.pad_id, eot_id=train.eot_id, description=description,
                  config=dataclasses.replace(cfg), topic_names=topic_names, topic_kind=topic_kind,
                  token_seconds=token_seconds, token_cache=cache_state)


@dataclass
class EvalData:
    """The validation (and OOD) datasets of a corpus tokenized by a given tokenizer."""

    val: DocumentDataset
    ood: DocumentDataset | None


def build_eval_data(cfg: DataConfig, tokenizer: Tokenizer, *, same_split: bool = True) -> EvalData:
    """The validation split of ``cfg.source`` (and ``cfg.ood_source``) tokenized with
    ``tokenizer`` (a trained model's): with the run's sizes and seed, the documents of the
    run's own validation set (the split takes the validation documents first, so
    ``same_split=False`` only sets the training size to 1)."""
    cfg.validate()
    n_train = cfg.train_subset_size if same_split else 1
    _, val_docs, _, val_topics, _, _ = _select(cfg.source, n_train, cfg.val_subset_size, cfg.seed, cfg.cache_dir)
    if not val_docs:
        raise ValueError(f"no validation documents from {cfg.source!r}")

    def tokenized(docs, topics=None) -> DocumentDataset:
        if not cfg.token_cache:
            return DocumentDataset.from_texts(docs, tokenizer, cfg.seq_len, packed=cfg.packed, topics=topics)
        return DocumentDataset.cached(docs, tokenizer, cfg.seq_len, packed=cfg.packed, topics=topics,
                                      cache_dir=cfg.cache_dir)[0]

    ood = None
    if cfg.ood_source is not None:
        ood = tokenized(_select_ood(cfg.ood_source, cfg.ood_subset_size or cfg.val_subset_size, cfg.seed,
                                    cfg.cache_dir))
    return EvalData(val=tokenized(val_docs, val_topics), ood=ood)
