"""Text generation from a :class:`~some.nn.CausalLM`: greedy or sampled
(temperature, top-k, top-p), stopping at an end-of-sequence token.

    out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.9, seed=0)

With token-level routing each token's experts depend on that token alone, so
only the attention needs a cache (:class:`~some.nn.attention.KVCache`): the
prompt is encoded once, then one position per step. Sequence-level routing
routes every token by the mean query of the whole sequence, which changes as
the sequence grows; there the whole sequence is recomputed at each step, so
that generation matches the model's own forward.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["generate"]


def _check(name: str, value, ok: bool, want: str) -> None:
    if not ok:
        raise ValueError(f"generate: {name} must be {want}, got {value!r}")


def _next_token(logits: Tensor, *, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> Tensor:
    """(B,) the next token of each row from its last-position logits ``(B, V)``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int = 50, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, do_sample: bool = False, seed: int | None = None,
             eos_token_id: int | None = None, use_cache: bool | None = None) -> Tensor:
    """``(B, S + n)``: ``input_ids`` ``(B, S)`` (real tokens, no padding) continued by up to
    ``max_new_tokens`` tokens, greedy (``do_sample=False``) or sampled from the softmax of
    logits / ``temperature``, restricted to the ``top_k`` best and to the smallest set of
    probability ``top_p``. A row that produced ``eos_token_id`` is finished (it is filled
    with ``eos_token_id`` until every row is, or the tokens run out). ``seed`` makes the
    sampling reproducible without touching the global RNG. ``use_cache`` (default: with
    token-level routing) keeps the attention's keys and values instead of recomputing.
    The total length may not exceed ``config.seq_len``, the longest input the model takes."""
    cfg = model.config
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1 \
            or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("generate: input_ids must be a (B, S) integer tensor with S >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if bool(((input_ids < 0) | (input_ids >= cfg.vocab_size)).any()):
        raise ValueError(f"generate: input_ids must be token ids in 0..{cfg.vocab_size - 1}")
    _check("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 0, "an int >= 0")
    _check("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0, "> 0")
    _check("top_k", top_k, top_k is None or (isinstance(top_k, int) and top_k >= 1), "None or an int >= 1")
    _check("top_p", top_p, top_p is None or (isinstance(top_p, (int, float)) and 0 < top_p <= 1), "None or in (0, 1]")
    B, S = input_ids.shape
    if S + max_new_tokens > cfg.seq_len:
        raise ValueError(f"generate: prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"seq_len = {cfg.seq_len}")
    if use_cache is None:
        use_cache = cfg.decodes_with_cache
    device = model.lm_head.weight.device
    ids = input_ids.to(device=device, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, S + max_new_tokens, device) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step_input = ids
        for _ in range(max_new_tokens):
            logits = model(step_input if use_cache else ids, cache=cache).logits[:, -1]
            token = _next_token(logits, do_sample=do_sample, temperature=float(temperature), top_k=top_k,
                                top_p=top_p, generator=generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
            step_input = token.unsqueeze(1)
            if eos_token_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return ids
