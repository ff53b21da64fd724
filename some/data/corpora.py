"""Data for SoME language models: corpora, a cached byte-level BPE tokenizer, datasets.

One call builds everything a training run needs::

    from some.data import DataConfig, build_data
    data = build_data(DataConfig(source="fortunes", ood_source="bible", seq_len=256, vocab_size=4096))
    data.train[0]        # {"input_ids": (S,) int64, "labels": (S,) int64, "attention_mask": (S,) bool}
    print(data.description)

Sources (``DataConfig.source`` / ``ood_source``):

- ``"tinystories"`` / ``"tinystories:DIR"`` / ``"tinystories:DIR,form=F"``: ``roneneldan/TinyStories``,
  the reference corpus of docs/method.md §6, with its own train and validation splits. ``DIR``
  (else ``$SOME_TINYSTORIES_DIR``) is a local copy, read with no network, in one of the forms the
  dataset is distributed in (F, searched in this order): ``parquet`` (the Hub's shards
  ``data/train-*.parquet``, ``data/validation-*.parquet``; needs ``pyarrow``), ``datasets`` (a
  HuggingFace ``datasets`` cache holding ``roneneldan___tiny_stories/``, read offline; needs
  ``datasets``), ``txt`` (``TinyStories-train.txt``, ``TinyStories-valid.txt``: stories separated
  by ``<|endoftext|>`` lines) or ``txt-v2`` (``TinyStoriesV2-GPT4-*.txt``, the GPT-4-only second
  version). Without a local copy, ``datasets.load_dataset`` downloads it (or reads HuggingFace's
  cache with ``HF_DATASETS_OFFLINE=1``). See :mod:`some.data.tinystories`;
- ``"fortunes"`` / ``"fortunes:NAME[,NAME]"``: the fortune-cookie files of the Debian packages
  ``fortunes-min`` and ``fortunes`` (one fortune per document), offline, in-domain; a document's
  topic is its file (``art``, ``computers``, ``science``, ...);
- ``"bible"`` / ``"bible:chapter"`` / ``"bible:verses=N"``: the World English Bible (Debian
  ``sword-text-web``, read with ``diatheke``), passages of 8 verses (default), whole chapters,
  or N verses per document; offline, the out-of-domain corpus; topic: the book, or with
  ``,topic=testament`` (e.g. ``"bible:verses=2,topic=testament"``) the Old Testament /
  Deuterocanon / New Testament;
- ``"files:PATH[,PATH]"``: local ``.txt`` files (documents separated by blank lines; in a file
  with ``<|endoftext|>`` lines, by ``<|endoftext|>`` instead, so a document keeps its blank
  lines), ``.jsonl`` files (one JSON object per line with a ``text`` field), or directories
  (every ``.txt`` file is one document, or its ``<|endoftext|>``-separated documents; every
  ``.jsonl`` file is read as above); ``,topic_field=NAME`` takes each JSONL document's topic from
  its field ``NAME`` (every document must then have one);
- ``"synthetic"`` / ``"synthetic:N"``: N documents of pseudo-words from a fixed random Markov
  chain, for fast tests and benchmarks.

TinyStories and the synthetic source have no topics. :func:`load_corpus` returns the documents
with their topics; :func:`load_documents` the documents alone.

``scripts/install_corpus.sh`` installs the Debian corpora. Every document list is
deterministic (sorted files, fixed order) and is split into train/val by ``DataConfig.seed``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorpusUnavailableError
from .bible import bible_testament, load_bible, load_bible_passages, parse_bible_options, parse_diatheke_osis
from .hints import INSTALL_HINT, OFFLINE_CHOICES
from .tinystories import has_separator_lines, load_tinystories, parse_tinystories_options, split_stories

__all__ = [
    "FORTUNES_DIR", "OFFLINE_CHOICES", "SOURCES", "Corpus", "bible_testament", "load_bible", "load_corpus",
    "load_documents", "load_files", "load_fortunes", "load_tinystories", "parse_diatheke_osis", "parse_source",
    "split_documents", "split_indices", "synthetic_documents",
]

log = logging.getLogger(__name__)

SOURCES = ("tinystories[:DIR]", "fortunes", "bible", "files:PATH[,PATH]", "synthetic")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SYNTHETIC_DOCS = 12000  # enough for the reference subset sizes (10000 + 2000)


def parse_source(source: str) -> tuple[str, str]:
    """``"kind:arg"`` -> ``(kind, arg)``; validates the kind and the argument's form (not whether
    its files exist)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"data source must be a non-empty string, one of {SOURCES}; got {source!r}")
    kind, _, arg = source.strip().partition(":")
    kind = kind.lower()
    if kind not in ("tinystories", "fortunes", "bible", "files", "synthetic"):
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if kind == "files" and not arg:
        raise ValueError("data source 'files:' needs paths, e.g. 'files:corpus.txt' or 'files:a.jsonl,b.jsonl'")
    if kind == "tinystories":
        try:
            parse_tinystories_options(arg)
        except ValueError as e:
            raise ValueError(f"data source {source!r}: {e}") from None
    return kind, arg


@dataclass
class Corpus:
    """The documents of a source and, where the corpus has them, one topic per document."""

    documents: list[str]
    topics: list[str] | None = None  # one per document, or None
    topic_kind: str | None = None  # what a topic is ("fortune file", "book", ...), or why there are none

    def __post_init__(self) -> None:
        if self.topics is not None and len(self.topics) != len(self.documents):
            raise ValueError(f"{len(self.topics)} topics for {len(self.documents)} documents")


NO_TOPICS = {"synthetic": "none (pseudo-words of one Markov chain)",
             "tinystories": "none (TinyStories has no topic labels)",
             "files": "none (give ,topic_field=NAME for JSONL files)"}


def _options(arg: str, allowed: Sequence[str], source: str) -> tuple[list[str], dict[str, str]]:
    """Split ``a,b,key=value`` into the plain items and the ``key=value`` options."""
    items, opts = [], {}
    for part in (p for p in arg.split(",") if p):
        key, eq, value = part.partition("=")
        if eq and key in allowed:
            opts[key] = value
        else:
            items.append(part)
    return items, opts


def load_corpus(source: str, *, cache_dir: str | os.PathLike | None = None) -> Corpus:
    """All documents of an offline source, in a fixed order, with their topics (see the
    module docstring).

    ``"tinystories"`` is too large to load whole: use :func:`load_tinystories`.
    Raises :class:`CorpusUnavailableError` when the corpus is not installed or a file is missing,
    ``ValueError`` for a malformed source or file.
    """
    kind, arg = parse_source(source)
    if kind == "fortunes":
        docs, topics = _fortunes(FORTUNES_DIR, [a for a in arg.split(",") if a] or None)
        corpus = Corpus(docs, topics, "fortune file")
    elif kind == "bible":
        opts = parse_bible_options(arg)
        topic = opts.pop("topic", "book")
        docs, books = load_bible_passages(**opts, cache_dir=cache_dir)
        topics = books if topic == "book" else [bible_testament(b) for b in books]
        corpus = Corpus(docs, topics, topic)
    elif kind == "files":
        paths, opts = _options(arg, ("topic_field",), source)
        if not paths:
            raise ValueError(f"data source {source!r} names no files")
        field = opts.get("topic_field")
        docs, topics = _files(paths, field)
        corpus = Corpus(docs, topics, f"field '{field}'") if field else Corpus(docs, None, NO_TOPICS["files"])
    elif kind == "synthetic":
        try:
            n = int(arg) if arg else SYNTHETIC_DOCS
        except ValueError:
            raise ValueError(f"data source 'synthetic:N' needs an integer N, got {source!r}") from None
        corpus = Corpus(synthetic_documents(n), None, NO_TOPICS["synthetic"])
    else:
        raise ValueError("load_documents cannot load 'tinystories' whole; use load_tinystories(split, n, seed) "
                         "or build_data(DataConfig(source='tinystories'))")
    if not corpus.documents:
        raise CorpusUnavailableError(f"data source {source!r} holds no (non-empty) documents")
    return corpus


def load_documents(source: str, *, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents of :func:`load_corpus` (without their topics)."""
    return load_corpus(source, cache_dir=cache_dir).documents


# ---- fortunes
def load_fortunes(fortunes_dir: str | os.PathLike = FORTUNES_DIR,
                  names: Sequence[str] | None = None) -> list[str]:
    """One document per fortune, from the fortune files of ``fortunes_dir``.

    Reads only the top-level regular text files: the ``.dat`` index files are binary, the
    ``.u8`` names are symlinks to the same files, and offensive fortunes (Debian's
    ``fortunes-off``) live in the ``off/`` subfolder, which is skipped. ``names`` selects files
    (e.g. ``["cookie", "literature"]``). Files in sorted order, fortunes in file order.
    """
    return _fortunes(fortunes_dir, names)[0]


def load_fortune_files(fortunes_dir: str | os.PathLike = FORTUNES_DIR,
                       names: Sequence[str] | None = None) -> list[Path]:
    """The fortune files :func:`load_fortunes` reads, in its order."""
    root = Path(fortunes_dir)
    if not root.is_dir():
        raise CorpusUnavailableError(
            f"the 'fortunes' corpus is not installed ({root} does not exist); {INSTALL_HINT}. "
            f"Other offline choices: {OFFLINE_CHOICES}")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if names is not None:
        by_name = {p.name: p for p in files}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise CorpusUnavailableError(
                f"fortune file(s) {missing} not found in {root}; available: {sorted(by_name)}")
        files = [by_name[n] for n in names]
    if not files:
        raise CorpusUnavailableError(f"no fortune files in {root}; {INSTALL_HINT}")
    return files


def _fortunes(root, names) -> tuple[list[str], list[str]]:
    docs, topics = [], []
    for path in load_fortune_files(root, names):
        # Debian ships them as UTF-8; `replace` keeps one stray byte from failing a whole run.
        text = path.read_text(encoding="utf-8", errors="replace")
        found = [d.strip("\n") for d in re.split(r"(?m)^%[ \t]*$", text) if d.strip()]
        docs.extend(found)
        topics.extend([path.name] * len(found))
    return docs, topics


# ---- local files
def _read_jsonl(path: Path, topic_field: str | None = None) -> tuple[list[str], list[str]]:
    try:
        return _read_jsonl_lines(path, topic_field)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: a JSON line is nested too deeply") from None


def _read_jsonl_lines(path: Path, topic_field: str | None) -> tuple[list[str], list[str]]:
    docs, topics = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
            if topic_field is not None:
                topic = record.get(topic_field)
                if isinstance(topic, bool) or not isinstance(topic, (str, int)) or str(topic) == "":
                    raise ValueError(f"{path}:{lineno}: topic_field '{topic_field}' must be a non-empty string or "
                                     f"integer in every record, got {topic!r}")
            if record["text"].strip():
                docs.append(record["text"].strip())
                if topic_field is not None:
                    topics.append(str(record[topic_field]))
    return docs, topics


def _read_txt(path: Path, whole: bool = False) -> list[str]:
    """The documents of a ``.txt`` file: separated by ``<|endoftext|>`` where it has such lines, else
    by blank lines (or, with ``whole``, the whole file as one document)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if has_separator_lines(text):
        return split_stories(text)
    if whole:
        return [text.strip()] if text.strip() else []
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if d.strip()]


def load_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Documents from local files, in the order given (directories: files sorted by path).

    ``.txt``: documents separated by blank lines, or by ``<|endoftext|>`` in a file that has such
    lines (a document then keeps its blank lines). ``.jsonl``: one object per line, field ``text``.
    A directory: each ``.txt`` file (recursively) is one whole document, unless it has
    ``<|endoftext|>`` lines (then split at them); ``.jsonl`` files in it are read as above; other
    files are ignored.
    """
    return _files(paths, None)[0]


def _files(paths: Sequence[str | os.PathLike], topic_field: str | None) -> tuple[list[str], list[str] | None]:
    if not paths:
        raise ValueError("load_files needs at least one path")
    docs: list[str] = []
    topics: list[str] = []

    def add_jsonl(p: Path) -> None:
        d, t = _read_jsonl(p, topic_field)
        docs.extend(d)
        topics.extend(t)

    def add_text(p: Path, found: list[str]) -> None:
        if topic_field is not None and found:
            raise ValueError(f"{p}: topic_field '{topic_field}' needs JSONL files; a .txt file has no fields")
        docs.extend(found)

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not found:
                raise CorpusUnavailableError(f"directory {path} holds no .txt or .jsonl files")
            for p in found:
                if p.suffix == ".jsonl":
                    add_jsonl(p)
                else:
                    add_text(p, _read_txt(p, whole=True))
        elif path.is_file():
            if path.suffix == ".jsonl":
                add_jsonl(path)
            elif path.suffix == ".txt":
                add_text(path, _read_txt(path))
            else:
                raise ValueError(f"unsupported file type {path.suffix!r} for {path}; expected .txt or .jsonl")
        else:
            raise CorpusUnavailableError(f"data file or directory not found: {path}")
    return docs, (topics if topic_field is not None else None)


# ---- synthetic
def synthetic_documents(n: int, seed: int = 0, *, vocab: int = 256, min_words: int = 16,
                        max_words: int = 128) -> list[str]:
    """``n`` documents of pseudo-words drawn from a fixed sparse random Markov chain.

    Deterministic in ``(n, seed, ...)``; document ``i`` does not depend on ``n``. Each word has
    8 possible successors with Zipf-like probabilities, so there is structure for a model to
    learn (the loss of a working training loop goes well below the unigram entropy).
    """
    if n < 1 or vocab < 2 or not 1 <= min_words <= max_words:
        raise ValueError(f"synthetic_documents: need n >= 1, vocab >= 2, 1 <= min_words <= max_words; "
                         f"got n={n}, vocab={vocab}, min_words={min_words}, max_words={max_words}")
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "ze", "ba", "do", "fi", "gu"])
    parts = rng.integers(0, len(syllables), size=(vocab, 3))
    lengths = rng.integers(1, 4, size=vocab)
    words = np.array(["".join(syllables[parts[w, :lengths[w]]]) for w in range(vocab)], dtype=object)
    words[: min(4, vocab)] = [".", ",", "and", "the"][: min(4, vocab)]  # a few frequent "function words"
    successors = rng.integers(0, vocab, size=(vocab, 8))
    p = 1.0 / np.arange(1, 9)
    p /= p.sum()
    # One independent stream per document, so that document i is the same for every n.
    succ, word_list, cum = successors.tolist(), words.tolist(), np.cumsum(p)
    docs = []
    for i in range(n):
        r = np.random.default_rng([seed, i])
        length = int(r.integers(min_words, max_words + 1))
        choice = np.searchsorted(cum, r.random(length) * cum[-1], side="right").tolist()
        state = int(r.integers(0, vocab))
        out = []
        for c in choice:  # sequential by nature: each word depends on the previous one
            state = succ[state][c]
            out.append(word_list[state])
        docs.append(" ".join(out))
    return docs


def split_documents(docs: Sequence[str], n_train: int, n_val: int, seed: int,
                    name: str = "corpus") -> tuple[list[str], list[str]]:
    """Deterministic train/val subsets of ``docs``, chosen by a permutation seeded by ``seed``.

    The validation documents are taken first, so they do not change with ``n_train``. If the
    corpus has fewer than ``n_train + n_val`` documents, all of them are used, shared in the
    ratio ``n_train : n_val`` (at least one each), and a warning says so.
    """
    train, val = split_indices(len(docs), n_train, n_val, seed, name)
    return [docs[i] for i in train], [docs[i] for i in val]


def split_indices(total: int, n_train: int, n_val: int, seed: int,
                  name: str = "corpus") -> tuple[list[int], list[int]]:
    """The document indices :func:`split_documents` takes for train and val (so that
    per-document labels such as topics follow their documents)."""
    if n_train < 1 or n_val < 0:
        raise ValueError(f"split_documents: need n_train >= 1 and n_val >= 0, got {n_train}, {n_val}")
    if total < 1 + (n_val > 0):
        raise ValueError(f"{name} has {total} documents; need at least {1 + (n_val > 0)} for a train/val split")
    if total < n_train + n_val:
        v = min(n_val, max(1 if n_val else 0, round(total * n_val / (n_train + n_val))))
        warnings.warn(f"{name} has only {total} documents, fewer than train_subset_size + val_subset_size = "
                      f"{n_train} + {n_val}; using all of them: {total - v} train, {v} val", stacklevel=3)
        n_train, n_val = total - v, v
    perm = np.random.default_rng(seed).permutation(total)
    return perm[n_val:n_val + n_train].tolist(), perm[:n_val].tolist()
