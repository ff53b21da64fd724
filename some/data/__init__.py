"""Data for SoME language models: corpora, a cached byte-level BPE tokenizer, datasets.

One call builds everything a training run needs::

    from some.data import DataConfig, build_data
    data = build_data(DataConfig(source="fortunes", ood_source="bible", seq_len=256, vocab_size=4096))
    data.train[0]        # {"input_ids": (S,) int64, "labels": (S,) int64, "attention_mask": (S,) bool,
                         #  "topic_ids": (S,) int64 where the corpus has topics}
    data.topic_names     # ["art", "ascii-art", "computers", ...]: the fortune file of each topic id
    print(data.description)

The sources (``fortunes``, ``bible``, ``tinystories[:DIR]``, ``files:PATH``,
``synthetic``) are described in :mod:`some.data.corpora`; TinyStories' local copies (parquet
shards, a ``datasets`` cache, ``<|endoftext|>``-separated ``.txt`` files) in
:mod:`some.data.tinystories`.
"""
from ..errors import CorpusUnavailableError
from ..files import resolve_cache_dir
from .batches import collate, count_targets, epoch_order
from .build import DataConfig, EvalData, LMData, build_data, build_eval_data
from .corpora import (
    FORTUNES_DIR,
    OFFLINE_CHOICES,
    SOURCES,
    Corpus,
    bible_testament,
    load_bible,
    load_corpus,
    load_documents,
    load_files,
    load_fortunes,
    load_tinystories,
    parse_diatheke_osis,
    parse_source,
    split_documents,
    split_indices,
    synthetic_documents,
)
from .dataset import IGNORE_INDEX, DocumentDataset
from .tinystories import TINYSTORIES_DIR_ENV, TINYSTORIES_FORMS, parse_tinystories_options, split_stories
from .tokenizer import EOT_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, tokenizer_cache_key, train_tokenizer

__all__ = [
    "EOT_TOKEN",
    "FORTUNES_DIR",
    "IGNORE_INDEX",
    "OFFLINE_CHOICES",
    "PAD_TOKEN",
    "SOURCES",
    "SPECIAL_TOKENS",
    "TINYSTORIES_DIR_ENV",
    "TINYSTORIES_FORMS",
    "Corpus",
    "CorpusUnavailableError",
    "DataConfig",
    "DocumentDataset",
    "EvalData",
    "LMData",
    "bible_testament",
    "build_data",
    "build_eval_data",
    "collate",
    "count_targets",
    "epoch_order",
    "load_bible",
    "load_corpus",
    "load_documents",
    "load_files",
    "load_fortunes",
    "load_tinystories",
    "parse_diatheke_osis",
    "parse_source",
    "parse_tinystories_options",
    "resolve_cache_dir",
    "split_documents",
    "split_indices",
    "split_stories",
    "synthetic_documents",
    "tokenizer_cache_key",
    "train_tokenizer",
]
