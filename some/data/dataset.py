"""Token sequences for next-token prediction: one padded document per sample, or packed."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from .token_cache import load_or_build
from .tokenizer import EOT_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["IGNORE_INDEX", "DocumentDataset"]

IGNORE_INDEX = -100  # label of positions that do not count in the loss (F.cross_entropy's default)


class DocumentDataset(Dataset):
    """Token sequences for next-token prediction, tokenized once and stored as one tensor.

    Each document is framed as ``<|endoftext|> doc``, so the first real token is predicted too,
    and ``<|endoftext|>`` also ends it: ``[eot] + doc + [eot]``.

    - unpacked (default): one document per sample, truncated/padded to ``seq_len + 1`` tokens;
    - ``packed``: the documents are concatenated into one stream ``eot d1 eot d2 eot ...``, cut into chunks of
      ``seq_len + 1`` tokens that overlap by one (each token is a target exactly once); the last
      chunk is padded.

    A sample is a dict of ``input_ids`` (S,) int64 (padding = ``pad_id``), ``labels`` (S,) int64
    (``input_ids`` shifted by one; :data:`IGNORE_INDEX` = -100 where the target is padding),
    ``attention_mask`` (S,) bool (True at real input tokens; also the mask for routing statistics)
    and, when the documents have topics, ``topic_ids`` (S,) int64 (the topic of each input
    token's document, -1 at padding; a packed sample may span several topics).
    Samples have a fixed length, so the default ``DataLoader`` collation stacks them.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], seq_len: int, *, pad_id: int, eot_id: int,
                 packed: bool = False, topics: Sequence[int] | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if len(token_ids) == 0:
            raise ValueError("DocumentDataset needs at least one document")
        if topics is not None and len(topics) != len(token_ids):
            raise ValueError(f"DocumentDataset: {len(topics)} topics for {len(token_ids)} documents")
        self.seq_len, self.pad_id, self.eot_id, self.packed = seq_len, pad_id, eot_id, packed
        self.num_documents = len(token_ids)
        width = seq_len + 1
        # each token's document topic (the <|endoftext|> before a document counts as the document's)
        doc_topic = None if topics is None else [np.full(len(ids) + 1, t, dtype=np.int64)
                                                 for ids, t in zip(token_ids, topics, strict=True)]
        topic_rows = None
        if packed:  # eot d1 eot d2 eot ...: one <|endoftext|> between neighbours
            eot = np.asarray([eot_id], dtype=np.int64)
            stream = np.concatenate([eot] + [a for ids in token_ids for a in (np.asarray(ids, dtype=np.int64), eot)])
            n = max(1, math.ceil((len(stream) - 1) / seq_len))
            rows = [stream[i * seq_len: i * seq_len + width] for i in range(n)]
            if doc_topic is not None:  # the final <|endoftext|> ends the last document
                topic_stream = np.concatenate(doc_topic + [doc_topic[-1][-1:]])
                topic_rows = [topic_stream[i * seq_len: i * seq_len + width] for i in range(n)]
        else:
            rows = [np.asarray([eot_id, *ids, eot_id], dtype=np.int64)[:width] for ids in token_ids]
            if doc_topic is not None:
                topic_rows = [np.full(len(r), t, dtype=np.int64) for r, t in zip(rows, topics, strict=True)]
        tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
        lengths = np.empty(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            lengths[i] = len(r)
        table = None
        if topic_rows is not None:
            table = np.full((len(rows), width), -1, dtype=np.int32)
            for i, r in enumerate(topic_rows):
                table[i, : len(r)] = r
        # int32 halves the memory of the reference runs' 10000 x 769 table; ids are < 2^31.
        self._set_arrays(tokens.astype(np.int32), lengths, table)

    def _set_arrays(self, tokens: np.ndarray, lengths: np.ndarray, topics: np.ndarray | None) -> None:
        self.tokens = torch.from_numpy(tokens)  # (rows, seq_len + 1) int32
        self.lengths = torch.from_numpy(lengths)  # (rows,) int64
        self.topics: torch.Tensor | None = None if topics is None else torch.from_numpy(topics)  # -1 at padding

    def arrays(self) -> dict[str, np.ndarray]:
        """The dataset's tables as numpy arrays (what the token cache stores)."""
        out = {"tokens": self.tokens.numpy(), "lengths": self.lengths.numpy()}
        if self.topics is not None:
            out["topics"] = self.topics.numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], seq_len: int, *, pad_id: int, eot_id: int, packed: bool,
                    num_documents: int) -> DocumentDataset:
        """A dataset over tables made before (:meth:`arrays`; numpy memory maps work)."""
        tokens, lengths = arrays["tokens"], arrays["lengths"]
        if tokens.ndim != 2 or tokens.shape[1] != seq_len + 1 or lengths.shape != (tokens.shape[0],):
            raise ValueError(f"token tables of shape {tokens.shape} / {lengths.shape} do not fit seq_len {seq_len}")
        self = cls.__new__(cls)
        self.seq_len, self.pad_id, self.eot_id, self.packed = seq_len, pad_id, eot_id, packed
        self.num_documents = num_documents
        self._set_arrays(tokens, lengths, arrays.get("topics"))
        return self

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Tokenizer, seq_len: int, *,
                   packed: bool = False, topics: Sequence[int] | None = None) -> DocumentDataset:
        """Tokenize ``texts`` (fast batch encode) with a tokenizer from :func:`train_tokenizer`;
        ``topics``: a topic id per text (each sample then carries ``topic_ids``)."""
        pad_id, eot_id = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(EOT_TOKEN)
        if pad_id is None or eot_id is None:
            raise ValueError(f"the tokenizer lacks the special tokens {SPECIAL_TOKENS}; build it with train_tokenizer")
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return cls([e.ids for e in encodings], seq_len, pad_id=pad_id, eot_id=eot_id, packed=packed, topics=topics)

    @classmethod
    def cached(cls, texts: Sequence[str], tokenizer: Tokenizer, seq_len: int, *, packed: bool = False,
               topics: Sequence[int] | None = None, cache_dir=None) -> tuple[DocumentDataset, bool]:
        """:meth:`from_texts` through the token cache (:mod:`some.data.token_cache`):
        the dataset and whether it came from the cache."""
        return load_or_build(cls, texts, tokenizer, seq_len, packed=packed, topics=topics, cache_dir=cache_dir)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[index].long()
        n = int(self.lengths[index])
        labels = row[1:].clone()
        labels[max(n - 1, 0):] = IGNORE_INDEX  # target j is real iff j + 1 < n
        item = {"input_ids": row[:-1], "labels": labels, "attention_mask": torch.arange(self.seq_len) < n}
        if self.topics is not None:  # the topic of each input token's document (-1 at padding)
            item["topic_ids"] = self.topics[index, :-1].long()
        return item

    @property
    def num_tokens(self) -> int:
        """Real target tokens (the tokens the loss averages over)."""
        return int((self.lengths - 1).clamp(min=0).sum())

    def __repr__(self) -> str:
        mode = "packed" if self.packed else "one document per sample"
        return (f"DocumentDataset({len(self)} samples of {self.seq_len} tokens, {mode}, "
                f"{self.num_documents} documents, {self.num_tokens} target tokens)")
