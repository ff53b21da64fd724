"""Tokenized corpora on disk: a run's datasets are tokenized once and reused by
later runs (and by every run of a study) as memory-mapped numpy arrays.

An entry is ``<cache root>/tokens/<key>/`` with ``tokens.npy``, ``lengths.npy``,
``topics.npy`` (when the documents have topics) and ``meta.json``; the key is a
hash of the documents' text (and topics), the tokenizer (its JSON), seq_len and
packing, so that any change makes a new entry. Entries are written to a
temporary directory and renamed into place, so a reader never sees half of one;
a damaged entry is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..files import resolve_cache_dir
from .tokenizer import EOT_TOKEN, PAD_TOKEN

__all__ = ["CACHE_VERSION", "load_or_build", "token_cache_key"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # of the framing (DocumentDataset): a change makes new keys


def token_cache_key(texts: Sequence[str], tokenizer, seq_len: int, packed: bool,
                    topics: Sequence[int] | None) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{seq_len}|{packed}|".encode())
    h.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    if topics is not None:
        h.update(np.asarray(topics, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def _load(entry: Path) -> dict[str, np.ndarray] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        # copy-on-write maps: the pages are read from the file when touched, never written back
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="c") for name in meta["arrays"]}
        return {"meta": meta, **arrays}
    except (OSError, ValueError, KeyError) as e:
        log.warning("token cache entry %s is unreadable (%s); tokenizing again", entry, e)
        return None


def load_or_build(cls, texts: Sequence[str], tokenizer, seq_len: int, *, packed: bool,
                  topics: Sequence[int] | None, cache_dir) -> tuple:
    """``(dataset, from_cache)``: the dataset of ``texts`` from its cache entry, or
    tokenized now and stored (see the module docstring)."""
    root = resolve_cache_dir(cache_dir) / "tokens"
    key = token_cache_key(texts, tokenizer, seq_len, packed, topics)
    entry = root / key
    pad_id, eot_id = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
    if entry.is_dir():
        found = _load(entry)
        if found is not None:
            meta = found.pop("meta")
            return cls.from_arrays(found, seq_len, pad_id=pad_id, eot_id=eot_id, packed=packed,
                                   num_documents=meta["num_documents"]), True
    dataset = cls.from_texts(texts, tokenizer, seq_len, packed=packed, topics=topics)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        arrays = dataset.arrays()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps({"num_documents": dataset.num_documents, "seq_len": seq_len,
                                                   "packed": packed, "arrays": sorted(arrays)}))
        if entry.is_dir():  # a damaged entry
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only or full cache costs time, not the run
        log.warning("could not store tokenized data in %s (%s)", root, e)
    return dataset, False
