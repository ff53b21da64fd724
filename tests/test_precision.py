"""`precision`: auto is bf16 on CUDA (bf16 frozen experts, bf16 autocast for the trainable
parts, fp32 master weights and key store) and fp32 on the CPU; a run records what it resolved
to. bf16 also runs on the CPU, which is how these tests exercise it without a GPU."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from some.engine import autocast, resolve_precision
from some.errors import ConfigError
from some.runs import SoMEConfig, Trainer, apply_overrides, get_preset

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name needs no GPU


@pytest.mark.parametrize(("precision", "device", "resolved"), [
    ("auto", CUDA, "bf16"), ("auto", CPU, "fp32"), ("fp32", CUDA, "fp32"), ("bf16", CPU, "bf16")])
def test_precision_resolves_per_device(precision, device, resolved):
    assert resolve_precision(precision, device) == resolved


def test_an_unknown_precision_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(get_preset("tiny-test"), ["precision=fp16"])
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("half", CPU)


@pytest.mark.parametrize("preset", ["A4", "B3"])
def test_the_gpu_presets_train_bf16_experts_on_cuda_and_fp32_on_the_cpu(preset):
    cfg = get_preset(preset)
    on_gpu, on_cpu = cfg.for_device(CUDA), cfg.for_device(CPU)
    assert (on_gpu.precision, on_gpu.expert_dtype) == ("bf16", "bfloat16")
    assert (on_cpu.precision, on_cpu.expert_dtype) == ("fp32", cfg.expert_dtype) == ("fp32", "float32")
    forced = dataclasses.replace(cfg, precision="fp32").for_device(CUDA)
    assert (forced.precision, forced.expert_dtype) == ("fp32", "float32")
    assert on_gpu.for_device(CUDA) == on_gpu  # resolving twice changes nothing (resume)


def test_an_auto_run_records_what_auto_meant_on_its_device(tmp_path):
    cfg = apply_overrides(get_preset("tiny-test"), ["epochs=1", "train_subset_size=64", f"cache_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", progress=False, echo=False)
    try:
        assert trainer.config.precision == "auto" and trainer.run_info["precision"] == "fp32"
        assert trainer.model.config.expert_dtype == "float32"
    finally:
        trainer.close()


def test_bf16_autocast_covers_the_trainable_parts_only_when_asked():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(CPU, "auto"), autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = apply_overrides(get_preset("tiny-test"), ["epochs=1", "precision=bf16", f"cache_dir={cache}"])
    out = tmp_path_factory.mktemp("bf16") / "run"
    trainer = Trainer(cfg, out, device="cpu", progress=False, echo=False)
    result = trainer.run(make_plots=False)
    return trainer, result, out


def test_a_bf16_run_stores_bf16_experts_keeps_fp32_masters_and_records_it(bf16_run):
    trainer, result, out = bf16_run
    # config.yaml keeps the configuration as given (a study compares it with its file); run.json
    # and the model's own architecture say what ran
    saved = SoMEConfig.load_yaml(out / "config.yaml")
    assert saved == trainer.config and saved.precision == "bf16"
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    assert trainer.model.config.expert_dtype == "bfloat16"
    layer = trainer.model.some_layers()[0]
    assert layer.expert_spec.dtype == torch.bfloat16 and layer.experts.materialized
    assert all(w.dtype == torch.bfloat16 for w in layer.experts.materialize("cpu"))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)  # master weights
    assert all(b.dtype == torch.float32 for b in layer.key_store.buffers() if b.is_floating_point())
    assert torch.isfinite(torch.tensor(result.history[-1]["val_loss"]))


def test_a_bf16_run_resumes_with_the_configuration_it_was_given(bf16_run):
    # the checkpoint holds the configuration as given; resuming resolves it the same way and
    # loads the bf16 experts into bf16 experts
    trainer, _, out = bf16_run
    cfg = apply_overrides(get_preset("tiny-test"), ["epochs=1", "precision=bf16",
                                                    f"cache_dir={trainer.config.cache_dir}"])
    again = Trainer(cfg, out, resume=True, device="cpu", progress=False, echo=False)
    try:
        assert again.config.precision == "bf16" and again.progress.epoch == 1
        assert again.model.some_layers()[0].expert_spec.dtype == torch.bfloat16
    finally:
        again.close()
