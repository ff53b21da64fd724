"""The SoME language model: exact parameter counts (docs/method.md §2), causality,
padding, determinism of the initialization, gradients and key updates, generation.

The tests that compute take conftest's `device` ("cuda" is skipped, with the reason, where it
cannot run): the model is built on its device, as a run builds it; inputs are drawn on the CPU
and moved, so the "cpu" case is what it always was."""
import pytest
import torch
from helpers import kernels_on, repeatable

from some.nn import SoMEForCausalLM, format_parameter_counts, lm_loss
from some.runs import apply_overrides, get_preset

EXPERT_PARAMS = 1_050_112  # 2 * 1024 * 512 + 1024 + 512
TRAINABLE_REFERENCE = 29_417_472


@pytest.mark.parametrize("preset, n_experts, total_m", [("A4", 64, "701.49M"), ("B1", 128, "1373.56M"),
                                                        ("B2", 256, "2717.70M"), ("B3", 512, "5405.99M")])
def test_reference_parameter_counts_on_meta(preset, n_experts, total_m):
    config = get_preset(preset)
    model = SoMEForCausalLM(config, device=torch.device("meta"))
    total, trainable = model.parameter_counts()
    assert trainable == TRAINABLE_REFERENCE
    assert total - trainable == n_experts * config.n_layers * EXPERT_PARAMS
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == total - trainable
    assert all(n.split(".")[-1] in ("w1", "b1", "w2", "b2")
               for n, p in model.named_parameters() if not p.requires_grad)
    lines = format_parameter_counts(total, trainable).splitlines()
    assert lines[0] == f"Total parameters: {total_m}"
    assert lines[1].startswith("Trainable parameters: 29.42M (")


def test_meta_forward_gives_shapes_without_memory():
    """For FLOP counting and shape checks of the reference models."""
    config = get_preset("B3")
    model = SoMEForCausalLM(config, device="meta")
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    assert model(ids, labels=ids).logits.shape == (2, 16, config.vocab_size)


def test_parameter_count_lines_match_the_reference_format():
    assert format_parameter_counts(701_489_152, 29_417_472) == (
        "Total parameters: 701.49M\nTrainable parameters: 29.42M (4.19%)")


@pytest.fixture()
def device(device):
    """conftest's device; on CUDA the native kernels (helpers.kernels_on)."""
    with kernels_on(device):
        yield device


@pytest.fixture()
def tiny(device):
    torch.manual_seed(0)
    config = get_preset("tiny-test")
    return config, SoMEForCausalLM(config, device=device)


def test_future_tokens_do_not_change_past_logits(tiny, device):
    config, model = tiny
    model.eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        a = model(ids.to(device)).logits
        b = model(changed.to(device)).logits
    # equal up to float summation order (the expert op groups tokens by expert)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2


def _shifted(ids, mask):
    """Inputs and next-token labels the way some.data makes them."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :-1][~mask[:, 1:]] = -100
    labels[:, -1] = -100
    return labels


def test_padding_is_masked_in_the_loss(tiny, device):
    config, model = tiny
    model.eval()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 11:] = False  # second row: 11 real tokens, then padding
    labels = _shifted(ids, mask)
    other = ids.clone()
    other[1, 11:] = torch.randint(0, config.vocab_size, (9,))  # different padding content
    with torch.no_grad(), repeatable(device):
        out_a = model(ids.to(device), mask.to(device), labels.to(device))
        out_b = model(other.to(device), mask.to(device), labels.to(device))
    # The loss only sees real targets, and real positions do not see padding.
    assert torch.equal(out_a.loss, out_b.loss)
    torch.testing.assert_close(out_a.logits[1, :11], out_b.logits[1, :11], rtol=0, atol=1e-6)
    # It is the mean over the 19 + 10 real next-token targets (on the CPU, from the logits).
    logp = out_a.logits.cpu().log_softmax(-1)
    nll = [-logp[0, t, ids[0, t + 1]] for t in range(19)] + [-logp[1, t, ids[1, t + 1]] for t in range(10)]
    torch.testing.assert_close(out_a.loss.cpu(), torch.stack(nll).mean())


def test_loss_ignores_minus_100_and_padding_positions(device):
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, -100, 3, 4]])
    logp = logits.log_softmax(-1)  # the reference, on the CPU
    mask = torch.tensor([[True, True, True, False]])  # the last position is padding
    on = dict(logits=logits.to(device), labels=labels.to(device))
    torch.testing.assert_close(lm_loss(**on).cpu(), -(logp[0, 0, 1] + logp[0, 2, 3] + logp[0, 3, 4]) / 3)
    on["attention_mask"] = mask.to(device)
    torch.testing.assert_close(lm_loss(**on).cpu(), -(logp[0, 0, 1] + logp[0, 2, 3]) / 2)
    torch.testing.assert_close(lm_loss(**on, reduction="sum").cpu(), -(logp[0, 0, 1] + logp[0, 2, 3]))


def test_initialization_is_a_function_of_the_seed(device):
    config = get_preset("tiny-test")
    torch.manual_seed(1)
    a = SoMEForCausalLM(config, device=device)
    torch.manual_seed(2)
    b = SoMEForCausalLM(config, device=device)
    c = SoMEForCausalLM(apply_overrides(config, ["seed=7"]), device=device)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb) if isinstance(pa, torch.Tensor) else pa == pb, name
    assert not torch.equal(a.blocks[0].ffn.keys, c.blocks[0].ffn.keys)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    # layers get different seeds: different experts and keys
    assert not torch.equal(a.blocks[0].ffn.w1, a.blocks[1].ffn.w1)
    # building a model does not consume the caller's random numbers (the CPU's, and the device's)
    draw = lambda: (torch.rand(3), torch.rand(3, device=device))  # noqa: E731
    torch.manual_seed(1)
    expected = draw()
    torch.manual_seed(1)
    SoMEForCausalLM(config, device=device)
    assert all(torch.equal(got, want) for got, want in zip(draw(), expected))


def test_gradients_reach_router_not_experts_and_keys_self_organize(tiny, device):
    config, model = tiny
    model.train()
    ids = torch.randint(0, config.vocab_size, (4, 16)).to(device)
    loss = model(ids, labels=ids.roll(-1, dims=1)).loss
    loss.backward()
    layer = model.blocks[0].ffn
    assert layer.w1.grad is None and layer.w2.grad is None
    assert layer.router.net[0].weight.grad is not None and layer.router.net[0].weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0
    keys = [layer.keys.clone() for layer in model.some_layers()]
    assert model.update_keys(wait=True) == [True] * config.n_layers  # (wait: the CPU's default)
    for old, some_layer in zip(keys, model.some_layers()):
        assert not torch.equal(old, some_layer.keys)
        torch.testing.assert_close(some_layer.keys.norm(dim=1), torch.ones(config.num_experts, device=device))
    assert model.update_keys() == [None] * config.n_layers  # nothing pending


def test_bad_inputs_raise_clear_errors():
    config = get_preset("tiny-test")
    model = SoMEForCausalLM(config)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, config.seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        model(torch.zeros(config.seq_len, dtype=torch.long))


def test_forward_backward_under_bf16_autocast(tiny, device):
    """The CUDA training path autocasts to bf16; the SoME layers run outside it
    (routing in fp32), the rest in bf16. Checked with the device's autocast."""
    config, model = tiny
    ids = torch.randint(0, config.vocab_size, (2, 16)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(ids, labels=ids.roll(-1, dims=1))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.blocks[0].ffn.router.net[0].weight.grad.abs().sum() > 0
    assert model.update_keys(wait=True) == [True] * config.n_layers


def test_greedy_generation_with_and_without_the_kv_cache(tiny, device):
    """Generation on the device: the attention's cache gives the tokens of full recomputation
    (test_pretrained.py checks generation itself, on the CPU)."""
    config, model = tiny
    prompt = torch.randint(0, config.vocab_size, (2, 4)).to(device)
    cached = model.generate(prompt, 8)
    full = model.generate(prompt, 8, use_cache=False)
    assert cached.shape == (2, 12) and cached.device == prompt.device
    assert torch.equal(cached[:, :4], prompt) and torch.equal(cached, full)
