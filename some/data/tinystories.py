"""TinyStories (``roneneldan/TinyStories``) from the HuggingFace hub or from a local copy, and the
``<|endoftext|>``-separated text format its ``.txt`` files use.

Where the stories come from (:func:`load_tinystories`):

- ``path`` (the ``DIR`` of ``"tinystories:DIR"``) or else ``$SOME_TINYSTORIES_DIR``: a directory
  holding a local copy in one of the forms the dataset is distributed in, read with no network:

  - ``parquet``: the Hub repository's shards ``data/train-*.parquet`` and
    ``data/validation-*.parquet`` (or ``train-*.parquet`` ... in ``DIR`` itself), column ``text``;
    needs ``pyarrow``; only the metadata and the row groups holding chosen stories are read;
  - ``datasets``: a HuggingFace ``datasets`` cache that ``datasets.load_dataset(
    "roneneldan/TinyStories")`` filled (``DIR/roneneldan___tiny_stories/``; ``DIR`` may also be
    ``HF_HOME``, holding ``datasets/``), read by ``load_dataset`` in offline mode; needs ``datasets``;
  - ``txt``: ``TinyStories-train.txt`` and ``TinyStories-valid.txt``, stories separated by
    ``<|endoftext|>`` lines (a story's own blank lines stay inside it); the story offsets of a
    large file are found once and cached, then only the chosen stories are read;
  - ``txt-v2``: ``TinyStoriesV2-GPT4-train.txt`` / ``-valid.txt`` in the same format: the second,
    GPT-4-only version, other (and more) stories than the forms above.

  A directory holding several forms is read in the first of that order unless ``form`` names one
  (the order does not depend on installed packages, so a run reads the same stories everywhere).
- neither: ``datasets.load_dataset("roneneldan/TinyStories", split=...)``, which downloads with the
  network, or reads HuggingFace's cache when ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``).

Every form gives the split's stories in their distributed order, and ``n`` of them are taken by
the same seeded permutation, so the parquet shards and the ``datasets`` cache of one revision give
the same stories as the hub.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorpusUnavailableError
from ..files import atomic_write, resolve_cache_dir
from .hints import OFFLINE_CHOICES

__all__ = ["STORY_SEPARATOR", "TINYSTORIES", "TINYSTORIES_DIR_ENV", "TINYSTORIES_FORMS", "has_separator_lines",
           "load_tinystories", "parse_tinystories_options", "split_stories", "story_spans"]

log = logging.getLogger(__name__)

TINYSTORIES = "roneneldan/TinyStories"
TINYSTORIES_DIR_ENV = "SOME_TINYSTORIES_DIR"
TINYSTORIES_FORMS = ("parquet", "datasets", "txt", "txt-v2")  # also the order in which a directory is searched
SPLITS = ("train", "validation")
# The separator of the distributed .txt files; also the tokenizer's end-of-text token, so no story keeps it.
STORY_SEPARATOR = "<|endoftext|>"
INDEX_CACHE_MIN_BYTES = 64 * 2**20  # smaller files are scanned faster than a cached index is found
_INDEX_VERSION = 1
_DATASETS_DIR = "roneneldan___tiny_stories"  # the directory load_dataset names its cache of TinyStories
_TXT_NAMES = {"txt": "TinyStories-{}.txt", "txt-v2": "TinyStoriesV2-GPT4-{}.txt"}
_TXT_SPLIT = {"train": "train", "validation": "valid"}
_PARQUET_PATTERNS = ("data/{}-*.parquet", "{}-*.parquet")
_SEPARATOR_LINE = re.compile(r"(?m)^[ \t]*" + re.escape(STORY_SEPARATOR) + r"[ \t]*\r?$")
_NON_BLANK = re.compile(rb"\S")

LOCAL_COPY_HINT = (f"give a local copy as 'tinystories:DIR' (or {TINYSTORIES_DIR_ENV}=DIR), DIR holding "
                   "TinyStories-train.txt and TinyStories-valid.txt, the parquet shards data/train-*.parquet and "
                   f"data/validation-*.parquet, or a `datasets` cache (DIR/{_DATASETS_DIR}/)")


# ---- the <|endoftext|> text format
def has_separator_lines(text: str) -> bool:
    """Whether ``text`` has a line that is ``<|endoftext|>`` alone (surrounding spaces allowed)."""
    return _SEPARATOR_LINE.search(text) is not None


def split_stories(text: str) -> list[str]:
    """The non-blank documents of an ``<|endoftext|>``-separated text, stripped, in order.

    Every ``<|endoftext|>`` ends a document (the token never stays inside one); blank lines do not.
    """
    return [s.strip() for s in text.replace("\r\n", "\n").split(STORY_SEPARATOR) if s.strip()]


def story_spans(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """``(K, 2)`` int64 byte ranges ``[start, end)`` of the K non-blank stories of an
    ``<|endoftext|>``-separated file (the documents of :func:`split_stories`, as offsets).

    The file is scanned through a memory map, never read whole into memory. For a file of at least
    ``INDEX_CACHE_MIN_BYTES`` the result is cached in ``<cache root>/corpora``, keyed by the
    file's path, size and modification time.
    """
    path = Path(path)
    st = path.stat()
    cache = None
    if st.st_size >= INDEX_CACHE_MIN_BYTES:
        key = hashlib.sha256(f"{_INDEX_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        cache = resolve_cache_dir(cache_dir) / "corpora" / f"tinystories-index-{key.hexdigest()[:16]}.npy"
        if cache.is_file():
            try:
                spans = np.load(cache, allow_pickle=False)
                if spans.ndim == 2 and spans.shape[1] == 2 and spans.dtype == np.int64:
                    return spans
                raise ValueError(f"shape {spans.shape}, dtype {spans.dtype}")
            except (OSError, ValueError) as e:  # a damaged cache is rebuilt, not fatal
                log.warning("ignoring unreadable story index %s (%s)", cache, e)
        log.info("indexing the stories of %s (once; cached in %s)", path, cache.parent)
    spans = _scan_stories(path, st.st_size)
    if cache is not None:
        atomic_write(cache, lambda f: np.save(f, spans))
    return spans


def _scan_stories(path: Path, size: int) -> np.ndarray:
    if size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    sep = STORY_SEPARATOR.encode()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)  # one forward pass: read ahead, drop pages behind
        cuts = np.fromiter((m.start() for m in re.finditer(re.escape(sep), mm)), dtype=np.int64)
        starts = np.concatenate([[0], cuts + len(sep)])
        ends = np.concatenate([cuts, [size]])
        keep = np.empty(len(starts), dtype=bool)
        for a in range(0, len(starts), 1 << 16):  # in blocks: no list of millions of Python ints
            block = zip(starts[a:a + (1 << 16)].tolist(), ends[a:a + (1 << 16)].tolist())
            keep[a:a + (1 << 16)] = [_NON_BLANK.search(mm, s, e) is not None for s, e in block]
    return np.stack([starts[keep], ends[keep]], axis=1)


# ---- the source's options
def parse_tinystories_options(arg: str) -> dict[str, Any]:
    """The options of ``tinystories:ARG``: ``{"path": DIR or None, "form": FORM or None}``.

    ``ARG`` is empty, ``DIR``, ``DIR,form=FORM`` or ``form=FORM`` (FORM one of
    ``TINYSTORIES_FORMS``); raises ``ValueError`` naming the rule otherwise.
    """
    rule = (f"expected 'tinystories' or 'tinystories:DIR' (a local copy), optionally with ',form=F' "
            f"(F one of {', '.join(TINYSTORIES_FORMS)})")
    paths, form = [], None
    for part in (p.strip() for p in arg.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if eq and key == "form":
            if value not in TINYSTORIES_FORMS:
                raise ValueError(f"bad 'tinystories' form {value!r}; {rule}")
            form = value
        elif eq and re.fullmatch(r"[A-Za-z_]+", key):
            raise ValueError(f"unknown 'tinystories' option {part!r}; {rule}")
        else:
            paths.append(part)
    if len(paths) > 1:
        raise ValueError(f"one directory at most, got {paths}; {rule}")
    return {"path": paths[0] if paths else None, "form": form}


# ---- loading
def load_tinystories(split: str, n: int, seed: int, *, path: str | os.PathLike | None = None,
                     form: str | None = None, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """``n`` stories drawn by a permutation seeded by ``seed`` from a split (``"train"`` or
    ``"validation"``) of TinyStories, stripped, in the permutation's order.

    From the local copy in ``path`` (else ``$SOME_TINYSTORIES_DIR``) in ``form`` (else the first
    form found, see the module docstring), or else from the HuggingFace hub (or its offline cache)
    through ``datasets``. ``cache_dir`` holds the story index of a large ``.txt`` file. A split
    with fewer than ``n`` stories gives all of them, with a warning. Raises
    :class:`CorpusUnavailableError` naming what is missing (a package, the network, a file) and the
    other ways to the corpus.
    """
    if split not in SPLITS:
        raise ValueError(f"TinyStories split must be one of {SPLITS}, got {split!r}")
    if form is not None and form not in TINYSTORIES_FORMS:
        raise ValueError(f"TinyStories form must be one of {TINYSTORIES_FORMS}, got {form!r}")
    directory = path if path is not None else os.environ.get(TINYSTORIES_DIR_ENV) or None
    if directory is None:
        if form is not None:
            raise CorpusUnavailableError(f"form={form} reads a local copy of TinyStories: give 'tinystories:DIR,"
                                         f"form={form}' or set {TINYSTORIES_DIR_ENV}=DIR")
        texts, where = _from_hub(split, n, seed), f"{TINYSTORIES} (hub or HuggingFace cache)"
    else:
        root = Path(directory).expanduser()
        form = _find_form(root, form)
        if form == "parquet":
            files = _parquet_files(root, split)
            texts, where = _from_parquet(files, split, n, seed, root), f"{files[0].parent} (parquet)"
        elif form == "datasets":
            texts, where = _from_datasets_cache(root, split, n, seed), f"{root} (datasets cache)"
        else:
            txt = root / _TXT_NAMES[form].format(_TXT_SPLIT[split])
            if not txt.is_file():
                raise CorpusUnavailableError(f"{root} holds no {split} split of TinyStories in the {form} form "
                                             f"({txt.name} is missing)")
            texts, where = _from_txt(txt, split, n, seed, cache_dir), str(txt)
    stories = [t.strip() for t in texts if t and t.strip()]
    log.info("TinyStories %s: %d stories from %s", split, len(stories), where)
    return stories


def _choose(total: int, n: int, seed: int, split: str, where: str) -> np.ndarray:
    """The chosen stories' indices, in the order of the seeded permutation."""
    if total < 1:
        raise CorpusUnavailableError(f"the TinyStories {split} split in {where} holds no stories")
    if n > total:
        warnings.warn(f"TinyStories split {split!r} has {total} stories, fewer than the {n} requested; using all",
                      stacklevel=4)
    return np.random.default_rng(seed).permutation(total)[: min(n, total)]


def _from_hub(split: str, n: int, seed: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusUnavailableError(
            f"the 'tinystories' source without a local copy needs the HuggingFace 'datasets' package (pip install "
            f"'some[hf]' or pip install datasets) and the network or its cache; or {LOCAL_COPY_HINT}; other offline "
            f"choices: {OFFLINE_CHOICES}") from None
    try:
        ds = datasets.load_dataset(TINYSTORIES, split=split)
    except Exception as e:  # noqa: BLE001 -- any hub/network/cache failure means "not available here"
        raise CorpusUnavailableError(
            f"could not load {TINYSTORIES} split {split!r} from the HuggingFace hub or its cache "
            f"({type(e).__name__}: {e}); without the network {LOCAL_COPY_HINT}, or use an offline source: "
            f"{OFFLINE_CHOICES}") from e
    order = _choose(len(ds), n, seed, split, TINYSTORIES)
    return list(ds.select(order.tolist())["text"])


# ---- the local forms
def _parquet_files(root: Path, split: str) -> list[Path]:
    for pattern in _PARQUET_PATTERNS:
        found = sorted(root.glob(pattern.format(split)))
        if found:
            return found
    return []


def _datasets_cache(root: Path) -> Path | None:
    """The ``cache_dir`` of ``load_dataset`` that holds TinyStories in or at ``root``, or None."""
    if root.name == _DATASETS_DIR and root.is_dir():
        return root.parent
    for candidate in (root, root / "datasets"):
        if (candidate / _DATASETS_DIR).is_dir():
            return candidate
    return None


def _has_form(root: Path, form: str) -> bool:
    if form == "parquet":
        return any(_parquet_files(root, s) for s in SPLITS)
    if form == "datasets":
        return _datasets_cache(root) is not None
    return any((root / _TXT_NAMES[form].format(s)).is_file() for s in _TXT_SPLIT.values())


def _find_form(root: Path, form: str | None) -> str:
    if not root.is_dir():
        raise CorpusUnavailableError(
            f"TinyStories directory not found: {root}" if not root.exists() else
            f"TinyStories' local copy must be a directory; {root} is not (give the directory that holds it)")
    found = [f for f in TINYSTORIES_FORMS if _has_form(root, f)]
    layouts = ("the parquet shards data/train-*.parquet and data/validation-*.parquet; a `datasets` cache "
               f"({_DATASETS_DIR}/); TinyStories-train.txt and TinyStories-valid.txt; or "
               "TinyStoriesV2-GPT4-train.txt and TinyStoriesV2-GPT4-valid.txt")
    if not found:
        raise CorpusUnavailableError(f"{root} holds no copy of TinyStories; expected one of: {layouts}. Other "
                                     f"offline choices: {OFFLINE_CHOICES}")
    if form is None:
        return found[0]
    if form not in found:
        raise CorpusUnavailableError(f"{root} holds no copy of TinyStories in the {form} form (it holds: "
                                     f"{', '.join(found)}); the forms: {layouts}")
    return form


def _other_forms(root: Path, form: str) -> str:
    others = [f for f in TINYSTORIES_FORMS if f != form and _has_form(root, f)]
    if others:
        return f"; or read the {others[0]} form that {root} also holds with ',form={others[0]}'"
    return "; or give a directory with TinyStories-train.txt and TinyStories-valid.txt (they need no package)"


def _from_parquet(files: list[Path], split: str, n: int, seed: int, root: Path) -> list[str]:
    if not files:
        raise CorpusUnavailableError(f"{root} holds no {split} split of TinyStories in the parquet form (expected "
                                     f"{' or '.join(p.format(split) for p in _PARQUET_PATTERNS)})")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusUnavailableError(f"reading TinyStories' parquet shards in {root} needs pyarrow (pip install "
                                     f"pyarrow){_other_forms(root, 'parquet')}") from None
    damaged = (OSError, ValueError, pa.ArrowException)  # ArrowInvalid is a ValueError, ArrowIOError an OSError

    def fail(file: Path, e: Exception) -> CorpusUnavailableError:
        return CorpusUnavailableError(f"{file}: not a readable parquet file ({type(e).__name__}: {e}); download it "
                                      f"again")

    shards, groups = [], []  # groups: (shard, row group) in order; their sizes tile the split's rows
    sizes: list[int] = []
    for file in files:
        try:
            shard = pq.ParquetFile(file)
            names = shard.schema_arrow.names
            rows = [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)]
        except damaged as e:
            raise fail(file, e) from None
        if "text" not in names:
            raise CorpusUnavailableError(f"{file}: no 'text' column (columns: {names}); not a TinyStories shard")
        shards.append(shard)
        groups.extend((len(shards) - 1, g) for g in range(len(rows)))
        sizes.extend(rows)
    order = _choose(sum(sizes), n, seed, split, str(files[0].parent))
    bounds = np.cumsum([0, *sizes])
    wanted = np.sort(order)
    group_of = np.searchsorted(bounds, wanted, side="right") - 1
    text: dict[int, str] = {}
    for g in np.unique(group_of).tolist():  # only the row groups that hold a chosen story, one at a time
        rows = wanted[group_of == g]
        s, rg = groups[g]
        try:
            column = shards[s].read_row_group(rg, columns=["text"]).column("text")
            text.update(zip(rows.tolist(), column.take(pa.array(rows - bounds[g])).to_pylist()))
        except damaged as e:
            raise fail(files[s], e) from None
    return [text[i] for i in order.tolist()]


@contextlib.contextmanager
def _datasets_offline(datasets: Any) -> Iterator[None]:
    """``datasets`` in offline mode for one call, as HF_DATASETS_OFFLINE=1 would set it at import:
    a local copy is read from its cache and never refreshed from the hub."""
    config = getattr(datasets, "config", None)
    saved = {k: getattr(config, k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, k)}
    for key in saved:
        setattr(config, key, True)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _from_datasets_cache(root: Path, split: str, n: int, seed: int) -> list[str]:
    cache = _datasets_cache(root)
    assert cache is not None  # _find_form found it
    try:
        import datasets
    except ImportError:
        raise CorpusUnavailableError(
            f"reading the `datasets` cache of TinyStories in {cache} needs the HuggingFace 'datasets' package (pip "
            f"install datasets){_other_forms(root, 'datasets')}") from None
    try:
        with _datasets_offline(datasets):
            ds = datasets.load_dataset(TINYSTORIES, split=split, cache_dir=str(cache))
    except Exception as e:  # noqa: BLE001 -- whatever the cache lacks, the corpus is not available here
        raise CorpusUnavailableError(f"could not read the {split} split of {TINYSTORIES} from the `datasets` cache "
                                     f"{cache} offline ({type(e).__name__}: {e})") from e
    order = _choose(len(ds), n, seed, split, str(cache))
    return list(ds.select(order.tolist())["text"])


def _from_txt(path: Path, split: str, n: int, seed: int, cache_dir) -> list[str]:
    spans = story_spans(path, cache_dir)
    order = _choose(len(spans), n, seed, split, str(path))
    text = {}
    with open(path, "rb") as f:
        for i in np.sort(order).tolist():  # in file order: one forward pass over the chosen stories
            start, end = spans[i].tolist()
            f.seek(start)
            text[i] = f.read(end - start).decode("utf-8", errors="replace").replace("\r\n", "\n")
    return [text[i] for i in order.tolist()]
