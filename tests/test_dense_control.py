"""The dense controls (``ffn = dense``, issue 22 item 5): the SoME layer replaced by a trainable
dense FFN of width ``dense_width`` — 2d has the SoME layer's trainable parameters (its router
MLP), k·h its active FFN FLOPs. A run, its report, eval and export, and a study table with a
dense variant beside a SoME one."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from some.analysis import analytic_flops_per_token, count_flops
from some.errors import ConfigError
from some.nn import DenseFFN, SoMEForCausalLM
from some.runs import Trainer, apply_overrides, get_preset
from some.runs.export import eval_text, evaluate_model
from some.studies import load_study
from some.studies.runner import measure_run
from some.studies.schema import Measure
from some.studies.summary import RESULT, summarize


def _config(*sets):
    return apply_overrides(get_preset("tiny-test"), list(sets))


def test_dense_needs_its_width_and_a_known_kind():
    with pytest.raises(ConfigError, match="dense_width"):
        _config("ffn=dense")
    with pytest.raises(ConfigError, match="ffn"):
        _config("ffn=moe")
    with pytest.raises(ConfigError, match="expert_init = 'cluster' applies to ffn = 'some' only"):
        _config("ffn=dense", "dense_width=64", "expert_init=cluster")


def test_width_2d_has_the_trainable_parameters_of_the_some_layer_and_kh_its_ffn_flops():
    some_cfg = _config()
    d, k, h = some_cfg.d_model, some_cfg.top_k, some_cfg.d_ffn
    dense_2d = SoMEForCausalLM(_config("ffn=dense", f"dense_width={2 * d}"))
    assert all(isinstance(b.ffn, DenseFFN) for b in dense_2d.blocks) and dense_2d.some_layers() == []
    some_total, some_trainable = SoMEForCausalLM(some_cfg).parameter_counts()
    dense_total, dense_trainable = dense_2d.parameter_counts()
    assert dense_trainable == dense_total == some_trainable  # the router MLP d -> 2d -> d, as a dense FFN
    kh = _config("ffn=dense", f"dense_width={k * h}")
    assert analytic_flops_per_token(kh, k)["dense_ffn"] == analytic_flops_per_token(some_cfg, k)["experts"]
    ids = torch.randint(0, kh.vocab_size, (2, kh.seq_len))
    counted = count_flops(SoMEForCausalLM(kh), ids)
    assert counted["total"] / ids.numel() == pytest.approx(analytic_flops_per_token(kh, k)["total"], rel=1e-12)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    cfg = _config("epochs=1", f"cache_dir={tmp / 'cache'}", "ffn=dense", "dense_width=64")
    trainer = Trainer(cfg, tmp / "run", progress=False, echo=False)
    result = trainer.run(make_plots=True)
    return trainer, result


def test_a_dense_control_trains_reports_and_exports(dense_run):
    trainer, result = dense_run
    out = trainer.out
    assert result.analysis is None and not (out / "analysis.json").exists()
    assert not list(out.glob("*.png"))  # no expert pictures to draw
    record = result.history[-1]
    assert record["gini"] is None and record["middle_layer"] is None and record["val_perplexity"] > 1
    report = (out / "report.md").read_text()
    assert "Dense control decoder LM" in report and "trainable dense FFN of width 64" in report
    assert "A dense control has no experts" in report and "Gini" not in report.split("## Results per epoch")[0]
    card = (out / "model" / "README.md").read_text()
    assert "Dense control decoder LM" in card and "frozen experts" not in card
    loaded = SoMEForCausalLM.from_pretrained(out / "model")
    assert loaded.config.ffn == "dense" and loaded.some_layers() == []
    evaluated = evaluate_model(out / "model", device="cpu")
    assert evaluated["perplexity"] == pytest.approx(record["val_perplexity"], rel=1e-6)
    assert "gini" not in evaluated and "Middle layer" not in eval_text(evaluated)


def test_a_study_table_with_a_dense_variant(dense_run, tmp_path):
    dense_trainer, _ = dense_run
    ood = tmp_path / "ood.txt"  # another domain than the synthetic pseudo-words, without an installed corpus
    ood.write_text("\n\n".join(f"The quick brown fox jumps over the lazy dog, {i} times." for i in range(24)))
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": "controls", "preset": "tiny-test",
        "set": {"epochs": 1, "cache_dir": str(dense_trainer.config.cache_dir)},
        "datasets": [{"name": "synth", "data_source": "synthetic", "ood_source": f"files:{ood}"}],
        "seeds": [0], "variants": {"some": {}, "dense": {"ffn": "dense", "dense_width": 64}},
        "run_plots": False}, sort_keys=False))
    study = load_study(study_file)
    out = tmp_path / "out"
    measure = Measure(latency_repeats=1, latency_warmup=0, latency_batch=1, flops_rows=1)
    for run in study.runs:  # what the study's child process does, in this process
        trainer = Trainer(run.config, run.dir(out), progress=False, echo=False)
        trainer.run(make_plots=False)
        row = {"study": study.name, "variant": run.variant, "dataset": run.dataset, "seed": run.seed,
               "device": "cpu", "memory_kind": "peak RSS of the process", "peak_memory_mb": 1.0,
               "ood_loss": 0.0, "ood_perplexity": 1.0, **measure_run(trainer, measure)}
        (run.dir(out) / RESULT).write_text(json.dumps(row))
    dense = json.loads((study.runs[1].dir(out) / RESULT).read_text())
    assert dense["ffn"] == "dense" and dense["num_experts"] is None and "gini" not in dense
    assert dense["flops_per_token_counted"] == pytest.approx(dense["flops_per_token_analytic"])
    text = summarize(study, out).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `some`") and "n/a" not in rows[0].split("|")[3]
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert cells[0] == "`dense`" and "n/a" not in cells[1:5]  # perplexities and FLOPs measured
    assert cells.count("n/a") >= 10  # the expert columns: nothing to measure
    assert (out / "usage.png").is_file()  # drawn from the SoME variant alone
