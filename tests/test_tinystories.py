"""Tests of TinyStories' local copies (some.data.tinystories): small files of each distributed form
in tmp_path (the <|endoftext|>-separated .txt files, the parquet shards, a `datasets` cache), the
subsets and splits they give, their errors, and the `<|endoftext|>` rule of the `files:` source.

The parquet tests need pyarrow, the real `datasets` cache test the `datasets` package (skipped
without them); a stand-in module checks the `datasets` path everywhere.
"""
import sys
import types
import warnings
from pathlib import Path

import pytest

from some import data as D
from some.data import tinystories as T

# Stories with their own blank lines (and one with three newlines and trailing spaces), as in the real files.
TRAIN = [f"Train story {i}. Lily went out.\n\n\"Hello,\" she said {i}.\n\n\nThe end {i}.  " for i in range(40)]
VALID = [f"Valid story {i}.\n\nShe smiled {i}." for i in range(12)]
V2_TRAIN = [f"GPT-4 story {i}.\n\nA second paragraph." for i in range(15)]
V2_VALID = [f"GPT-4 valid {i}." for i in range(5)]


def stripped(stories):
    return [s.strip() for s in stories]


@pytest.fixture(autouse=True)
def _no_env_copy(tmp_path, monkeypatch):
    """No $SOME_TINYSTORIES_DIR from the developer's shell; a private cache root."""
    monkeypatch.delenv(T.TINYSTORIES_DIR_ENV, raising=False)
    monkeypatch.setenv("SOME_CACHE_DIR", str(tmp_path / "cache"))


def write_txt(path: Path, stories, *, final_separator=True, crlf=False) -> Path:
    text = "\n<|endoftext|>\n".join(stories) + ("\n<|endoftext|>\n" if final_separator else "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((text.replace("\n", "\r\n") if crlf else text).encode())
    return path


def txt_copy(root: Path, *, v1=True, v2=False) -> Path:
    if v1:
        write_txt(root / "TinyStories-train.txt", TRAIN)
        write_txt(root / "TinyStories-valid.txt", VALID, final_separator=False, crlf=True)
    if v2:
        write_txt(root / "TinyStoriesV2-GPT4-train.txt", V2_TRAIN)
        write_txt(root / "TinyStoriesV2-GPT4-valid.txt", V2_VALID)
    return root


def parquet_copy(root: Path, *, row_group_size=4) -> Path:
    """The Hub's layout: data/train-0000k-of-00002-<hash>.parquet, data/validation-00000-of-00001-<hash>.parquet."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": TRAIN[:25]}), data / "train-00000-of-00002-2d5a1467.parquet",
                   row_group_size=row_group_size)
    pq.write_table(pa.table({"text": TRAIN[25:]}), data / "train-00001-of-00002-5852b56a.parquet",
                   row_group_size=row_group_size)
    pq.write_table(pa.table({"text": VALID}), data / "validation-00000-of-00001-869c898b.parquet",
                   row_group_size=row_group_size)
    return root


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


# ----------------------------------------------------------------------------- the <|endoftext|> format
def test_split_stories_keeps_blank_lines_and_drops_the_token():
    text = "One.\n\nStill one.\n<|endoftext|>\n\n  \n<|endoftext|>\r\nTwo.\r\n\r\nTwo again.<|endoftext|>Three\n"
    assert D.split_stories(text) == ["One.\n\nStill one.", "Two.\n\nTwo again.", "Three"]
    assert T.has_separator_lines("a\n  <|endoftext|> \nb") and T.has_separator_lines("a\r\n<|endoftext|>\r\n")
    assert not T.has_separator_lines("a <|endoftext|> b\n\nc")  # only a line of its own marks the format


def test_story_spans_match_split_stories(tmp_path):
    path = write_txt(tmp_path / "s.txt", ["", *TRAIN[:5], "   "], crlf=True)  # blank stories are no stories
    spans = T.story_spans(path)
    raw = path.read_bytes()
    assert [raw[s:e].decode().replace("\r\n", "\n").strip() for s, e in spans.tolist()] == stripped(TRAIN[:5])
    assert D.split_stories(raw.decode()) == stripped(TRAIN[:5])
    (tmp_path / "empty.txt").write_bytes(b"")
    assert T.story_spans(tmp_path / "empty.txt").shape == (0, 2)


# ----------------------------------------------------------------------------- the txt form
def test_txt_form_reads_the_stories_written_with_their_blank_lines(tmp_path):
    root = txt_copy(tmp_path / "ts")
    everything = quiet(D.load_tinystories, "train", 1000, 0, path=root)
    assert sorted(everything) == sorted(stripped(TRAIN))  # each story once, inner blank lines kept
    assert sorted(D.load_tinystories("validation", 12, 0, path=root)) == sorted(VALID)  # CRLF, no final separator
    with pytest.warns(UserWarning, match="has 40 stories, fewer than the 1000"):
        D.load_tinystories("train", 1000, 0, path=root)


def test_subsets_are_seeded_and_the_splits_are_the_distributed_ones(tmp_path):
    root = txt_copy(tmp_path / "ts")
    a = D.load_tinystories("train", 10, seed=3, path=root)
    assert len(a) == 10 and set(a) <= set(stripped(TRAIN))
    assert a == D.load_tinystories("train", 10, seed=3, path=root)  # deterministic
    assert a != D.load_tinystories("train", 10, seed=4, path=root)
    assert D.load_tinystories("train", 5, seed=3, path=root) == a[:5]  # the same permutation, a shorter prefix
    val = D.load_tinystories("validation", 4, seed=3, path=root)
    assert len(val) == 4 and set(val) <= set(VALID)


def test_txt_v2_is_read_when_asked_or_alone(tmp_path):
    both = txt_copy(tmp_path / "both", v2=True)
    assert set(D.load_tinystories("train", 5, 0, path=both)) <= set(stripped(TRAIN))  # version 1 first
    assert set(D.load_tinystories("train", 5, 0, path=both, form="txt-v2")) <= set(V2_TRAIN)
    only = txt_copy(tmp_path / "v2", v1=False, v2=True)
    assert sorted(D.load_tinystories("validation", 5, 0, path=only)) == sorted(V2_VALID)


def test_large_file_index_is_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(T, "INDEX_CACHE_MIN_BYTES", 0)
    root = txt_copy(tmp_path / "ts")
    first = D.load_tinystories("train", 8, 1, path=root)
    (index,) = (tmp_path / "cache" / "corpora").glob("tinystories-index-*.npy")
    calls = []
    real_scan = T._scan_stories
    monkeypatch.setattr(T, "_scan_stories", lambda *a: calls.append(a) or real_scan(*a))
    assert D.load_tinystories("train", 8, 1, path=root) == first and not calls  # read from the index
    index.write_bytes(b"damaged")
    assert D.load_tinystories("train", 8, 1, path=root) == first  # a damaged index is rebuilt
    assert len(calls) == 1 and "ignoring unreadable story index" in caplog.text
    write_txt(root / "TinyStories-train.txt", TRAIN[:30])  # another file (size/mtime): another index
    assert set(D.load_tinystories("train", 8, 1, path=root)) <= set(stripped(TRAIN[:30]))
    assert len(list((tmp_path / "cache" / "corpora").glob("tinystories-index-*.npy"))) == 2


# ----------------------------------------------------------------------------- the parquet form
def test_parquet_form_reads_the_shards_in_order(tmp_path):
    root = parquet_copy(tmp_path / "ts")
    assert sorted(quiet(D.load_tinystories, "train", 100, 0, path=root)) == sorted(stripped(TRAIN))
    assert sorted(D.load_tinystories("validation", 12, 0, path=root)) == sorted(VALID)
    # the shards in name order are the split's rows: the same stories as the txt file for the same seed
    txt = txt_copy(tmp_path / "txt")
    for seed in (0, 1):
        assert D.load_tinystories("train", 9, seed, path=root) == D.load_tinystories("train", 9, seed, path=txt)
    assert D.load_tinystories("validation", 3, 1, path=root) == D.load_tinystories("validation", 3, 1, path=txt)


def test_parquet_reads_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    root = parquet_copy(tmp_path / "ts", row_group_size=2)  # 20 row groups of train
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw))
    (story,) = D.load_tinystories("train", 1, 0, path=root)
    assert len(read) == 1 and story in stripped(TRAIN)


def test_a_directory_with_several_forms_prefers_parquet_unless_told(tmp_path, monkeypatch):
    root = txt_copy(parquet_copy(tmp_path / "ts"))
    monkeypatch.setattr(T, "_from_txt", lambda *a: pytest.fail("the txt form was read"))
    assert len(D.load_tinystories("train", 3, 0, path=root)) == 3
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # no pyarrow here: the error names both ways out
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(D.CorpusUnavailableError, match=r"pip install pyarrow.*form=txt"):
        D.load_tinystories("train", 3, 0, path=root)


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    root = parquet_copy(tmp_path / "ts")
    shard = root / "data" / "train-00001-of-00002-5852b56a.parquet"
    shard.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(D.CorpusUnavailableError, match=r"train-00001.*not a readable parquet file.*again"):
        D.load_tinystories("train", 3, 0, path=root)
    shard.write_bytes(b"")
    with pytest.raises(D.CorpusUnavailableError, match=r"train-00001.*not a readable parquet file"):
        D.load_tinystories("train", 3, 0, path=root)
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"story": ["x"]}), shard)  # a parquet file, but not of TinyStories
    with pytest.raises(D.CorpusUnavailableError, match="no 'text' column"):
        D.load_tinystories("train", 3, 0, path=root)


# ----------------------------------------------------------------------------- the datasets form
def _fake_datasets(monkeypatch, splits):
    calls = []
    mod = types.ModuleType("datasets")
    mod.config = types.SimpleNamespace(HF_HUB_OFFLINE=False, HF_DATASETS_OFFLINE=False)

    class Split:
        def __init__(self, texts):
            self.texts = texts

        def __len__(self):
            return len(self.texts)

        def select(self, indices):
            return Split([self.texts[i] for i in indices])

        def __getitem__(self, column):
            assert column == "text"
            return self.texts

    def load_dataset(name, split, cache_dir=None):
        calls.append((name, split, cache_dir, mod.config.HF_HUB_OFFLINE))
        return Split(splits[split])

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return mod, calls


def test_datasets_cache_is_read_offline_stand_in(tmp_path, monkeypatch):
    """The `datasets` path with a stand-in module: load_dataset gets the cache and runs offline."""
    home = tmp_path / "hf"
    (home / "datasets" / "roneneldan___tiny_stories").mkdir(parents=True)  # DIR may be HF_HOME
    mod, calls = _fake_datasets(monkeypatch, {"train": TRAIN, "validation": VALID})
    got = D.load_tinystories("validation", 5, 2, path=home)
    assert calls == [("roneneldan/TinyStories", "validation", str(home / "datasets"), True)]
    assert mod.config.HF_HUB_OFFLINE is False and mod.config.HF_DATASETS_OFFLINE is False  # restored
    assert len(got) == 5 and set(got) <= set(VALID)
    D.load_tinystories("train", 5, 2, path=home / "datasets" / "roneneldan___tiny_stories")  # or the folder itself
    assert calls[-1][2] == str(home / "datasets")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(D.CorpusUnavailableError, match=r"pip install datasets.*TinyStories-train.txt"):
        D.load_tinystories("train", 5, 2, path=home)


def test_real_datasets_cache_offline(tmp_path, monkeypatch):
    """A real `datasets` cache of TinyStories, made offline from local parquet shards, read with
    load_dataset in offline mode: the same stories as the parquet form."""
    datasets = pytest.importorskip("datasets")
    shards = parquet_copy(tmp_path / "TinyStories")
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    quiet(datasets.load_dataset, str(shards), cache_dir=str(cache))  # caches it as tiny_stories/
    (cache / "tiny_stories").rename(cache / "roneneldan___tiny_stories")  # as load_dataset("roneneldan/...") names it
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # load_tinystories turns it on itself
    for split, n, seed in (("train", 7, 0), ("validation", 4, 5)):
        got = D.load_tinystories(split, n, seed, path=cache)
        assert got == D.load_tinystories(split, n, seed, path=shards)
    assert datasets.config.HF_HUB_OFFLINE is False


# ----------------------------------------------------------------------------- where the copy is
def test_directory_without_any_form_names_the_forms(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "stories.txt").write_text("not TinyStories")
    with pytest.raises(D.CorpusUnavailableError, match=r"holds no copy of TinyStories.*parquet.*datasets.*"
                                                       r"TinyStories-train.txt"):
        D.load_tinystories("train", 3, 0, path=tmp_path / "other")
    with pytest.raises(D.CorpusUnavailableError, match="directory not found"):
        D.load_tinystories("train", 3, 0, path=tmp_path / "missing")
    root = txt_copy(tmp_path / "ts")
    with pytest.raises(D.CorpusUnavailableError, match=r"no copy of TinyStories in the parquet form.*holds: txt"):
        D.load_tinystories("train", 3, 0, path=root, form="parquet")
    (root / "TinyStories-valid.txt").unlink()
    with pytest.raises(D.CorpusUnavailableError, match="no validation split.*TinyStories-valid.txt is missing"):
        D.load_tinystories("validation", 3, 0, path=root)
    with pytest.raises(D.CorpusUnavailableError, match="must be a directory"):
        D.load_tinystories("train", 3, 0, path=root / "TinyStories-train.txt")


def test_hub_path_without_network_names_the_local_copy(tmp_path, monkeypatch):
    """No local copy and offline: load_dataset finds nothing, the error names the local options."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_DATASETS_OFFLINE=1 would
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(D.CorpusUnavailableError, match=r"from the HuggingFace hub or its cache.*'tinystories:DIR'.*"
                                                       r"SOME_TINYSTORIES_DIR=DIR.*fortunes"):
        D.load_tinystories("validation", 3, 0)


def test_hub_path_without_network_stand_in(monkeypatch):
    mod, _ = _fake_datasets(monkeypatch, {})
    mod.load_dataset = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("Couldn't reach the Hub"))
    with pytest.raises(D.CorpusUnavailableError, match=r"Couldn't reach the Hub.*tinystories:DIR.*parquet"):
        D.load_tinystories("train", 3, 0)
    with pytest.raises(D.CorpusUnavailableError, match=r"form=txt reads a local copy"):
        D.load_tinystories("train", 3, 0, form="txt")


def test_env_dir_and_source_argument_in_build_data(tmp_path, monkeypatch):
    env, arg = txt_copy(tmp_path / "env"), txt_copy(tmp_path / "arg", v1=False, v2=True)
    monkeypatch.setenv(T.TINYSTORIES_DIR_ENV, str(env))
    cfg = dict(seq_len=24, vocab_size=300, train_subset_size=20, val_subset_size=6, cache_dir=str(tmp_path / "c"))
    data = quiet(D.build_data, D.DataConfig(source="tinystories", **cfg))
    assert data.train.num_documents == 20 and data.val.num_documents == 6
    assert data.decode(data.train[0]["input_ids"]).startswith("Train story")  # train from the train file
    assert data.decode(data.val[0]["input_ids"]).startswith("Valid story")  # val from the valid file
    data = quiet(D.build_data, D.DataConfig(source=f"tinystories:{arg}", ood_source="tinystories", **cfg))
    assert data.decode(data.train[0]["input_ids"]).startswith("GPT-4 story")  # the argument wins over the env
    assert data.decode(data.ood[0]["input_ids"]).startswith("Valid story")  # OOD: the env copy's validation
    eval_data = quiet(D.build_eval_data, D.DataConfig(source=f"tinystories:{arg}", **cfg), data.tokenizer)
    assert eval_data.val.num_documents == 5  # all of the V2 valid file's stories (fewer than 6)


def test_parse_source_rules_for_tinystories():
    assert D.parse_source("tinystories") == ("tinystories", "")
    assert D.parse_tinystories_options("") == {"path": None, "form": None}
    assert D.parse_tinystories_options("/data/ts,form=txt") == {"path": "/data/ts", "form": "txt"}
    assert D.parse_tinystories_options("form=parquet") == {"path": None, "form": "parquet"}
    assert D.parse_tinystories_options("/data/a=b") == {"path": "/data/a=b", "form": None}  # a path, not an option
    for bad, match in (("tinystories:/a,/b", "one directory at most"),
                       ("tinystories:/a,form=zip", "bad 'tinystories' form"),
                       ("tinystories:/a,split=x", "unknown 'tinystories' option")):
        with pytest.raises(ValueError, match=match):
            D.parse_source(bad)
        with pytest.raises(ValueError, match=match):
            D.DataConfig(source=bad).validate()
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_tinystories("test", 3, 0)


# ----------------------------------------------------------------------------- files: with <|endoftext|>
def test_files_txt_with_endoftext_lines_splits_there(tmp_path):
    path = write_txt(tmp_path / "TinyStories-valid.txt", VALID)
    assert D.load_documents(f"files:{path}") == VALID  # blank lines stay inside each story
    d = tmp_path / "dir"
    write_txt(d / "a.txt", VALID[:3])
    (d / "b.txt").write_text("one document\n\nwith a blank line")
    assert D.load_files([d]) == VALID[:3] + ["one document\n\nwith a blank line"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("first\n\nstill first<|endoftext|>second\n<|endoftext|>\nthird\n")
    assert D.load_documents(f"files:{mixed}") == ["first\n\nstill first", "second", "third"]
    inline = tmp_path / "inline.txt"
    inline.write_text("a <|endoftext|> b\n\nc\n")  # no separator line: the blank-line rule
    assert D.load_documents(f"files:{inline}") == ["a <|endoftext|> b", "c"]
