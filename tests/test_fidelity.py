"""Each ablation method computes what its authors' code computes.

For every method a study compares, this file holds a literal re-implementation
of the authors' own function, written here from reading their public source
(repository, file and commit named beside each; no file of theirs is vendored),
and feeds it the same seeded inputs as ``some``'s op or layer, in float64, with
both ops backends: values and gradients must agree to rounding.

The deliberate differences (documented in the README's "Fidelity to the
original methods") are set aside by the inputs: top-any is run with ``k = N``
(``some`` caps the fired experts at ``k``; DynMoE has no cap) and its threshold
is given to DynMoE as ``G·τ`` (DynMoE compares ``σ(s/τ)`` with ``σ(G/τ)``,
``some`` with ``σ(G)``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from some import SoMELayer, ops
from some.construction import ClusterResult, experts_from_dense, load_into_layer
from some.nn import SoMELayerConfig

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expert(x, w1, b1, w2, b2):
    """One expert, ``W2 GELU(W1 x + b1) + b2`` (the FFN every method's experts are)."""
    return F.gelu(x @ w1.T + b1) @ w2.T + b2


def _experts(N, d, h, seed):
    g = _gen(seed)
    return (torch.randn(N, h, d, generator=g, dtype=DT) / d**0.5, torch.randn(N, h, generator=g, dtype=DT) * 0.1,
            torch.randn(N, d, h, generator=g, dtype=DT) / h**0.5, torch.randn(N, d, generator=g, dtype=DT) * 0.1)


# =====================================================================================
# DynMoE (Guo et al. 2024): top-any gating and the adaptive process.
# LINs-lab/DynMoE, DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py @ 4927232 (HEAD of the
# stored snapshot): GAMoEGateBackward, GAMoEGateT.forward, topanygating_opt, TopKGate's
# routing records, MOELayer.remove_experts / add_experts / adaptive_update_experts.
# =====================================================================================


class _DynMoESign(torch.autograd.Function):
    """GAMoEGateBackward: sign() forward, the identity backward (straight through)."""

    @staticmethod
    def forward(ctx, scores):
        return torch.sign(scores)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def dynmoe_gate(x, sim_matrix, gates, experts_mask, logit_scale, training):
    """GAMoEGateT.forward: the fired mask (T, E) and the per-token count top_k."""
    logits = torch.sigmoid(torch.matmul(F.normalize(x, dim=1), F.normalize(sim_matrix, dim=0)) * logit_scale)
    logits = logits * experts_mask
    gates = torch.sigmoid(gates * logit_scale)
    if training:
        logits = F.relu(logits - gates)
        logits = _DynMoESign.apply(logits)
        top_k = torch.sum(logits > 0, dim=1).to(torch.int)
    else:
        new_logits = F.relu(logits - gates)
        new_logits = _DynMoESign.apply(new_logits)
        top_k = torch.sum(new_logits > 0, dim=1).to(torch.int)
        mask = (torch.sum(new_logits, dim=1) == 0).to(torch.int).repeat(logits.shape[1]).reshape(logits.shape[1], -1).T
        max_index = torch.argmax(logits, dim=1)
        one_hot = F.one_hot(max_index, num_classes=logits.shape[1])
        logits = mask * one_hot + new_logits
        top_k = torch.max(top_k, torch.ones(top_k.shape).to(top_k.device)).to(torch.int)
    return logits, top_k


def dynmoe_combine_weights(logits, K):
    """topanygating_opt's gates: the mask divided by the (detached, integer) fired count."""
    gates = logits / torch.clamp(K, min=1).unsqueeze(1)
    return gates


def dynmoe_layer(q, x, keys, G, tau, experts, training):
    """MOELayer.forward (dropless: no token over capacity) with the GAMoE gate: the
    gate reads ``q`` (``some``'s router output), the experts read ``x``."""
    w1, b1, w2, b2 = experts
    N = keys.shape[0]
    logits, K = dynmoe_gate(q, keys.T, G * tau, torch.ones(N, dtype=q.dtype), 1.0 / tau, training)
    combine = dynmoe_combine_weights(logits, K)  # (T, E)
    outs = torch.stack([_expert(x, w1[e], b1[e], w2[e], b2[e]) for e in range(N)], dim=1)  # (T, E, d)
    return (combine.unsqueeze(-1) * outs).sum(1)


def some_top_any(q, x, keys, G, tau, experts, k, training):
    r = ops.route(q, keys, k, tau, "top_any", thresholds=G, fallback_top1=not training)
    return ops.experts(x, r.indices, r.gates, *experts)


def compare_top_any(training: bool, tau: float, dtype=DT) -> dict[str, tuple]:
    """(ours, DynMoE's) output and gradients on a seeded batch with tokens that fire 0, 1 and several experts."""
    T, d, N, h = 40, 6, 5, 7
    g = _gen(11)
    q0, x0 = torch.randn(T, d, generator=g, dtype=DT), torch.randn(T, d, generator=g, dtype=DT)
    keys = torch.randn(N, d, generator=g, dtype=DT)
    G0 = torch.rand(N, generator=g, dtype=DT) * 1.4 - 0.2
    experts = tuple(t.to(dtype) for t in _experts(N, d, h, 12))
    fired = (F.normalize(q0, dim=1) @ F.normalize(keys, dim=1).T / tau > G0).sum(1)
    assert (fired == 1).any() and (fired > 1).any() and (fired == 0).any()  # every case is in the batch

    def run(fn):
        q, x, G = (t.to(dtype).clone().requires_grad_() for t in (q0, x0, G0))
        y = fn(q, x, G)
        (y * torch.linspace(-1, 1, d, dtype=dtype)).sum().backward()
        return y.detach(), q.grad, x.grad, G.grad

    # (the DynMoE function takes some's G and gives its own code G·τ: autograd carries the chain rule)
    theirs = run(lambda q, x, G: dynmoe_layer(q, x, keys.to(dtype), G, tau, experts, training))
    ours = run(lambda q, x, G: some_top_any(q, x, keys.to(dtype), G, tau, experts, N, training))
    return dict(zip(("y", "dL/dq", "dL/dx", "dL/dG"), zip(ours, theirs)))


def _assert_pairs(pairs: dict[str, tuple], rtol=1e-10, atol=1e-12) -> None:
    for name, (ours, theirs) in pairs.items():
        assert ours is not theirs and ours.data_ptr() != theirs.data_ptr(), name  # two computations, not one
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_dynmoe_top_any_values_and_gradients(backend, training, tau):
    pairs = compare_top_any(training, tau)
    _assert_pairs(pairs)
    if training:
        assert pairs["dL/dG"][0].abs().sum() > 0  # (at evaluation a fallback's gate is 1: no gradient in either)


def test_dynmoe_top_any_single_fired_expert_sends_gradient(backend):
    """The issue's minimal input: one token, one fired expert. DynMoE's gate m/1
    keeps d(mask) (straight through); m/Σm would make it exactly 0."""
    q = torch.tensor([[1.0, 0.2]], dtype=DT, requires_grad=True)
    x = torch.tensor([[0.5, -1.0]], dtype=DT)
    keys = torch.eye(2, dtype=DT)
    G = torch.tensor([0.0, 0.5], dtype=DT, requires_grad=True)
    eye = torch.eye(2, dtype=DT).unsqueeze(0).expand(2, 2, 2).contiguous()
    experts = (eye, torch.zeros(2, 2, dtype=DT), eye.clone(), torch.zeros(2, 2, dtype=DT))
    some_top_any(q, x, keys, G, 1.0, experts, 2, True).sum().backward()
    torch.testing.assert_close(q.grad, torch.tensor([[0.0014, -0.0070]], dtype=DT), atol=1e-4, rtol=0)
    torch.testing.assert_close(G.grad[0], torch.tensor(-0.0468, dtype=DT), atol=1e-4, rtol=0)
    assert G.grad[1] == 0  # expert 1 did not fire


class DynMoEAdaptive:
    """The adaptive process of DynMoE on one gate: TopKGate.forward's routing records
    (training) and MOELayer.adaptive_update_experts (remove, then add)."""

    def __init__(self, keys: torch.Tensor, G: torch.Tensor, experts_mask: torch.Tensor, logit_scale: float):
        self.sim_matrix = keys.T.clone()  # (d, E)
        self.gates = G.clone()
        self.experts_mask = experts_mask.clone()
        self.logit_scale = logit_scale
        self.routing_records = None
        self.sample_records = None

    def forward(self, input_fp32):
        logits, _ = dynmoe_gate(input_fp32, self.sim_matrix, self.gates, self.experts_mask, self.logit_scale, True)
        current_routing_records = torch.sum(torch.sign(logits), dim=0)
        self.routing_records = current_routing_records if self.routing_records is None \
            else self.routing_records + current_routing_records
        sample_routing = torch.sum(torch.sign(logits), dim=1)
        samples_not_routing = input_fp32[sample_routing == 0]
        if len(samples_not_routing) > 0:
            current_sample_records = torch.sum(samples_not_routing, dim=0)
            self.sample_records = current_sample_records if self.sample_records is None \
                else self.sample_records + current_sample_records
        elif self.sample_records is None:
            self.sample_records = torch.zeros(input_fp32[0].shape)

    def remove_experts(self):
        if self.routing_records is None:
            return
        self.experts_mask = self.experts_mask * torch.sign(self.routing_records)

    def add_experts(self):
        if sum(self.sample_records) == 0:
            return
        normalized_sample_records = self.sample_records / torch.norm(self.sample_records)
        non_active_experts = np.argwhere(self.experts_mask.cpu().numpy() == 0)
        if len(non_active_experts) > 0:
            new_expert_index = non_active_experts[0][0]
            self.experts_mask[new_expert_index] = 1.0
            self.sim_matrix[:, new_expert_index] = normalized_sample_records
            self.gates[new_expert_index] = 0.0

    def adaptive_update_experts(self):
        self.remove_experts()
        self.add_experts()


def _adaptive_layer(keys, thresholds, top_k, initial_experts, tau=1.0, dtype=DT):
    N, d = keys.shape
    cfg = SoMELayerConfig(d_model=d, num_experts=N, d_ffn=3, top_k=top_k, gating="top_any", router="linear",
                          temperature=tau, adaptive=True, adaptive_window=1, initial_experts=initial_experts,
                          alpha=0.0, beta=0.0, delta=0.0)
    layer = SoMELayer(cfg, dtype=dtype)
    with torch.no_grad():
        layer.router.net.weight.copy_(torch.eye(d, dtype=dtype))
        layer.router.net.bias.zero_()
        layer.keys.copy_(keys)
        layer.thresholds.copy_(thresholds)
    return layer.train()


def test_dynmoe_adaptive_process_issue_input():
    """The issue's input: expert 1 never fires and is removed; tokens 1 and 2 fire
    nothing; the added expert (slot 1, the first free one) is keyed at the normalized
    sum of their *raw* gate inputs and its threshold restarts at 0."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    thr = torch.tensor([0.5, 5.0, 0.0], dtype=DT)
    tokens = torch.tensor([[1.0, 0.1], [-0.1, 1.0], [-3.0, 0.0]], dtype=DT)
    theirs = DynMoEAdaptive(keys, thr, torch.tensor([1.0, 1.0, 0.0], dtype=DT), 1.0)
    theirs.forward(tokens)
    theirs.adaptive_update_experts()
    layer = _adaptive_layer(keys, thr, top_k=1, initial_experts=2)
    layer(tokens)
    layer.update_keys()
    assert layer.expert_active.tolist() == (theirs.experts_mask > 0).tolist() == [True, True, False]
    torch.testing.assert_close(layer.keys[1], theirs.sim_matrix[:, 1])
    torch.testing.assert_close(layer.keys[1], torch.tensor([-0.952, 0.307], dtype=DT), atol=1e-3, rtol=0)
    torch.testing.assert_close(layer.thresholds.detach(), theirs.gates)
    assert layer.thresholds[1] == 0


def _adaptive_windows(dtype=DT):
    """Four seeded windows of the process on random inputs, ours beside DynMoE's (no token fires
    more than k, so the cap changes nothing); yields the largest key difference of each window
    after checking that the active sets and thresholds agree."""
    N, d, T = 6, 4, 12
    g = _gen(5)
    keys = F.normalize(torch.randn(N, d, generator=g, dtype=DT), dim=1).to(dtype)
    thr = (torch.rand(N, generator=g, dtype=DT) * 0.3 + 0.65).to(dtype)
    theirs = DynMoEAdaptive(keys, thr, torch.tensor([1.0] * 4 + [0.0] * 2, dtype=dtype), 1.0)
    layer = _adaptive_layer(keys, thr, top_k=2, initial_experts=4, dtype=dtype)
    changed = 0
    for _ in range(4):
        tokens = (torch.randn(T, d, generator=g, dtype=DT) * 2).to(dtype)
        theirs.routing_records = theirs.sample_records = None
        theirs.forward(tokens)
        fired, _ = dynmoe_gate(tokens, theirs.sim_matrix, theirs.gates, theirs.experts_mask, 1.0, True)
        assert fired.sum(1).max() <= 2
        before = layer.expert_active.clone()
        theirs.adaptive_update_experts()
        layer(tokens)
        layer.update_keys()
        changed += int((before != layer.expert_active).any())
        assert layer.expert_active.tolist() == (theirs.experts_mask > 0).tolist()
        assert torch.equal(layer.thresholds.detach(), theirs.gates.to(layer.thresholds.dtype))
        active = layer.expert_active
        yield float((layer.keys[active] - F.normalize(theirs.sim_matrix.T[active], dim=1)).abs().max())
    assert changed > 0  # the process did something to compare


def test_dynmoe_adaptive_process_seeded_windows():
    assert max(_adaptive_windows()) < 1e-14


# =====================================================================================
# EMoE (Qiu et al. 2024): experts cut from a dense FFN, avg-k routing.
# qiuzh20/EMoE, Language/moe_utils.py @ ba8e175 (bert_to_MoE: the expert slices, the gate
# vectors = mean raw W1 rows, the output bias b2 / top_k), with tutel's 'top' gate whose
# weight is those gate vectors (no bias: logits = x @ keys^T) and EMoE's one-score gate: in the
# tutel fork EMoE uses (kept in LINs-lab/DynMoE @ 4927232, EMoE/tutel/tutel/impls/moe_layer.py
# routing: scores = softmax(logits) at evaluation; fast_dispatch.py extract_critical: top-k of
# the scores, and with one_score_gate every selected expert's gate is ones_like).
# =====================================================================================


def emoe_construct(weight_0, bias_0, weight_1, bias_1, expert_ids, num_experts, top_k):
    """bert_to_MoE's slicing (expert_repeat = 1, add_expert_size = 0, gate from the keys)."""
    expert_w0 = [weight_0[expert_ids == i] for i in range(num_experts)]
    bias_0 = [bias_0[expert_ids == i] for i in range(num_experts)]
    expert_w0 = torch.stack(expert_w0)  # [num_experts, expert_size, h]
    bias_0 = torch.stack(bias_0)
    expert_keys = [expert_w0[i].mean(dim=0) for i in range(num_experts)]
    expert_keys = torch.stack(expert_keys)
    weight_1 = weight_1.t()
    expert_w1 = [weight_1[expert_ids == i] for i in range(num_experts)]
    expert_w1 = torch.stack(expert_w1)  # [num_experts, expert_size, h]
    bias_1 = bias_1.unsqueeze(0).repeat(num_experts, 1).div(top_k)
    return expert_w0, bias_0, expert_w1, bias_1, expert_keys


def emoe_layer(x, construct, top_k):
    """The MoE layer: 'top' gate logits x @ keys^T, top-k, one-score gate 1 per expert;
    tutel's ffn expert gelu(x w0^T + b0) w1 + b1 (dropout off at evaluation)."""
    w0, b0, w1, b1, keys = construct
    logits = x @ keys.T
    top = torch.topk(logits, top_k, dim=1).indices
    y = torch.zeros_like(x)
    for e in range(keys.shape[0]):
        tok = (top == e).any(dim=1).nonzero().flatten()
        y[tok] += F.gelu(x[tok] @ w0[e].T + b0[e]) @ w1[e] + b1[e]
    return y


def _dense_ffn():
    g = _gen(3)
    d, H = 8, 48
    # rows of uneven norm, so the mean of raw rows and of normalized rows point apart
    W1 = torch.randn(H, d, generator=g, dtype=DT) * torch.rand(H, 1, generator=g, dtype=DT).mul(3).add(0.1)
    return W1, torch.randn(H, generator=g, dtype=DT) * 0.1, torch.randn(d, H, generator=g, dtype=DT) / H**0.5, \
        torch.randn(d, generator=g, dtype=DT)


def _partition(H, N, seed):
    ids = torch.randperm(H, generator=_gen(seed)) % N  # EMoE's expert_ids: a label per neuron
    groups = torch.stack([torch.nonzero(ids == e).flatten() for e in range(N)])
    return ids, ClusterResult(assignment=ids, groups=groups, raw_sizes=[H // N] * N, method="random", n_moved=0)


def _constructed_layer(built, N, h, d, k, score_mode, dtype=DT):
    cfg = SoMELayerConfig(d_model=d, num_experts=N, d_ffn=h, top_k=k, gating="avg_k", router="linear",
                          score_mode=score_mode)
    layer = SoMELayer(cfg, dtype=dtype)
    with torch.no_grad():
        layer.router.net.weight.copy_(torch.eye(d, dtype=dtype))
        layer.router.net.bias.zero_()
    return load_into_layer(layer, built).eval()


def compare_emoe(k: int, dtype=DT) -> dict[str, tuple]:
    """(ours, EMoE's) experts, gate vectors, layer output and input gradient (dot scores), and the
    layer with k = N against the dense FFN (both scorings)."""
    W1, b1, W2, b2 = (t.to(dtype) for t in _dense_ffn())
    H, d = W1.shape
    N = 6
    ids, clusters = _partition(H, N, 4)
    theirs = emoe_construct(W1, b1, W2, b2, ids, N, k)
    built = experts_from_dense(W1, b1, W2, b2, N, clusters=clusters, top_k=k)
    pairs = dict(zip(("w1", "b1", "w2", "b2", "keys"), zip((built.w1, built.b1, built.w2.transpose(1, 2),
                                                              built.b2, built.keys), theirs)))
    x = torch.randn(300, d, generator=_gen(6), dtype=DT).to(dtype)
    layer = _constructed_layer(built, N, H // N, d, k, "dot", dtype)  # EMoE scores by dot with raw gate vectors
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), emoe_layer(xb, theirs, k)
    ya.sum().backward()
    yb.sum().backward()
    pairs.update({"y": (ya.detach(), yb.detach()), "dL/dx": (xa.grad, xb.grad)})
    # cosine scoring keeps the direction of EMoE's gate vector
    cos_layer = _constructed_layer(built, N, H // N, d, k, "cosine", dtype)
    pairs["cosine keys"] = (cos_layer.keys, F.normalize(theirs[4], dim=1))
    # with k = N every expert is selected with gate 1 and carries b2/N: the dense FFN exactly
    full = experts_from_dense(W1, b1, W2, b2, N, clusters=clusters, top_k=N)
    dense = F.gelu(x @ W1.T + b1) @ W2.T + b2
    for mode in ("dot", "cosine"):
        with torch.no_grad():
            pairs[f"k = N ({mode}) vs dense"] = (_constructed_layer(full, N, H // N, d, N, mode, dtype)(x), dense)
    return pairs


@pytest.mark.parametrize("k", [2, 3])
def test_emoe_construction_and_avg_k_layer(backend, k):
    pairs = compare_emoe(k)
    for name in ("w1", "b1", "w2", "b2", "keys"):  # the slices are copies: exactly equal
        torch.testing.assert_close(*pairs[name], rtol=0, atol=0, msg=name)
    _assert_pairs(pairs, rtol=1e-12, atol=1e-12)
    # with rows of uneven norm the raw-mean gate vectors rank experts differently from
    # normalized-row means: many tokens pick another top-k set (what the old keys did)
    W1 = _dense_ffn()[0]
    ids, _ = _partition(W1.shape[0], 6, 4)
    unit = F.normalize(W1, dim=1)
    normalized_means = torch.stack([unit[ids == e].mean(0) for e in range(6)])
    x = torch.randn(300, W1.shape[1], generator=_gen(6), dtype=DT)
    raw_sets = torch.topk(x @ pairs["keys"][1].T, k).indices.sort(1).values
    old_sets = torch.topk(F.normalize(x, dim=1) @ F.normalize(normalized_means, dim=1).T, k).indices.sort(1).values
    assert (raw_sets != old_sets).any(dim=1).sum() > 10


# =====================================================================================
# Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing").
# ZhenweiAn/Dynamic_MoE, modeling/modeling_moe.py @ f56bc20: top_p_sampling_batched_all_sequence
# on softmax(router logits) (SwitchMLP.forward), weights = the raw probabilities.
# =====================================================================================


def dynamic_moe_top_p(probs, top_p):
    logits = probs / 1.0  # temperature 1.0 (SwitchMLP passes the softmax probabilities)
    sorted_probs, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(sorted_probs, dim=-1)
    mask = cumulative_probs > top_p
    threshold_indices = mask.long().argmax(dim=-1)
    threshold_mask = torch.nn.functional.one_hot(threshold_indices, num_classes=sorted_indices.size(-1)).bool()
    mask = mask & ~threshold_mask
    sorted_indices = torch.where(mask, -1, sorted_indices)
    sorted_probs = torch.where(mask, 0.0, sorted_probs)
    return sorted_probs, sorted_indices


def _selected(indices, gates):
    """{expert: gate} per token, slots with index -1 left out."""
    return [{int(e): float(g) for e, g in zip(ir, gr) if e >= 0} for ir, gr in zip(indices, gates)]


def _assert_same_selection(ours, theirs):
    assert [sorted(s) for s in ours] == [sorted(s) for s in theirs]
    for a, b in zip(ours, theirs):
        assert all(abs(a[e] - b[e]) <= 1e-12 for e in a)


def compare_top_p(dtype=DT) -> tuple[dict[str, tuple], list, list]:
    """(ours, Dynamic_MoE's) output and query gradient, and both selections ({expert: gate} per token)."""
    T, d, N, tau, p = 64, 5, 8, 0.3, 0.4
    g = _gen(21)
    q0 = torch.randn(T, d, generator=g, dtype=DT).to(dtype)
    keys = torch.randn(N, d, generator=g, dtype=DT).to(dtype)
    x = torch.randn(T, d, generator=g, dtype=DT).to(dtype)
    experts = tuple(t.to(dtype) for t in _experts(N, d, 4, 22))
    w = torch.linspace(-1, 1, d, dtype=dtype)

    qa = q0.clone().requires_grad_()
    probs = torch.softmax(F.normalize(qa, dim=1) @ F.normalize(keys, dim=1).T / tau, dim=-1)
    weights, idx = dynamic_moe_top_p(probs, p)
    y_theirs = torch.zeros(T, d, dtype=dtype)
    for e in range(N):  # SwitchMLP's loop over experts
        tok, slot = torch.where(idx == e)
        y_theirs[tok] += _expert(x[tok], *(t[e] for t in experts)) * weights[tok, slot].unsqueeze(1)
    (y_theirs * w).sum().backward()

    qb = q0.clone().requires_grad_()
    r = ops.route(qb, keys, N, tau, "top_p", top_p=p)
    y_ours = ops.experts(x, r.indices, r.gates, *experts)
    (y_ours * w).sum().backward()
    pairs = {"y": (y_ours.detach(), y_theirs.detach()), "dL/dq": (qb.grad, qa.grad)}
    return pairs, _selected(r.indices, r.gates.detach()), _selected(idx, weights.detach())


def test_top_p_matches_dynamic_moe(backend):
    pairs, ours, theirs = compare_top_p()
    _assert_same_selection(ours, theirs)
    assert len({len(s) for s in ours}) > 1  # a variable expert count
    _assert_pairs(pairs)


def test_top_p_exact_tie_is_strict(backend):
    """P = [0.5, 0.5] and p = 0.5: the cumulative sum first *exceeds* p at the second expert."""
    q = torch.tensor([[1.0, 1.0]], dtype=DT)
    keys = torch.eye(2, dtype=DT)
    weights, idx = dynamic_moe_top_p(torch.softmax(F.normalize(q, dim=1) @ keys.T, dim=-1), 0.5)
    r = ops.route(q, keys, 2, 1.0, "top_p", top_p=0.5)
    assert sorted(r.indices[0].tolist()) == sorted(idx[0].tolist()) == [0, 1]
    torch.testing.assert_close(r.gates[0], torch.tensor([0.5, 0.5], dtype=DT))


# =====================================================================================
# Softmax top-k (the SoME default) against HF transformers' Mixtral sparse MoE block
# (huggingface/transformers, src/transformers/models/mixtral/modeling_mixtral.py,
# MixtralSparseMoeBlock.forward): softmax over all router logits, top-k, renormalized
# over the k, the experts' outputs summed with those weights.
# =====================================================================================


def mixtral_block(x, router_logits, top_k, experts):
    # (Mixtral computes this softmax in float32; the float64 inputs here keep float64)
    routing_weights = F.softmax(router_logits, dim=1, dtype=router_logits.dtype)
    routing_weights, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    final = torch.zeros_like(x)
    expert_mask = F.one_hot(selected_experts, num_classes=router_logits.shape[1]).permute(2, 1, 0)
    for e in range(router_logits.shape[1]):
        idx, top_x = torch.where(expert_mask[e])
        current = _expert(x[top_x], *(t[e] for t in experts)) * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current)
    return final


def compare_mixtral(dtype=DT) -> dict[str, tuple]:
    """(ours, Mixtral's) output and gradients to the query and the input."""
    T, d, N, k, tau = 50, 6, 8, 3, 0.8
    g = _gen(31)
    q0, x0 = torch.randn(T, d, generator=g, dtype=DT), torch.randn(T, d, generator=g, dtype=DT)
    keys = torch.randn(N, d, generator=g, dtype=DT).to(dtype)
    experts = tuple(t.to(dtype) for t in _experts(N, d, 5, 32))
    out = []
    for fn in ("some", "mixtral"):
        q, x = q0.to(dtype).clone().requires_grad_(), x0.to(dtype).clone().requires_grad_()
        if fn == "mixtral":
            y = mixtral_block(x, F.normalize(q, dim=1) @ F.normalize(keys, dim=1).T / tau, k, experts)
        else:
            r = ops.route(q, keys, k, tau, "softmax")
            y = ops.experts(x, r.indices, r.gates, *experts)
        y.square().sum().backward()
        out.append((y.detach(), q.grad, x.grad))
    return dict(zip(("y", "dL/dq", "dL/dx"), zip(*out)))


def test_softmax_top_k_matches_mixtral(backend):
    _assert_pairs(compare_mixtral(), rtol=1e-12, atol=1e-13)


def adaptive_keys_difference(dtype=DT) -> float:
    """Largest |key difference| over the seeded windows of the adaptive process (active experts)."""
    return max(_adaptive_windows(dtype))


if __name__ == "__main__":  # python tests/test_fidelity.py: the README's table of measured differences
    import itertools

    def worst(pairs: dict[str, tuple]) -> float:
        return max(float((a.double() - b.double()).abs().max()) for a, b in pairs.values())

    print("| comparison | backend | float64 max abs diff | float32 max abs diff |")
    print("|---|---|---|---|")
    for backend_name in ("native", "torch"):
        with ops.use_backend(backend_name):
            rows = {
                "softmax top-k vs Mixtral (y, dL/dq, dL/dx)": lambda dt: worst(compare_mixtral(dt)),
                "top-p vs Dynamic_MoE (y, dL/dq)": lambda dt: worst(compare_top_p(dt)[0]),
                **{f"top-any vs DynMoE, {'training' if tr else 'evaluation'}, tau {tau} (y, dL/dq, dL/dx, dL/dG)":
                   (lambda dt, tr=tr, tau=tau: worst(compare_top_any(tr, tau, dt)))
                   for tr, tau in itertools.product((True, False), (1.0, 0.8))},
                "EMoE construction + avg-k layer, k = 2 (experts, keys, y, dL/dx; k = N vs dense)":
                    lambda dt: worst(compare_emoe(2, dt)),
                "DynMoE adaptive process, 4 windows (keys of active experts)": adaptive_keys_difference,
            }
            for name, fn in rows.items():
                print(f"| {name} | {backend_name} | {fn(torch.float64):.1e} | {fn(torch.float32):.1e} |")
