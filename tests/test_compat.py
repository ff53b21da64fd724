"""Checkpoints and exported models written by earlier versions still load and compute the same
(tests/fixtures/README.md says how the files were made)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from helpers import metrics_records

from some.nn import SoMEForCausalLM
from some.runs import train

FIXTURES = Path(__file__).parent / "fixtures"


def test_an_old_checkpoint_resumes_to_the_metrics_of_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v0_1", run)
    train(None, run, resume=True, make_plots=False, progress=False)
    assert metrics_records(run / "metrics.jsonl") == metrics_records(FIXTURES / "run_v0_1" / "expected_metrics.jsonl")


def test_an_old_exported_model_gives_its_logits_bit_for_bit():
    model = SoMEForCausalLM.from_pretrained(FIXTURES / "model_v0_1")
    expected = torch.load(FIXTURES / "model_v0_1" / "expected_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
