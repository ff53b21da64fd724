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

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusUnavailableError
from ..files import atomic_write
from .cache import resolve_cache_dir

__all__ = [
    "FORTUNES_DIR", "OFFLINE_CHOICES", "SOURCES", "load_bible", "load_documents", "load_files", "load_fortunes",
    "load_tinystories", "parse_diatheke_osis", "parse_source", "split_documents", "synthetic_documents",
]

log = logging.getLogger(__name__)

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


def parse_source(source: str) -> tuple[str, str]:
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


def load_documents(source: str, *, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """All documents of an offline source, in a fixed order (see the module docstring).

    ``"tinystories"`` is too large to load whole: use :func:`load_tinystories`.
    Raises :class:`CorpusUnavailableError` when the corpus is not installed or a file is missing,
    ``ValueError`` for a malformed source or file.
    """
    kind, arg = parse_source(source)
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
def load_fortunes(fortunes_dir: str | os.PathLike = FORTUNES_DIR,
                  names: Sequence[str] | None = None) -> list[str]:
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


def _bible_verses(key: str, cache_dir: str | os.PathLike | None) -> list[tuple[str, int, int, str]]:
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
    atomic_write(cache, json.dumps(verses, ensure_ascii=False))
    return verses


def load_bible(verses_per_doc: int | None = BIBLE_VERSES_PER_DOC, *, key: str = "Gen-Rev",
               cache_dir: str | os.PathLike | None = None) -> list[str]:
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
    try:
        return _read_jsonl_lines(path, docs)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: a JSON line is nested too deeply") from None


def _read_jsonl_lines(path: Path, docs: list[str]) -> list[str]:
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


def load_files(paths: Sequence[str | os.PathLike]) -> list[str]:
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
