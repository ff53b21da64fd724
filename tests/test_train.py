"""The training loop: it learns, logs what docs/method.md §6 asks, resumes exactly after a
SIGKILL, stops cleanly on NaN, and refuses bad checkpoints with clear errors."""
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, metrics_records

from some.engine import evaluate, load_checkpoint, lr_at, save_checkpoint
from some.errors import CheckpointError, ConfigError, RunDirError, RunStopped, TrainingDiverged
from some.nn import SoMEForCausalLM, format_parameter_counts
from some.runs import Trainer, apply_overrides, build_report, get_preset, train
from some.runs.faults import Faults

REPO = Path(__file__).resolve().parents[1]
# idle OpenMP threads sleep instead of spinning: many times faster when other jobs share the CPU
# tiny-test on the synthetic corpus: 3 epochs x 8 steps, a checkpoint every 3 steps
OVERRIDES = ["epochs=3", "checkpoint_every=3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def config(cache_dir):
    return apply_overrides(get_preset("tiny-test"), OVERRIDES + [f"cache_dir={cache_dir}"])


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted run, and the validation loss of its untrained model."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    trainer = Trainer(config, out, progress=False, echo=False)
    before = evaluate(trainer.model, trainer.data.val, config.batch_size, trainer.device)
    result = trainer.run(make_plots=False)
    return out, before, result


def _records(run_dir):
    return metrics_records(Path(run_dir) / "metrics.jsonl")


def _assert_same_final_state(run_a, run_b):
    a = load_checkpoint(Path(run_a) / "checkpoint.pt")
    b = load_checkpoint(Path(run_b) / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        va, vb = a["model"][name], b["model"][name]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


# ---------------------------------------------------------------- schedule


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = apply_overrides(get_preset("tiny-test"), ["warmup_steps=4", "learning_rate=1.0", "min_learning_rate=0.1"])
    lrs = [lr_at(s, cfg, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # monotone decay after warmup
    assert lrs[4 + 8] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)


# ------------------------------------------------------------------ learning


def test_training_lowers_validation_loss_and_logs_the_epoch_lines(reference, config):
    out, before, result = reference
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [8, 16, 24]  # 64 samples // batch 8, per epoch
    assert before.loss == pytest.approx(math.log(config.vocab_size), abs=0.5)  # untrained: ~uniform
    assert records[-1]["val_loss"] < before.loss - 1.0
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    for r in records:
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert 0 <= r["gini"] <= 1 and 0 < r["entropy"] <= math.log2(config.num_experts)
    log = (out / "train.log").read_text()
    assert log.startswith(format_parameter_counts(*SoMEForCausalLM(config, device="meta").parameter_counts()))
    assert re.search(r"^Epoch 1: Train Loss = \d+\.\d{4}, Val Loss = \d+\.\d{4}, Val Perplexity = \d+\.\d{2}$",
                     log, re.MULTILINE)
    assert re.search(r"^Middle Layer Expert Metrics: Gini = \d\.\d{3}, Entropy = \d\.\d{3}$", log, re.MULTILINE)
    assert re.search(r"^Experts used: \d+/8 \(\d+\.\d{2}%\)$", log, re.MULTILINE)
    assert "Final Entropy: " in log and "(Max: 3.000)" in log
    analysis = json.loads((out / "analysis.json").read_text())
    assert sum(analysis["usage_counts"]) > 0 and len(analysis["usage_counts"]) == config.num_experts
    assert analysis["gini"] == records[-1]["gini"]
    assert (out / "report.md").is_file() and (out / "config.yaml").is_file()


def test_key_stores_moved_during_training(reference, config):
    out, _, _ = reference
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    fresh = SoMEForCausalLM(config).state_dict()
    for i in range(config.n_layers):
        name = f"blocks.{i}.ffn.key_store.keys"
        assert not torch.equal(trained[name], fresh[name]), name
        torch.testing.assert_close(trained[name].norm(dim=1), torch.ones(config.num_experts))  # cosine mode
        # frozen experts did not move: the checkpoint holds their generator, seed and digest, not the experts
        assert f"blocks.{i}.ffn.experts.w1" not in trained
        record = trained[f"blocks.{i}.ffn.experts._extra_state"]
        assert record == fresh[f"blocks.{i}.ffn.experts._extra_state"]
        assert record["generator"].startswith("philox4x32-10")


# -------------------------------------------------------------------- resume


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(reference, config, cache_dir, tmp_path):
    ref_out, _, _ = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "some", "train", "--preset", "tiny-test", "--set", *OVERRIDES,
           f"cache_dir={cache_dir}", "--out", str(out), "--no-plots", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    for line in proc.stdout:
        if line.startswith("Saved checkpoint at step 12"):  # mid epoch 2 of 3
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(out / "checkpoint.pt")
    assert 12 <= state["scheduler"]["global_step"] < 24  # really killed mid-run
    assert not (out / "analysis.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "some", "train", "--out", str(out), "--resume", "--no-plots",
                              "--no-progress"], check=False, cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert _records(out) == _records(ref_out)
    _assert_same_final_state(out, ref_out)
    assert json.loads((out / "analysis.json").read_text()) == json.loads((ref_out / "analysis.json").read_text())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(reference, config, tmp_path):
    out = tmp_path / "nan"
    bad = Trainer(config, out, progress=False, echo=False, faults=Faults(nan_step=8))  # checkpoint at step 6
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 8 \(epoch 1, batch 8\)") as e:
        bad.run(make_plots=False)
    assert str(out / "checkpoint.pt") in str(e.value)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["scheduler"]["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in state["model"].values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert not (out / "checkpoint.pt.tmp").exists()
    report = build_report(out)  # an unfinished run has a report too
    assert "No epoch has finished yet." in report and "has not finished (0 of 3 epochs)" in report
    # The kept checkpoint is good: resuming it without the fault ends exactly like the reference run.
    train(config, out, resume=True, make_plots=False, progress=False, echo=False)
    assert _records(out) == _records(reference[0])
    _assert_same_final_state(out, reference[0])


def test_nan_before_any_checkpoint_says_so(config, tmp_path, monkeypatch):
    monkeypatch.setenv("SOME_FAULT_NAN_STEP", "1")  # the test hooks come from the environment
    with pytest.raises(TrainingDiverged, match="at step 1 .*no checkpoint had been written yet"):
        train(config, tmp_path / "r", make_plots=False, progress=False, echo=False)


# --------------------------------------------------------------- bad input


def test_corrupt_checkpoint_gives_a_clear_error_naming_the_file(reference, config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    good = (reference[0] / "checkpoint.pt").read_bytes()
    path.write_bytes(good[: len(good) // 2])  # torn write
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*corrupt"):
        train(config, out, resume=True, progress=False, echo=False)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        train(None, out, resume=True, progress=False, echo=False)
    torch.save({"weights": torch.zeros(2)}, path)  # a valid file, but not ours
    with pytest.raises(CheckpointError, match="is not a SoME checkpoint"):
        train(None, out, resume=True, progress=False, echo=False)


def test_resume_with_another_configuration_is_refused(reference, config):
    other = apply_overrides(config, ["learning_rate=0.01"])
    with pytest.raises(CheckpointError, match="another configuration.*learning_rate"):
        Trainer(other, reference[0], resume=True, progress=False, echo=False)


def test_checkpoint_whose_tensors_do_not_fit_the_model_is_refused(reference, config, tmp_path):
    state = load_checkpoint(reference[0] / "checkpoint.pt")
    state["model"]["embed.weight"] = torch.zeros(3, 3)
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="does not match this run.*embed.weight"):
        Trainer(None, out, resume=True, progress=False, echo=False)


def _as_v1(state, config):
    """A checkpoint as the package wrote it before its layout changed (format v1): blocks' feed-forward
    parts named `some`/`ln_some`, every expert stored (no generator record), test hooks in the run config."""
    v1 = dict(state, format="some-checkpoint-v1")
    # (and the SoME layer's state flat, as before it had parts: ffn.keys, ffn.router.0.weight, ffn.w1)
    model = {k.replace(".ffn.key_store.", ".ffn.").replace(".ffn.router.net.", ".ffn.router."): v
             for k, v in state["model"].items() if not k.endswith("_extra_state")}
    for i, layer in enumerate(SoMEForCausalLM(config).some_layers()):
        model.update({f"blocks.{i}.ffn.{n}": t for n, t in zip(("w1", "b1", "w2", "b2"), layer.materialize_experts())})
    v1["model"] = {k.replace(".ffn.", ".some.").replace(".ln_ffn.", ".ln_some."): v for k, v in model.items()}
    v1["config"] = {**state["config"], "debug_nan_step": 0, "debug_state_digest": False, "debug_stop_after_step": 12,
                    "debug_die_at_step": 0, "debug_die_rank": 0}
    return v1


def test_a_v1_checkpoint_resumes_bit_identically(reference, config, tmp_path):
    out = tmp_path / "stopped"
    with pytest.raises(RunStopped, match="stopped after step 12"):
        Trainer(config, out, progress=False, echo=False, faults=Faults(stop_after_step=12)).run(make_plots=False)
    current = load_checkpoint(out / "checkpoint.pt")
    save_checkpoint(out / "checkpoint.pt", _as_v1(current, config))
    upgraded = load_checkpoint(out / "checkpoint.pt")
    assert upgraded["format"] == "some-checkpoint-v3" and "blocks.0.ffn.w1" in upgraded["model"]
    assert not any(".some." in k or "ln_some" in k for k in upgraded["model"])
    with pytest.warns(UserWarning, match="retired test-hook keys") as caught:  # one warning, from the config reader
        train(None, out, resume=True, make_plots=False, progress=False, echo=False)
    assert len([w for w in caught if "test-hook" in str(w.message)]) == 1
    assert _records(out) == _records(reference[0])
    a, b = load_checkpoint(out / "checkpoint.pt")["model"], load_checkpoint(reference[0] / "checkpoint.pt")["model"]
    for name in b:
        if isinstance(b[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
    # the resumed run carries the file's experts from then on (they are the experts it was given)
    assert torch.equal(a["blocks.0.ffn.experts.w1"], SoMEForCausalLM(config).some_layers()[0].w1)


def test_an_unknown_checkpoint_format_is_refused_by_name(reference, tmp_path):
    state = dict(load_checkpoint(reference[0] / "checkpoint.pt"), format="some-checkpoint-v99")
    out = tmp_path / "run"
    save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="format 'some-checkpoint-v99', which this version of some cannot read"):
        Trainer(None, out, resume=True, progress=False, echo=False)


def test_interrupted_checkpoint_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "some-checkpoint-v1", "x": torch.ones(3)})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkp")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "some-checkpoint-v1", "x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]


def test_run_directory_rules(reference, config, tmp_path):
    with pytest.raises(RunDirError, match="not empty; pass --resume"):
        Trainer(config, reference[0], progress=False, echo=False)
    with pytest.raises(RunDirError, match="nothing to resume"):
        Trainer(config, tmp_path / "empty", resume=True, progress=False, echo=False)


def test_missing_corpus_is_a_clear_error(config, tmp_path):
    from some.data import CorpusUnavailableError

    missing = tmp_path / "no-such-corpus.txt"
    cfg = apply_overrides(config, [f"data_source=files:{missing}"])
    with pytest.raises((CorpusUnavailableError, FileNotFoundError), match=re.escape(str(missing))):
        train(cfg, tmp_path / "r", progress=False, echo=False)


def test_data_rules_surface_as_config_errors(config, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size must be >= 258"):
        train(apply_overrides(config, ["vocab_size=100"]), tmp_path / "r", progress=False, echo=False)
