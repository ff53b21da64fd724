"""How specialized the experts are: mutual information between the expert a
token goes to and what the token is (its id, or its class in the text: a
syntax proxy) or where it comes from (its document's topic), as Fan et al.
(2024) compare token- and sequence-level routing."""
from __future__ import annotations

import unicodedata

import numpy as np

__all__ = ["TOKEN_CLASSES", "label_matrix", "label_specialization", "layer_specialization", "mutual_information_bits",
           "sequence_pairs", "specialization", "token_classes"]


# A partition of the vocabulary by what a token *is* in the text, for
# "what token types does each expert receive": few classes, so the plug-in
# mutual information is nearly unbiased even on a small validation set.
TOKEN_CLASSES = ("special", "whitespace", "punctuation", "digits", "word_start", "word_piece")


def _token_class(text: str) -> int:
    if text == "":
        return 0  # special tokens (pad, end of text) decode to nothing
    if text.isspace():
        return 1
    body = text.lstrip()
    # punctuation, symbols, controls, and the replacement character of a lone
    # byte of a multi-byte character (byte-level BPE has those tokens)
    if all(unicodedata.category(c)[0] in "PSZC" for c in text):
        return 2
    if any(c.isdigit() for c in body) and not any(c.isalpha() for c in body):
        return 3
    # a word start is a token that begins a word: after a space (BPE merges the
    # space into the token) — word pieces continue a word
    return 4 if text[0].isspace() else 5


def token_classes(tokenizer, vocab_size: int) -> np.ndarray:
    """``(vocab_size,)`` int64: the :data:`TOKEN_CLASSES` index of each token
    id, from its decoded text (ids the tokenizer does not have are 'special')."""
    out = np.zeros(vocab_size, dtype=np.int64)
    n = min(vocab_size, tokenizer.get_vocab_size())
    for i in range(n):
        out[i] = _token_class(tokenizer.decode([i], skip_special_tokens=True))
    return out


def mutual_information_bits(x: np.ndarray, y: np.ndarray) -> float:
    """Plug-in mutual information ``I(X; Y)`` in bits of paired samples of two
    non-negative integer variables (the empirical joint distribution)."""
    x, y = np.asarray(x, dtype=np.int64).ravel(), np.asarray(y, dtype=np.int64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must pair up, got {x.size} and {y.size} samples")
    if x.size == 0:
        raise ValueError("mutual information of zero samples is undefined")
    if x.min() < 0 or y.min() < 0:
        raise ValueError("x and y must be non-negative integer codes")
    _, xi = np.unique(x, return_inverse=True)  # compact codes: the joint table stays small
    _, yi = np.unique(y, return_inverse=True)
    nx, ny = int(xi.max()) + 1, int(yi.max()) + 1
    joint = np.bincount(xi * ny + yi, minlength=nx * ny).reshape(nx, ny).astype(np.float64) / x.size
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log2(joint[nz] / (px @ py)[nz])))
    return max(mi, 0.0)  # rounding can give -1e-17 for independent variables


def specialization(experts: np.ndarray, tokens: np.ndarray, classes: np.ndarray, *,
                   seed: int = 0) -> dict[str, float]:
    """How much an expert's id tells about the tokens it receives, over
    (token, selected expert) pairs:

    - ``mi_class_bits``: ``I(expert; token class)`` (:data:`TOKEN_CLASSES`),
      and ``class_entropy_bits`` = ``H(token class)``, its upper bound;
    - ``mi_token_bits``: ``I(expert; token id)``, plug-in, and
      ``mi_token_shuffled_bits``: the same with the token ids shuffled across
      the pairs (independence, same marginals). The plug-in estimate over many
      token ids is biased upward on finite data; the shuffled value measures
      that bias, and ``mi_token_excess_bits`` = the difference is the part
      that is routing, not sample size.
    """
    experts, tokens = np.asarray(experts), np.asarray(tokens)
    cls = np.asarray(classes)[tokens]
    shuffled = np.random.default_rng(seed).permutation(tokens)
    mi_token = mutual_information_bits(experts, tokens)
    mi_shuffled = mutual_information_bits(experts, shuffled)
    p = np.bincount(cls) / cls.size
    p = p[p > 0]
    return {
        "mi_class_bits": mutual_information_bits(experts, cls),
        "class_entropy_bits": float(-(p * np.log2(p)).sum()),
        "mi_token_bits": mi_token,
        "mi_token_shuffled_bits": mi_shuffled,
        "mi_token_excess_bits": mi_token - mi_shuffled,
        "pairs": int(experts.size),
    }


def _entropy_bits(labels: np.ndarray) -> float:
    p = np.bincount(labels) / labels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def label_matrix(experts: np.ndarray, labels: np.ndarray, num_experts: int, num_labels: int) -> np.ndarray:
    """``(num_experts, num_labels)`` counts of (expert, label) pairs."""
    experts, labels = np.asarray(experts, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    return np.bincount(experts * num_labels + labels, minlength=num_experts * num_labels).reshape(
        num_experts, num_labels)


def label_specialization(experts: np.ndarray, labels: np.ndarray, *, seed: int = 0, name: str = "topic",
                         groups: np.ndarray | None = None) -> dict[str, float]:
    """How much an expert's id tells about a label of what it receives (a topic, a
    token class), over (item, selected expert) pairs:

    - ``mi_{name}_bits``: plug-in ``I(expert; label)``; ``{name}_entropy_bits`` = ``H(label)``
      (its upper bound, reached when every expert receives one label only);
    - ``mi_{name}_shuffled_bits``: the same with the labels shuffled across the pairs
      (independence with the same marginals: the plug-in estimate's finite-sample bias), and
      ``mi_{name}_excess_bits`` = the difference, the bias-corrected value; with ``groups``
      (one id per pair; the pairs of a group share their label, e.g. the k experts of one
      sequence) the labels are permuted between groups instead, which keeps each group's
      pairs together: shuffling such pairs one by one breaks a structure the routing has by
      construction (k distinct experts per sequence) and biases the baseline upward;
    - ``{name}_purity``: the share of each expert's pairs from its most common label,
      averaged over experts weighted by their pairs (1 = every expert sees one label).
    """
    experts, labels = np.asarray(experts, dtype=np.int64).ravel(), np.asarray(labels, dtype=np.int64).ravel()
    if experts.shape != labels.shape:
        raise ValueError(f"experts and labels must pair up, got {experts.size} and {labels.size}")
    if experts.size == 0:
        raise ValueError(f"{name} specialization of zero pairs is undefined")
    mi = mutual_information_bits(experts, labels)
    rng = np.random.default_rng(seed)
    if groups is None:
        null_labels = rng.permutation(labels)
    else:
        groups = np.asarray(groups).ravel()
        if groups.shape != labels.shape:
            raise ValueError(f"groups must give one id per pair, got {groups.size} for {labels.size} pairs")
        ids, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
        if not np.array_equal(labels, labels[first][inverse]):
            raise ValueError("the pairs of a group must share their label")
        null_labels = labels[first][rng.permutation(ids.size)][inverse]
    shuffled = mutual_information_bits(experts, null_labels)
    m = label_matrix(experts, labels, int(experts.max()) + 1, int(labels.max()) + 1)
    return {
        f"mi_{name}_bits": mi,
        f"{name}_entropy_bits": _entropy_bits(labels),
        f"mi_{name}_shuffled_bits": shuffled,
        f"mi_{name}_excess_bits": mi - shuffled,
        f"{name}_purity": float(m.max(axis=1).sum() / m.sum()),
    }


def sequence_pairs(assignment: np.ndarray, sequence_ids: np.ndarray, topics: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(expert, topic) pairs per sequence for sequence-level routing: each sequence's
    experts (those of its first real token; every token of it has the same) with the
    sequence's topic (the most common topic of its tokens: a packed sample may span two)."""
    seqs, first = np.unique(sequence_ids, return_index=True)
    inverse = np.searchsorted(seqs, sequence_ids)
    n_topics = int(topics.max()) + 1
    votes = np.bincount(inverse * n_topics + topics, minlength=seqs.size * n_topics).reshape(seqs.size, n_topics)
    seq_topic = votes.argmax(axis=1)
    experts = assignment[first]  # (sequences, k)
    keep = experts >= 0
    return experts[keep].astype(np.int64), np.broadcast_to(seq_topic[:, None], experts.shape)[keep]


def _pair_sequences(assignment: np.ndarray, sequence_ids: np.ndarray) -> np.ndarray:
    """The sequence of each pair of :func:`sequence_pairs` (same order)."""
    seqs, first = np.unique(sequence_ids, return_index=True)
    rows = np.broadcast_to(np.arange(seqs.size)[:, None], assignment[first].shape)
    return rows[assignment[first] >= 0]


def layer_specialization(assignment: np.ndarray, token_ids: np.ndarray, classes: np.ndarray, *,
                         topics: np.ndarray | None = None, sequence_ids: np.ndarray | None = None,
                         sequence_level: bool = False, seed: int = 0) -> dict[str, float]:
    """Every specialization measure of one SoME layer from its per-token assignment
    ``(T, k)``: by token id and token class (:func:`specialization`), by topic over
    (token, expert) pairs and, for sequence-level routing, by topic over (sequence,
    expert) pairs (keys with ``_seq``)."""
    keep = assignment >= 0
    experts = assignment[keep].astype(np.int64)
    if experts.size == 0:
        return {}
    pair_tokens = np.broadcast_to(np.asarray(token_ids)[:, None], assignment.shape)[keep]
    out: dict[str, float] = dict(specialization(experts, pair_tokens, classes, seed=seed))
    if topics is not None:
        pair_topics = np.broadcast_to(np.asarray(topics)[:, None], assignment.shape)[keep]
        out.update(label_specialization(experts, pair_topics, seed=seed, name="topic"))
        if sequence_level and sequence_ids is not None:
            e, t = sequence_pairs(assignment, np.asarray(sequence_ids), np.asarray(topics))
            seq = label_specialization(e, t, seed=seed, name="topic",
                                       groups=_pair_sequences(assignment, np.asarray(sequence_ids)))
            out.update({k.replace("topic", "topic_seq", 1): v for k, v in seq.items()})
            out["sequences"] = int(np.unique(sequence_ids).size)
    return out
