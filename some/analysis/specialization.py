"""How specialized the experts are: mutual information between the expert a
token goes to and what the token is (its id, or its class in the text)."""
from __future__ import annotations

import unicodedata

import numpy as np

__all__ = ["TOKEN_CLASSES", "mutual_information_bits", "specialization", "token_classes"]


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
