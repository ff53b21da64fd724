"""Tests of some.data: sources, split, tokenizer cache, DocumentDataset, build_data.

Fast by design: the synthetic source and tiny files; the Debian corpora only where installed
(skipped otherwise), and the Bible through a one-book range.
"""
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from some import data as D
from some.data import bible

HAVE_FORTUNES = (D.FORTUNES_DIR / "fortunes").is_file()
HAVE_DIATHEKE = shutil.which("diatheke") is not None and Path("/usr/share/sword/mods.d/engWEB2015eb.conf").is_file()
needs_fortunes = pytest.mark.skipif(not HAVE_FORTUNES, reason="fortunes not installed (scripts/install_corpus.sh)")
needs_bible = pytest.mark.skipif(not HAVE_DIATHEKE,
                                 reason="diatheke/sword-text-web not installed (scripts/install_corpus.sh)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache root, also as $SOME_CACHE_DIR, so tests never touch ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SOME_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    docs = D.synthetic_documents(200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return D.train_tokenizer(docs, 300, cache_dir=tmp_path_factory.mktemp("tok"))


def small_cfg(cache, **kw):
    base = dict(source="synthetic:400", seq_len=32, vocab_size=320, train_subset_size=300, val_subset_size=50,
                cache_dir=str(cache))
    base.update(kw)
    return D.DataConfig(**base)


# ----------------------------------------------------------------------------- sources
def test_synthetic_is_deterministic_and_prefix_stable():
    a, b, c = D.synthetic_documents(50), D.synthetic_documents(50), D.synthetic_documents(80)
    assert a == b
    assert c[:50] == a  # document i does not depend on n
    assert D.synthetic_documents(50, seed=1) != a
    assert all(16 <= len(d.split()) <= 128 for d in a)
    assert len(D.load_documents("synthetic:7")) == 7


def test_unknown_and_malformed_sources_raise():
    for bad in ("wikipedia", "", "files:", "synthetic:abc", "bible:verses=0", "bible:foo", "tinystories:a,b",
                "tinystories:x"):  # a well-formed tinystories source, but load_documents cannot load it whole
        with pytest.raises(ValueError):
            D.load_documents(bad)
    with pytest.raises(ValueError, match="unknown data source"):
        D.DataConfig(source="nope").validate()


def test_files_txt_jsonl_and_directory(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n   \nthird\n")
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two", "id": 3}) + "\n")
    assert D.load_documents(f"files:{txt}") == ["first doc\nstill first", "second doc", "third"]
    assert D.load_documents(f"files:{jl},{txt}")[:3] == ["json one", "json two", "first doc\nstill first"]
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_text("zed\n\nsame doc")  # a directory's .txt file is one document
    (d / "sub" / "a.txt").write_text("alpha")
    (d / "ignored.csv").write_text("x")
    assert D.load_files([d]) == ["alpha", "zed\n\nsame doc"]  # sorted paths: sub/a.txt < z.txt


def test_files_errors_name_the_problem(tmp_path):
    with pytest.raises(D.CorpusUnavailableError, match="not found"):
        D.load_documents(f"files:{tmp_path / 'missing.txt'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        D.load_documents(f"files:{bad}")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        D.load_documents(f"files:{bad}")
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_documents(f"files:{other}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.CorpusUnavailableError, match="no .txt or .jsonl"):
        D.load_documents(f"files:{tmp_path / 'empty'}")


def test_fortune_parser_skips_dat_symlinks_and_offensive(tmp_path):
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    (root / "b").write_text("Bee one.\n%\nBee two,\n  two lines.\n%\n")
    (root / "a").write_text("Aye.\n%\n%\n")  # an empty fortune is dropped
    (root / "a.dat").write_bytes(b"\x00\x02\x00\x00binary")
    (root / "a.u8").symlink_to(root / "a")
    (root / "off" / "rude").write_text("Offensive.\n%\n")
    assert D.load_fortunes(root) == ["Aye.", "Bee one.", "Bee two,\n  two lines."]
    assert D.load_fortunes(root, names=["b"]) == ["Bee one.", "Bee two,\n  two lines."]
    with pytest.raises(D.CorpusUnavailableError, match="available: \\['a', 'b'\\]"):
        D.load_fortunes(root, names=["nope"])


def test_missing_fortunes_names_the_fix(tmp_path):
    with pytest.raises(D.CorpusUnavailableError, match="install_corpus.sh"):
        D.load_fortunes(tmp_path / "nowhere")


@needs_fortunes
def test_installed_fortunes_corpus():
    docs = D.load_documents("fortunes")
    assert len(docs) > 10000  # fortunes + fortunes-min give ~15k fortunes
    assert docs == D.load_documents("fortunes")  # fixed order
    assert not any(d.strip() == "%" or "\n%\n" in d for d in docs)  # separators never leak into text
    assert len(D.load_documents("fortunes:riddles")) < len(docs)


def test_osis_parser_drops_leaked_titles_glossary_and_glues_words():
    out = "\n".join([
        'Genesis 1:1: <w>In</w> <w>the</w> <w>beginning</w>, <w>God</w><w>created</w> <w>it</w>.<milestone/>',
        "A Psalm by David.  II Kings 2:3: <w>Yes</w>,  <w>I</w>  know. <milestone type=\"line\"/>",
        '<title canonical="true">Title.</title> <l level="1" sID="x"/>Esther (Greek) 16:1: <milestone type="line"/>',
        '<title canonical="true">T.</title> <l sID="y"/>Song of Solomon 1:2: <w>Kiss</w>',
        "Revelation of John 22:21: <w>Amen</w>.      The following words used in the World English Bible (WEB)"
        " are not very common. Abba Abba is a word.",
        "(engWEB2015eb)",
    ])
    assert D.parse_diatheke_osis(out) == [
        ("Genesis", 1, 1, "In the beginning, God created it."),
        ("II Kings", 2, 3, "Yes, I know."),  # the leaked title before the reference is dropped
        ("Song of Solomon", 1, 2, "Kiss"),  # the empty Esther verse is skipped
        ("Revelation of John", 22, 21, "Amen."),
    ]


def test_missing_diatheke_names_the_fix(monkeypatch, cache):
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(D.CorpusUnavailableError, match=r"diatheke.*install_corpus.sh"):
        D.load_documents("bible")


@needs_bible
def test_bible_one_book_passages_and_cache(cache):
    chapters = D.load_bible(None, key="Ruth", cache_dir=cache)
    assert len(chapters) == 4 and chapters[0].startswith("In the days when the judges judged")
    passages = D.load_bible(2, key="Ruth", cache_dir=cache)
    assert " ".join(passages) == " ".join(chapters)  # passages tile the chapters
    assert len(passages) == sum((n + 1) // 2 for n in (22, 23, 18, 22))  # Ruth's verse counts
    assert list(cache.glob("corpora/bible-*.json"))  # parsed once, then read from the cache
    with pytest.raises(D.CorpusUnavailableError, match="no verses"):
        D.load_bible(key="Nonsense", cache_dir=cache)


def test_tinystories_without_datasets_names_offline_choices(monkeypatch):
    monkeypatch.delenv(D.TINYSTORIES_DIR_ENV, raising=False)  # the hub path, not a local copy
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(D.CorpusUnavailableError, match="fortunes.*bible"):
        D.build_data(D.DataConfig(source="tinystories"))


def test_tinystories_hub_failure_is_a_corpus_error(monkeypatch):
    monkeypatch.delenv(D.TINYSTORIES_DIR_ENV, raising=False)  # the hub path, not a local copy
    class FakeDatasets:
        @staticmethod
        def load_dataset(*a, **k):
            raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(D.CorpusUnavailableError, match="no network.*offline source"):
        D.load_tinystories("train", 10, 0)


class _FakeSplit:
    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def select(self, indices):
        return _FakeSplit([self.texts[i] for i in indices])

    def __getitem__(self, column):
        assert column == "text"
        return self.texts


def test_tinystories_uses_official_splits(monkeypatch, cache):
    monkeypatch.delenv(D.TINYSTORIES_DIR_ENV, raising=False)  # the hub path, not a local copy
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return _FakeSplit([f"{split} story {i}." for i in range(50)])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    sys.modules["datasets"].load_dataset = load_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny fake corpus cannot fill the vocabulary
        data = D.build_data(D.DataConfig(source="tinystories", ood_source="synthetic:20", seq_len=16,
                                         vocab_size=300, train_subset_size=30, val_subset_size=10))
    assert calls == [("roneneldan/TinyStories", "train"), ("roneneldan/TinyStories", "validation")]
    assert len(data.train) == 30 and len(data.val) == 10
    assert data.decode(data.val[0]["input_ids"]).startswith("validation story")
    assert D.load_tinystories("train", 5, seed=1) == D.load_tinystories("train", 5, seed=1)


# ----------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_val_stable():
    docs = [f"doc {i}" for i in range(100)]
    tr, va = D.split_documents(docs, 60, 20, seed=3)
    assert (tr, va) == D.split_documents(docs, 60, 20, seed=3)
    assert len(tr) == 60 and len(va) == 20 and not set(tr) & set(va)
    assert D.split_documents(docs, 30, 20, seed=3)[1] == va  # val does not move with train size
    assert D.split_documents(docs, 60, 20, seed=4)[1] != va


def test_split_of_a_small_corpus_uses_everything_and_warns():
    docs = [f"doc {i}" for i in range(12)]
    with pytest.warns(UserWarning, match="only 12 documents"):
        tr, va = D.split_documents(docs, 100, 20, seed=0)
    assert len(tr) + len(va) == 12 and len(va) == 2 and not set(tr) & set(va)
    with pytest.raises(ValueError, match="1 documents"):
        D.split_documents(["one"], 5, 5, seed=0)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_special_ids_and_cache(cache):
    docs = D.synthetic_documents(150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = D.train_tokenizer(docs, 400)
    files = list((cache / "tokenizers").glob("bpe-400-*.json"))
    assert len(files) == 1  # cached under $SOME_CACHE_DIR, no temp file left behind
    assert not list((cache / "tokenizers").glob(".*tmp"))
    assert tok.token_to_id(D.PAD_TOKEN) == 0 and tok.token_to_id(D.EOT_TOKEN) == 1
    assert 258 < tok.get_vocab_size() <= 400
    text = "ka lo, the mi. Ünïcödé ✓"  # byte-level: anything round-trips
    assert tok.decode(tok.encode(text).ids) == text
    mtime = files[0].stat().st_mtime_ns
    again = D.train_tokenizer(docs, 400)  # a cache hit: same tokenizer, file not rewritten
    assert again.to_str() == tok.to_str() and files[0].stat().st_mtime_ns == mtime
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D.train_tokenizer(docs[:100], 400)  # other texts -> another key
    assert len(list((cache / "tokenizers").glob("bpe-400-*.json"))) == 2


def test_tokenizer_warns_when_corpus_is_too_small(cache):
    with pytest.warns(UserWarning, match="too small to learn 5000"):
        tok = D.train_tokenizer(["tiny corpus"] * 3, 5000)
    assert tok.get_vocab_size() < 5000


def test_tokenizer_rejects_bad_vocab(cache):
    for bad in (100, 257, 1000.0, True):
        with pytest.raises(ValueError, match="vocab_size"):
            D.train_tokenizer(["x"], bad)
    with pytest.raises(ValueError, match="at least one"):
        D.train_tokenizer([], 1000)


def test_corrupt_tokenizer_cache_is_retrained(cache):
    docs = D.synthetic_documents(100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = D.train_tokenizer(docs, 300)
        (path,) = (cache / "tokenizers").glob("*.json")
        path.write_text("{ not a tokenizer")
        again = D.train_tokenizer(docs, 300)
    assert again.to_str() == tok.to_str()
    assert json.loads(path.read_text())  # rewritten with a valid file


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SOME_CACHE_DIR", str(tmp_path / "env"))
    assert D.resolve_cache_dir() == tmp_path / "env"
    assert D.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    monkeypatch.delenv("SOME_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.resolve_cache_dir() == tmp_path / "xdg" / "some"


# ----------------------------------------------------------------------------- dataset
def test_unpacked_sample_layout():
    ds = D.DocumentDataset([[5, 6, 7], list(range(10, 30))], seq_len=8, pad_id=0, eot_id=1)
    s = ds[0]  # framed: [1, 5, 6, 7, 1] then padding
    assert s["input_ids"].dtype == torch.int64 and s["labels"].dtype == torch.int64
    assert s["attention_mask"].dtype == torch.bool
    assert s["input_ids"].tolist() == [1, 5, 6, 7, 1, 0, 0, 0]
    assert s["labels"].tolist() == [5, 6, 7, 1, -100, -100, -100, -100]
    assert s["attention_mask"].tolist() == [True] * 5 + [False] * 3
    long = ds[1]  # truncated to seq_len + 1 = 9 tokens: no padding, no final eot
    assert long["input_ids"].tolist() == [1] + list(range(10, 17))
    assert long["labels"].tolist() == list(range(10, 18))
    assert bool(long["attention_mask"].all())
    assert ds.num_tokens == 4 + 8


def test_packed_chunks_cover_every_target_once():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ds = D.DocumentDataset(docs, seq_len=4, pad_id=0, eot_id=1, packed=True)
    stream = [1, 5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13, 1]
    targets = [t for i in range(len(ds)) for t in ds[i]["labels"].tolist() if t != -100]
    assert targets == stream[1:]  # chunks overlap by one token: each token is a target exactly once
    assert ds[0]["input_ids"].tolist() == stream[:4]
    assert len(ds) == 3 and ds[2]["attention_mask"].tolist() == [True, True, True, True]
    ds2 = D.DocumentDataset(docs, seq_len=5, pad_id=0, eot_id=1, packed=True)
    last = ds2[len(ds2) - 1]  # the last chunk is padded and masked
    assert last["labels"].tolist()[-1] == -100 and not bool(last["attention_mask"][-1])


def test_dataset_batches_with_default_collate(small_tokenizer):
    ds = D.DocumentDataset.from_texts(D.synthetic_documents(10), small_tokenizer, seq_len=16)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].shape == (4, 16)
    # labels are the inputs shifted by one wherever the target is real
    real = batch["labels"][:, :-1] != -100
    assert torch.equal(batch["labels"][:, :-1][real], batch["input_ids"][:, 1:][real])


def test_dataset_rejects_bad_input(small_tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        D.DocumentDataset([[1]], seq_len=0, pad_id=0, eot_id=1)
    with pytest.raises(ValueError, match="at least one document"):
        D.DocumentDataset([], seq_len=8, pad_id=0, eot_id=1)


# ----------------------------------------------------------------------------- build_data
def test_build_data_end_to_end(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = D.build_data(small_cfg(cache, ood_source="files:" + str(_ood_file(cache))))
    assert isinstance(data, D.LMData)
    assert len(data.train) == 300 and len(data.val) == 50 and data.ood is not None and len(data.ood) == 5
    assert data.vocab_size == 320 and data.pad_id == 0 and data.eot_id == 1
    for ds in (data.train, data.val, data.ood):
        assert int(ds.tokens.max()) < data.vocab_size
    assert "synthetic:400" in data.description and "OOD" in data.description
    # a sample decodes back to the start of one of the corpus' documents
    text = data.decode(data.train[0]["input_ids"])
    assert len(text) > 10 and any(doc.startswith(text) for doc in D.synthetic_documents(400))
    # same config -> same tokens; another seed -> another split
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = D.build_data(small_cfg(cache))
        other = D.build_data(small_cfg(cache, seed=1))
    assert torch.equal(same.train.tokens, data.train.tokens)
    assert not torch.equal(other.val.tokens[:, :8], data.val.tokens[:, :8])


def _ood_file(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "ood.txt"
    path.write_text("\n\n".join(f"Completely different text number {i}." for i in range(5)))
    return path


def test_build_data_packed_and_small_corpus_warning(cache):
    with pytest.warns(UserWarning, match="only 400 documents"):
        data = D.build_data(small_cfg(cache, packed=True, seq_len=256, train_subset_size=1000, val_subset_size=100))
    assert data.train.packed and data.train.num_documents + data.val.num_documents == 400
    assert len(data.train) < data.train.num_documents  # several documents per chunk
    assert bool(data.train[0]["attention_mask"].all())


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=0), "seq_len"),
    (dict(vocab_size=100), "vocab_size"),
    (dict(train_subset_size=-1), "train_subset_size"),
    (dict(ood_source="synthetic:400"), "ood_source"),
    (dict(ood_subset_size=0), "ood_subset_size"),
])
def test_build_data_rejects_bad_config(cache, kw, match):
    with pytest.raises(ValueError, match=match):
        D.build_data(small_cfg(cache, **kw))


@needs_fortunes
def test_fortunes_build(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = D.build_data(D.DataConfig(source="fortunes:riddles", ood_source="synthetic:50", seq_len=64,
                                         vocab_size=512, train_subset_size=100, val_subset_size=20,
                                         cache_dir=str(cache)))
    assert len(data.train) == 100 and len(data.val) == 20 and len(data.ood) == 20
    assert "?" in data.decode(data.train[0]["input_ids"]) or len(data.decode(data.train[1]["input_ids"])) > 0
