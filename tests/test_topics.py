"""Topic labels and specialization by topic and syntax (issue 16): planted routings,
labels through tokenization, packing and data-parallel sharding, corpora topics, and
a run's specialization report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from some.analysis import label_matrix, label_specialization, layer_specialization, sequence_pairs
from some.data import (
    DataConfig,
    DocumentDataset,
    bible_testament,
    build_data,
    collate,
    load_corpus,
    train_tokenizer,
)
from some.engine.distributed import DistContext, shard_range
from some.runs import apply_overrides, get_preset, train


def entropy(labels) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


# ------------------------------------------------------------------ planted routings
def test_each_topic_to_its_own_expert_gives_the_topic_entropy():
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 5, size=4000)
    m = label_specialization(topics + 3, topics)  # expert = topic + 3: a bijection
    assert m["mi_topic_bits"] == pytest.approx(entropy(topics), abs=1e-12)
    assert m["mi_topic_bits"] == pytest.approx(m["topic_entropy_bits"], abs=1e-12)
    assert m["topic_purity"] == pytest.approx(1.0)
    assert m["mi_topic_excess_bits"] > 0.99 * m["topic_entropy_bits"]  # the shuffled baseline is ~0


def test_routing_independent_of_topic_has_excess_near_zero():
    rng = np.random.default_rng(1)
    topics = rng.integers(0, 40, size=50_000)
    experts = rng.integers(0, 64, size=50_000)
    m = label_specialization(experts, topics)
    assert m["mi_topic_bits"] > 0.02  # the plug-in estimate is biased upward (40 x 64 cells) ...
    assert abs(m["mi_topic_excess_bits"]) < 0.01  # ... and the shuffled baseline removes it


def test_label_matrix_and_errors():
    m = label_matrix(np.array([0, 0, 2, 1]), np.array([1, 1, 0, 2]), 3, 3)
    assert m.tolist() == [[0, 2, 0], [0, 0, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="pair up"):
        label_specialization(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="zero pairs"):
        label_specialization(np.array([], dtype=int), np.array([], dtype=int))


def test_sequence_pairs_use_each_sequences_experts_and_majority_topic():
    # 3 sequences: tokens of a sequence share their (k = 2) experts
    assignment = np.array([[1, 2], [1, 2], [1, 2], [0, 3], [0, 3], [4, -1]])
    seq = np.array([0, 0, 0, 1, 1, 2])
    topics = np.array([5, 5, 6, 2, 2, 1])  # sequence 0 spans two topics (packing): majority 5
    e, t = sequence_pairs(assignment, seq, topics)
    assert e.tolist() == [1, 2, 0, 3, 4] and t.tolist() == [5, 5, 2, 2, 1]


def test_layer_specialization_per_sequence_for_sequence_routing():
    rng = np.random.default_rng(2)
    n_seq, length = 300, 20
    seq_topic = rng.integers(0, 6, size=n_seq)
    seq = np.repeat(np.arange(n_seq), length)
    topics = seq_topic[seq]
    experts = np.stack([seq_topic[seq], (seq_topic[seq] + 1) % 6 + 6], axis=1)  # topic-routed, k = 2
    classes = np.zeros(100, dtype=np.int64)
    tokens = rng.integers(0, 100, size=seq.size)
    m = layer_specialization(experts, tokens, classes, topics=topics, sequence_ids=seq, sequence_level=True)
    assert m["mi_topic_seq_bits"] == pytest.approx(entropy(seq_topic), abs=1e-9)
    assert m["topic_seq_purity"] == pytest.approx(1.0) and m["topic_purity"] == pytest.approx(1.0)
    assert m["sequences"] == n_seq
    token_level = layer_specialization(experts, tokens, classes, topics=topics, sequence_ids=seq)
    assert "mi_topic_seq_bits" not in token_level and "mi_topic_bits" in token_level


def test_per_sequence_baseline_permutes_topics_between_sequences():
    """Every sequence gets the same k = 4 distinct experts whatever its topic (a collapsed
    sequence router): I = 0 exactly, and so must be its baseline. Shuffling the pairs one by one
    (the old baseline) breaks the k-distinct-experts structure and reads about 0.1 bits here,
    which made the excess negative."""
    rng = np.random.default_rng(0)
    n_seq, length = 200, 8
    seq = np.repeat(np.arange(n_seq), length)
    topics = rng.integers(0, 40, size=n_seq)[seq]
    experts = np.broadcast_to(np.array([3, 7, 11, 12]), (seq.size, 4))
    classes = np.zeros(50, dtype=np.int64)
    tokens = rng.integers(0, 50, size=seq.size)
    m = layer_specialization(experts, tokens, classes, topics=topics, sequence_ids=seq, sequence_level=True)
    assert m["mi_topic_seq_bits"] == pytest.approx(0.0, abs=1e-12)
    assert m["mi_topic_seq_shuffled_bits"] == pytest.approx(0.0, abs=1e-12)
    assert m["mi_topic_seq_excess_bits"] == pytest.approx(0.0, abs=1e-12)
    e, t = sequence_pairs(experts, seq, topics)
    assert label_specialization(e, t)["mi_topic_shuffled_bits"] > 0.05  # what the pair shuffle reads
    # topic-independent random sequence routing: the group baseline tracks the plug-in bias
    rand = np.stack([rng.choice(64, size=4, replace=False) for _ in range(n_seq)])[seq]
    r = layer_specialization(rand, tokens, classes, topics=topics, sequence_ids=seq, sequence_level=True)
    assert r["mi_topic_seq_bits"] > 0.5 and abs(r["mi_topic_seq_excess_bits"]) < 0.25 * r["mi_topic_seq_bits"]


def test_group_baseline_needs_one_label_per_group():
    with pytest.raises(ValueError, match="share their label"):
        label_specialization(np.array([0, 1, 2]), np.array([0, 1, 1]), groups=np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="one id per pair"):
        label_specialization(np.array([0, 1]), np.array([0, 1]), groups=np.array([0]))


# ------------------------------------------------------------------ labels through the data
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [f"document number {i} about topic {i % 3} " * (1 + i % 4) for i in range(60)]
    return train_tokenizer(docs, 300, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("packed", [False, True])
def test_topic_ids_follow_every_token_of_their_document(tokenizer, packed):
    texts = [f"document number {i} about topic {i % 3} " * (1 + i % 4) for i in range(20)]
    topics = [i % 3 + 10 * (i % 2) for i in range(20)]
    seq_len = 24
    ds = DocumentDataset.from_texts(texts, tokenizer, seq_len, packed=packed, topics=topics)
    ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    # the stream of (token, topic) pairs each document contributes: its leading <|endoftext|> and its tokens
    want = [(tok, t) for doc, t in zip(ids, topics) for tok in [ds.eot_id, *doc]]
    got = []
    for i in range(len(ds)):
        item = ds[i]
        real = item["attention_mask"]
        assert torch.all(item["topic_ids"][~real] == -1)  # padding has no topic
        got += list(zip(item["input_ids"][real].tolist(), item["topic_ids"][real].tolist()))
    if packed:  # each token of the stream (with its final <|endoftext|>) is an input once, in order
        assert got == want + [(ds.eot_id, topics[-1])]
    else:  # one document per sample (eot doc eot), truncated to seq_len
        pos = 0
        for doc, t in zip(ids, topics):
            n = min(len(doc) + 2, seq_len)
            assert got[pos:pos + n] == [(tok, t) for tok in [ds.eot_id, *doc, ds.eot_id]][:n]
            pos += n
        assert pos == len(got)


def test_topic_ids_survive_data_parallel_sharding(tokenizer):
    texts = [f"text {i} " * 5 for i in range(12)]
    topics = list(range(12))
    ds = DocumentDataset.from_texts(texts, tokenizer, 16, topics=topics)
    batch_idx = torch.tensor([7, 3, 11, 0, 5, 9, 2])
    seen = []
    for rank in range(3):
        ctx = DistContext(rank=rank, world_size=3, local_rank=rank, backend="gloo")
        mine = shard_range(len(batch_idx), ctx)
        b = collate(ds, batch_idx[mine.start:mine.stop], torch.device("cpu"))
        for row, i in zip(b["topic_ids"], batch_idx[mine.start:mine.stop].tolist()):
            real = row[row >= 0]
            assert real.numel() > 0 and torch.all(real == topics[i])
            seen.append(i)
    assert sorted(seen) == sorted(batch_idx.tolist())


def test_jsonl_topic_field_and_build_data(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"story {i} " + ("sea ship wave " if i % 2 else "tree leaf root ") * 4,
             "topic": "sea" if i % 2 else "forest"} for i in range(80)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(f"files:{path},topic_field=topic")
    assert corpus.topics == [r["topic"] for r in rows] and corpus.topic_kind == "field 'topic'"
    assert load_corpus(f"files:{path}").topics is None
    data = build_data(DataConfig(source=f"files:{path},topic_field=topic", seq_len=32, vocab_size=300,
                                 train_subset_size=60, val_subset_size=20, cache_dir=str(tmp_path / "c")))
    assert data.topic_names == ["forest", "sea"]
    for ds in (data.train, data.val):
        for i in range(len(ds)):
            item = ds[i]
            text = data.decode(item["input_ids"][item["attention_mask"]])
            topic = data.topic_names[int(item["topic_ids"][0])]
            assert ("sea ship" in text) == (topic == "sea")  # the label followed its document through the split
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: topic_field 'topic'"):
        load_corpus(f"files:{bad},topic_field=topic")
    txt = tmp_path / "a.txt"
    txt.write_text("plain text")
    with pytest.raises(ValueError, match="needs JSONL files"):
        load_corpus(f"files:{txt},topic_field=topic")


def test_bible_testaments():
    assert bible_testament("Genesis") == "Old Testament"
    assert bible_testament("Sirach") == "Deuterocanon"
    assert bible_testament("Revelation of John") == "New Testament"
    with pytest.raises(ValueError, match="bad 'bible' option"):
        load_corpus("bible:topic=chapter")


def test_offline_corpora_topics():
    try:
        fortunes = load_corpus("fortunes")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fortunes not installed: {e}")
    assert fortunes.topic_kind == "fortune file" and len(fortunes.topics) == len(fortunes.documents)
    assert {"art", "computers", "science"} <= set(fortunes.topics)
    one = load_corpus("fortunes:science")
    assert set(one.topics) == {"science"}
    try:
        bible = load_corpus("bible:verses=2,topic=testament")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bible not installed: {e}")
    assert set(bible.topics) == {"Old Testament", "Deuterocanon", "New Testament"}
    books = load_corpus("bible:verses=2")
    assert len(set(books.topics)) == 80 and books.topics[0] == "Genesis" and books.topics[-1] == "Revelation of John"


# ------------------------------------------------------------------ a run
def test_run_writes_specialization_with_topics(tmp_path):
    path = tmp_path / "docs.jsonl"
    rng = np.random.default_rng(0)
    words = {"sea": "ship wave salt tide shore", "forest": "tree leaf root moss bark", "city": "road car tower"}
    rows = [{"text": " ".join(rng.choice(words[t].split(), size=30)), "topic": t}
            for t in rng.choice(list(words), size=120)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = apply_overrides(get_preset("tiny-test"), [f"data_source=files:{path},topic_field=topic",
                                                    "routing_level=sequence", "train_subset_size=96",
                                                    "val_subset_size=24", f"cache_dir={tmp_path / 'c'}"])
    out = tmp_path / "run"
    train(cfg, out, progress=False, echo=False)
    spec = json.loads((out / "specialization.json").read_text())
    assert spec["topic_names"] == ["city", "forest", "sea"] and spec["routing_level"] == "sequence"
    for m in spec["layers"]:
        assert m["topic_entropy_bits"] <= math.log2(3) + 1e-9
        assert 0 <= m["mi_topic_seq_bits"] <= m["topic_entropy_bits"] + 1e-9
        assert m["sequences"] == 24
    assert (out / "topic_heatmap.png").stat().st_size > 5000 and (out / "class_heatmap.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Expert specialization" in report and "topic_heatmap.png" in report
    assert "I(expert; topic) per sequence" in report
