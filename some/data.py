"""Data for SoME language models: corpora, a cached byte-level BPE tokenizer, datasets.

One call builds everything a training run needs::

    from some.data import DataConfig, build_data
    data = build_data(DataConfig(source="fortunes", ood_source="bible", seq_len=256, vocab_size=4096))
    data.train[0]        # {"input_ids": (S,) int64, "labels": (S,) int64, "attention_mask": (S,) bool}
    print(data.description)

Sources (``DataConfig.source`` / ``ood_source``):

- ``"tinystories"``: HuggingFace ``roneneldan/TinyStories`` (needs ``datasets`` and the
  network, or a populated HuggingFace cache), the reference corpus of SPEC §6;
- ``"fortunes"`` / ``"fortunes:NAME[,NAME]"``: the fortune-cookie files of the Debian packages
  ``fortunes-min`` and ``fortunes`` (one fortune per document), offline, in-domain;
- ``"bible"`` / ``"bible:chapter"`` / ``"bible:verses=N"``: the World English Bible (Debian
  ``sword-text-web``, read with ``diatheke``), passages of 8 verses (default), whole chapters,
  or N verses per document; offline, the out-of-domain corpus;
- ``"files:PATH[,PATH]"``: local ``.txt`` files (documents separated by blank lines), ``.jsonl``
  files (one JSON object per line with a ``text`` field), or directories (every ``.txt`` file
  is one document, every ``.jsonl`` file is read as above);
- ``"synthetic"`` / ``"synthetic:N"``: N documents of pseudo-words from a fixed random Markov
  chain, for fast tests and benchmarks.

``scripts/install_corpus.sh`` installs the Debian corpora. Every document list is
deterministic (sorted files, fixed order) and is split into train/val by ``DataConfig.seed``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:  # the tokenizers import stays lazy: `import some` must not need it
    from tokenizers import Tokenizer

__all__ = [
    "CorpusUnavailableError", "DataConfig", "LMData", "DocumentDataset", "build_data",
    "load_documents", "split_documents", "load_tinystories", "train_tokenizer", "resolve_cache_dir",
    "SOURCES", "PAD_TOKEN", "EOT_TOKEN", "IGNORE_INDEX",
]

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOT_TOKEN)  # ids 0 and 1, in this order
IGNORE_INDEX = -100  # label of positions that do not count in the loss (F.cross_entropy's default)

SOURCES = ("tinystories", "fortunes", "bible", "files:PATH[,PATH]", "synthetic")
OFFLINE_CHOICES = ("'fortunes' (in-domain) and 'bible' (out-of-domain), installed by "
                   "scripts/install_corpus.sh; 'files:PATH[,PATH]' (.txt/.jsonl); 'synthetic'")
INSTALL_HINT = "run scripts/install_corpus.sh (installs the Debian packages fortunes-min, fortunes, " \
               "sword-text-web and diatheke with apt-get)"

FORTUNES_DIR = Path("/usr/share/games/fortunes")
BIBLE_MODULE = "engWEB2015eb"  # the World English Bible module of Debian's sword-text-web
BIBLE_VERSES_PER_DOC = 8  # ~250 words, about the length of a TinyStories story
TINYSTORIES = "roneneldan/TinyStories"
SYNTHETIC_DOCS = 12000  # enough for the reference subset sizes (10000 + 2000)


class CorpusUnavailableError(RuntimeError):
    """A corpus cannot be loaded here: a package, a file or the network is missing.

    The message names what is missing and how to get it (or which offline sources exist).
    """


# --------------------------------------------------------------------------- cache dir
def resolve_cache_dir(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The root of the package's on-disk cache.

    ``cache_dir`` if given, else ``$SOME_CACHE_DIR``, else ``$XDG_CACHE_HOME/some``, else
    ``~/.cache/some``. Tokenizers live in ``<root>/tokenizers``, parsed corpora in
    ``<root>/corpora``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SOME_CACHE_DIR"):
        return Path(os.environ["SOME_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "some"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory + os.replace, so that a concurrent
    reader (another run sharing the cache) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- sources
def _parse_source(source: str) -> tuple[str, str]:
    """``"kind:arg"`` -> ``(kind, arg)``; validates the kind."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"data source must be a non-empty string, one of {SOURCES}; got {source!r}")
    kind, _, arg = source.strip().partition(":")
    kind = kind.lower()
    if kind not in ("tinystories", "fortunes", "bible", "files", "synthetic"):
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    if kind == "files" and not arg:
        raise ValueError("data source 'files:' needs paths, e.g. 'files:corpus.txt' or 'files:a.jsonl,b.jsonl'")
    if kind == "tinystories" and arg:
        raise ValueError(f"data source 'tinystories' takes no argument, got {source!r}")
    return kind, arg


def load_documents(source: str, *, cache_dir: Union[str, os.PathLike, None] = None) -> list[str]:
    """All documents of an offline source, in a fixed order (see the module docstring).

    ``"tinystories"`` is too large to load whole: use :func:`load_tinystories`.
    Raises :class:`CorpusUnavailableError` when the corpus is not installed or a file is missing,
    ``ValueError`` for a malformed source or file.
    """
    kind, arg = _parse_source(source)
    if kind == "fortunes":
        docs = load_fortunes(names=[a for a in arg.split(",") if a] or None)
    elif kind == "bible":
        docs = load_bible(**_parse_bible_arg(arg), cache_dir=cache_dir)
    elif kind == "files":
        docs = load_files([p for p in arg.split(",") if p])
    elif kind == "synthetic":
        try:
            n = int(arg) if arg else SYNTHETIC_DOCS
        except ValueError:
            raise ValueError(f"data source 'synthetic:N' needs an integer N, got {source!r}") from None
        docs = synthetic_documents(n)
    else:
        raise ValueError("load_documents cannot load 'tinystories' whole; use load_tinystories(split, n, seed) "
                         "or build_data(DataConfig(source='tinystories'))")
    if not docs:
        raise CorpusUnavailableError(f"data source {source!r} holds no (non-empty) documents")
    return docs


# ---- fortunes
def load_fortunes(fortunes_dir: Union[str, os.PathLike] = FORTUNES_DIR,
                  names: Optional[Sequence[str]] = None) -> list[str]:
    """One document per fortune, from the fortune files of ``fortunes_dir``.

    Reads only the top-level regular text files: the ``.dat`` index files are binary, the
    ``.u8`` names are symlinks to the same files, and offensive fortunes (Debian's
    ``fortunes-off``) live in the ``off/`` subfolder, which is skipped. ``names`` selects files
    (e.g. ``["cookie", "literature"]``). Files in sorted order, fortunes in file order.
    """
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
    docs = []
    for path in files:
        # Debian ships them as UTF-8; `replace` keeps one stray byte from failing a whole run.
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(d.strip("\n") for d in re.split(r"(?m)^%[ \t]*$", text) if d.strip())
    return docs


# ---- World English Bible via diatheke
_BIBLE_PARSER_VERSION = 2
# A verse line of `diatheke -f OSIS`: "<Book> <chapter>:<verse>: <OSIS body>". diatheke sometimes
# prints a leaked section/psalm title before the reference (a SWORD quirk: the last title seen
# sticks to later verses, even in other books), so the reference may follow two spaces or a tag;
# book names are words separated by single spaces (e.g. "II Kings", "Esther (Greek)").
_VERSE_RE = re.compile(r"(?:^|(?<=\s\s)|(?<=>))(?P<book>[A-Z][A-Za-z()]*(?: [A-Za-z()]+)*) "
                       r"(?P<chapter>\d+):(?P<verse>\d+): (?P<body>.*)$")


def _parse_bible_arg(arg: str) -> dict[str, Any]:
    if not arg:
        return {}
    if arg == "chapter":
        return {"verses_per_doc": None}
    m = re.fullmatch(r"verses=(\d+)", arg)
    if m and int(m.group(1)) >= 1:
        return {"verses_per_doc": int(m.group(1))}
    raise ValueError(f"bad 'bible' option {arg!r}; expected 'bible', 'bible:chapter' or 'bible:verses=N' (N >= 1)")


# diatheke appends the module's glossary to the last verse (Revelation 22:21); it is not Bible text.
_GLOSSARY_RE = re.compile(r"\s*The following words used in the World English Bible.*$", re.S)


def _osis_to_text(body: str) -> str:
    body = _GLOSSARY_RE.sub("", body)
    # The module's OSIS wraps words in <w>; in ~120 places two words touch ("<w>God</w><w>created</w>")
    # and plain-text output glues them ("Godcreated"), so separate them before dropping the tags.
    body = body.replace("</w><w>", "</w> <w>")
    body = re.sub(r"<[^>]*>", "", body)
    return " ".join(body.split())


def parse_diatheke_osis(output: str) -> list[tuple[str, int, int, str]]:
    """``(book, chapter, verse, text)`` for each non-empty verse of ``diatheke -f OSIS`` output.

    Leaked titles before a reference are dropped, and so are genuine psalm titles: diatheke
    does not let us tell them apart. Lines without a reference (the module name, the
    glossary appended after Revelation) are skipped.
    """
    verses = []
    for line in output.splitlines():
        m = _VERSE_RE.search(line)
        if m is None:
            continue
        text = _osis_to_text(m.group("body"))
        if text:
            verses.append((m.group("book"), int(m.group("chapter")), int(m.group("verse")), text))
    return verses


def _bible_verses(key: str, cache_dir: Union[str, os.PathLike, None]) -> list[tuple[str, int, int, str]]:
    """The verses of the WEB module in the diatheke range ``key``, parsed once and cached
    (diatheke takes ~10 s for the whole text)."""
    exe = shutil.which("diatheke")
    if exe is None:
        raise CorpusUnavailableError(
            f"the 'bible' corpus needs the program diatheke (Debian package 'diatheke'); {INSTALL_HINT}. "
            f"Other offline choices: {OFFLINE_CHOICES}")
    listing = subprocess.run([exe, "-b", "system", "-k", "modulelist"], capture_output=True, text=True,
                             timeout=60).stdout
    if BIBLE_MODULE not in listing:
        raise CorpusUnavailableError(
            f"the 'bible' corpus needs the SWORD module {BIBLE_MODULE} (Debian package 'sword-text-web'), "
            f"which diatheke does not list; {INSTALL_HINT}")
    # Key the cache by the module's files, so that an upgraded package is parsed again.
    fingerprint = hashlib.sha256(f"{_BIBLE_PARSER_VERSION}|{key}|{listing}".encode())
    for root in ("/usr/share/sword", os.path.expanduser("~/.sword")):
        for conf in sorted(Path(root, "mods.d").glob("*.conf")) if Path(root, "mods.d").is_dir() else []:
            fingerprint.update(conf.read_bytes())
        data = Path(root, "modules", "texts", "ztext", BIBLE_MODULE)
        for f in sorted(data.glob("*")) if data.is_dir() else []:
            st = f.stat()
            fingerprint.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    cache = resolve_cache_dir(cache_dir) / "corpora" / f"bible-{BIBLE_MODULE}-{fingerprint.hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            return [tuple(v) for v in json.loads(cache.read_text(encoding="utf-8"))]
        except (OSError, ValueError) as e:  # a damaged cache is rebuilt, not fatal
            log.warning("ignoring unreadable corpus cache %s (%s)", cache, e)
    log.info("reading the World English Bible with diatheke (once; cached in %s)", cache.parent)
    proc = subprocess.run([exe, "-b", BIBLE_MODULE, "-f", "OSIS", "-k", key],
                          capture_output=True, text=True, timeout=600)
    verses = parse_diatheke_osis(proc.stdout)
    if proc.returncode != 0 or not verses:
        raise CorpusUnavailableError(
            f"diatheke gave no verses of the module {BIBLE_MODULE} for the range {key!r} (exit code "
            f"{proc.returncode}, stderr: {proc.stderr.strip()[:300]!r}); check the range (e.g. 'Gen-Rev', "
            f"'Ruth') or reinstall: {INSTALL_HINT}")
    _atomic_write_text(cache, json.dumps(verses, ensure_ascii=False))
    return verses


def load_bible(verses_per_doc: Optional[int] = BIBLE_VERSES_PER_DOC, *, key: str = "Gen-Rev",
               cache_dir: Union[str, os.PathLike, None] = None) -> list[str]:
    """The World English Bible (with Deuterocanon) as documents, in canonical order.

    A document is ``verses_per_doc`` consecutive verses of one chapter (the last passage of a
    chapter may be shorter), or a whole chapter when ``verses_per_doc`` is None. ``key`` is a
    diatheke range: the whole text by default, e.g. ``"Matthew-Revelation"`` or ``"Ruth"``.
    """
    if verses_per_doc is not None and verses_per_doc < 1:
        raise ValueError(f"verses_per_doc must be >= 1 or None, got {verses_per_doc}")
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical order
    for book, chapter, _verse, text in _bible_verses(key, cache_dir):
        chapters.setdefault((book, chapter), []).append(text)
    docs = []
    for verses in chapters.values():
        step = verses_per_doc or len(verses)
        docs.extend(" ".join(verses[i:i + step]) for i in range(0, len(verses), step))
    return docs


# ---- local files
def _read_jsonl(path: Path) -> list[str]:
    docs = []
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
            if record["text"].strip():
                docs.append(record["text"].strip())
    return docs


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if d.strip()]


def load_files(paths: Sequence[Union[str, os.PathLike]]) -> list[str]:
    """Documents from local files, in the order given (directories: files sorted by path).

    ``.txt``: documents separated by blank lines. ``.jsonl``: one object per line, field ``text``.
    A directory: each ``.txt`` file (recursively) is one whole document; ``.jsonl`` files in it are
    read as above; other files are ignored.
    """
    if not paths:
        raise ValueError("load_files needs at least one path")
    docs: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not found:
                raise CorpusUnavailableError(f"directory {path} holds no .txt or .jsonl files")
            for p in found:
                if p.suffix == ".jsonl":
                    docs.extend(_read_jsonl(p))
                elif (text := p.read_text(encoding="utf-8", errors="replace").strip()):
                    docs.append(text)
        elif path.is_file():
            if path.suffix == ".jsonl":
                docs.extend(_read_jsonl(path))
            elif path.suffix == ".txt":
                docs.extend(_read_txt(path))
            else:
                raise ValueError(f"unsupported file type {path.suffix!r} for {path}; expected .txt or .jsonl")
        else:
            raise CorpusUnavailableError(f"data file or directory not found: {path}")
    return docs


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


# ---- TinyStories
def load_tinystories(split: str, n: int, seed: int) -> list[str]:
    """``n`` stories drawn (by a seeded permutation) from a split ("train" or "validation") of
    HuggingFace ``roneneldan/TinyStories``. Needs the ``datasets`` package and the network (or a
    populated HuggingFace cache); raises :class:`CorpusUnavailableError` otherwise."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise CorpusUnavailableError(
            "the 'tinystories' source needs the HuggingFace 'datasets' package (pip install 'some[hf]' or "
            f"pip install datasets) and network access; offline choices: {OFFLINE_CHOICES}") from None
    try:
        ds = datasets.load_dataset(TINYSTORIES, split=split)
    except Exception as e:  # noqa: BLE001 -- any hub/network/cache failure means "not available here"
        raise CorpusUnavailableError(
            f"could not load {TINYSTORIES} split {split!r} from the HuggingFace hub ({type(e).__name__}: {e}); "
            f"without network use an offline source: {OFFLINE_CHOICES}") from e
    total = len(ds)
    order = np.random.default_rng(seed).permutation(total)[: min(n, total)]
    if n > total:
        warnings.warn(f"TinyStories split {split!r} has {total} stories, fewer than the {n} requested; using all",
                      stacklevel=3)
    texts = ds.select(order.tolist())["text"]
    return [t.strip() for t in texts if t and t.strip()]


# --------------------------------------------------------------------------- split
def split_documents(docs: Sequence[str], n_train: int, n_val: int, seed: int,
                    name: str = "corpus") -> tuple[list[str], list[str]]:
    """Deterministic train/val subsets of ``docs``, chosen by a permutation seeded by ``seed``.

    The validation documents are taken first, so they do not change with ``n_train``. If the
    corpus has fewer than ``n_train + n_val`` documents, all of them are used, shared in the
    ratio ``n_train : n_val`` (at least one each), and a warning says so.
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"split_documents: need n_train >= 1 and n_val >= 0, got {n_train}, {n_val}")
    total = len(docs)
    if total < 1 + (n_val > 0):
        raise ValueError(f"{name} has {total} documents; need at least {1 + (n_val > 0)} for a train/val split")
    if total < n_train + n_val:
        v = min(n_val, max(1 if n_val else 0, round(total * n_val / (n_train + n_val))))
        warnings.warn(f"{name} has only {total} documents, fewer than train_subset_size + val_subset_size = "
                      f"{n_train} + {n_val}; using all of them: {total - v} train, {v} val", stacklevel=2)
        n_train, n_val = total - v, v
    perm = np.random.default_rng(seed).permutation(total)
    return [docs[i] for i in perm[n_val:n_val + n_train]], [docs[i] for i in perm[:n_val]]


# --------------------------------------------------------------------------- tokenizer
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


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, cache_dir: Union[str, os.PathLike, None] = None,
                    min_frequency: int = 2, use_cache: bool = True) -> "Tokenizer":
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
        _atomic_write_text(path, tok.to_str())
        log.info("trained tokenizer (%d tokens) cached in %s", tok.get_vocab_size(), path)
    return tok


# --------------------------------------------------------------------------- dataset
class DocumentDataset(Dataset):
    """Token sequences for next-token prediction, tokenized once and stored as one tensor.

    Each document is framed as ``<|endoftext|> doc``, so the first real token is predicted too,
    and ``<|endoftext|>`` also ends it: ``[eot] + doc + [eot]``.

    - unpacked (default): one document per sample, truncated/padded to ``seq_len + 1`` tokens;
    - ``packed``: the documents are concatenated into one stream ``eot d1 eot d2 eot ...``, cut into chunks of
      ``seq_len + 1`` tokens that overlap by one (each token is a target exactly once); the last
      chunk is padded.

    A sample is a dict of ``input_ids`` (S,) int64 (padding = ``pad_id``), ``labels`` (S,) int64
    (``input_ids`` shifted by one; :data:`IGNORE_INDEX` = -100 where the target is padding) and
    ``attention_mask`` (S,) bool (True at real input tokens; also the mask for routing statistics).
    Samples have a fixed length, so the default ``DataLoader`` collation stacks them.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], seq_len: int, *, pad_id: int, eot_id: int,
                 packed: bool = False):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if len(token_ids) == 0:
            raise ValueError("DocumentDataset needs at least one document")
        self.seq_len, self.pad_id, self.eot_id, self.packed = seq_len, pad_id, eot_id, packed
        self.num_documents = len(token_ids)
        width = seq_len + 1
        if packed:  # eot d1 eot d2 eot ...: one <|endoftext|> between neighbours
            eot = np.asarray([eot_id], dtype=np.int64)
            stream = np.concatenate([eot] + [a for ids in token_ids for a in (np.asarray(ids, dtype=np.int64), eot)])
            n = max(1, math.ceil((len(stream) - 1) / seq_len))
            rows = [stream[i * seq_len: i * seq_len + width] for i in range(n)]
        else:
            rows = [np.asarray([eot_id, *ids, eot_id], dtype=np.int64)[:width] for ids in token_ids]
        tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
        lengths = np.empty(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            lengths[i] = len(r)
        # int32 halves the memory of the reference runs' 10000 x 769 table; ids are < 2^31.
        self.tokens = torch.from_numpy(tokens.astype(np.int32))
        self.lengths = torch.from_numpy(lengths)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: "Tokenizer", seq_len: int, *,
                   packed: bool = False) -> "DocumentDataset":
        """Tokenize ``texts`` (fast batch encode) with a tokenizer from :func:`train_tokenizer`."""
        pad_id, eot_id = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
        if pad_id is None or eot_id is None:
            raise ValueError(f"the tokenizer lacks the special tokens {SPECIAL_TOKENS}; build it with train_tokenizer")
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return cls([e.ids for e in encodings], seq_len, pad_id=pad_id, eot_id=eot_id, packed=packed)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index].long()
        n = int(self.lengths[index])
        labels = row[1:].clone()
        labels[max(n - 1, 0):] = IGNORE_INDEX  # target j is real iff j + 1 < n
        return {"input_ids": row[:-1], "labels": labels,
                "attention_mask": torch.arange(self.seq_len) < n}

    @property
    def num_tokens(self) -> int:
        """Real target tokens (the tokens the loss averages over)."""
        return int((self.lengths - 1).clamp(min=0).sum())

    def __repr__(self) -> str:
        mode = "packed" if self.packed else "one document per sample"
        return (f"DocumentDataset({len(self)} samples of {self.seq_len} tokens, {mode}, "
                f"{self.num_documents} documents, {self.num_tokens} target tokens)")


# --------------------------------------------------------------------------- config + build
@dataclass
class DataConfig:
    """What :func:`build_data` builds. Defaults are the reference runs' (SPEC §6)."""

    source: str = "tinystories"  # see the module docstring
    ood_source: Optional[str] = None  # a held-out corpus of another domain (OOD perplexity), or None
    seq_len: int = 768  # tokens per sample (inputs and targets, each)
    vocab_size: int = 8192  # V: BPE vocabulary size, and the model's
    train_subset_size: int = 10000  # training documents
    val_subset_size: int = 2000  # validation documents
    ood_subset_size: Optional[int] = None  # OOD documents; None = val_subset_size
    packed: bool = False  # concatenate documents into full chunks instead of padding each
    seed: int = 0  # the train/val split and the subsets
    cache_dir: Optional[str] = None  # cache root; None = $SOME_CACHE_DIR or ~/.cache/some
    tokenizer_min_frequency: int = 2  # BPE merges need a pair seen at least this often

    def validate(self) -> "DataConfig":
        for name in ("seq_len", "vocab_size", "train_subset_size", "val_subset_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if self.ood_subset_size is not None and (not isinstance(self.ood_subset_size, int) or self.ood_subset_size < 1):
            raise ValueError(f"DataConfig.ood_subset_size must be a positive int or None, got {self.ood_subset_size!r}")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"DataConfig.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                             f"(byte-level BPE: 256 bytes + special tokens), got {self.vocab_size}")
        _parse_source(self.source)
        if self.ood_source is not None:
            _parse_source(self.ood_source)
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
    ood: Optional[DocumentDataset]
    tokenizer: "Tokenizer"
    vocab_size: int
    pad_id: int
    eot_id: int
    description: str
    config: DataConfig

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        """Text of a token sequence, without padding or special tokens."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)


def _select(source: str, n_train: int, n_val: int, seed: int, cache_dir) -> tuple[list[str], list[str]]:
    if _parse_source(source)[0] == "tinystories":
        # The official splits: train documents from "train", validation from "validation".
        return load_tinystories("train", n_train, seed), load_tinystories("validation", n_val, seed)
    return split_documents(load_documents(source, cache_dir=cache_dir), n_train, n_val, seed, name=repr(source))


def _select_ood(source: str, n: int, seed: int, cache_dir) -> list[str]:
    if _parse_source(source)[0] == "tinystories":
        return load_tinystories("validation", n, seed)
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
    train_docs, val_docs = _select(cfg.source, cfg.train_subset_size, cfg.val_subset_size, cfg.seed, cfg.cache_dir)
    if not val_docs:
        raise ValueError(f"no validation documents from {cfg.source!r}")
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cache_dir=cfg.cache_dir,
                                min_frequency=cfg.tokenizer_min_frequency)
    train = DocumentDataset.from_texts(train_docs, tokenizer, cfg.seq_len, packed=cfg.packed)
    val = DocumentDataset.from_texts(val_docs, tokenizer, cfg.seq_len, packed=cfg.packed)
    ood = None
    if cfg.ood_source is not None:
        n_ood = cfg.ood_subset_size or cfg.val_subset_size
        ood = DocumentDataset.from_texts(_select_ood(cfg.ood_source, n_ood, cfg.seed, cfg.cache_dir), tokenizer,
                                         cfg.seq_len, packed=cfg.packed)
    mode = "packed" if cfg.packed else "one document per sample"
    parts = [f"{cfg.source}: {train.num_documents} train / {val.num_documents} val documents "
             f"({train.num_tokens:,} / {val.num_tokens:,} tokens)"]
    if ood is not None:
        parts.append(f"OOD {cfg.ood_source}: {ood.num_documents} documents ({ood.num_tokens:,} tokens)")
    parts.append(f"byte-level BPE V={cfg.vocab_size} ({tokenizer.get_vocab_size()} learned), "
                 f"seq_len {cfg.seq_len}, {mode}, seed {cfg.seed}")
    description = "; ".join(parts)
    log.info("data: %s", description)
    return LMData(train=train, val=val, ood=ood, tokenizer=tokenizer, vocab_size=cfg.vocab_size,
                  pad_id=train.pad_id, eot_id=train.eot_id, description=description,
                  config=dataclasses.replace(cfg))
