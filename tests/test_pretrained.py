"""Using a trained model (issue 14): export / from_pretrained, generate with a KV
cache, some generate / eval / export, the token cache, compile = true."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from some.cli import main
from some.data import DataConfig, DocumentDataset, build_data, collate
from some.errors import ModelFileError
from some.nn import SoMEForCausalLM
from some.runs import Trainer, apply_overrides, get_preset
from some.runs.export import evaluate_model, export_run, generate_text


@pytest.fixture
def finished(tiny_test_run):
    """A tiny-test run on the offline-free synthetic corpus, trained to the end (the trainer kept;
    the session's, tests/conftest.py: read only)."""
    return tiny_test_run


def val_batch(trainer, n=4):
    return collate(trainer.data.val, range(n), torch.device("cpu"))


# ------------------------------------------------------------------ export / load
def test_exported_model_gives_bit_identical_logits(finished):
    trainer, out = finished
    files = sorted(p.name for p in (out / "model").iterdir())
    # (modeling_some.py and tokenizer_config.json: the directory is a transformers model too)
    assert files == ["README.md", "config.json", "model.safetensors", "modeling_some.py", "tokenizer.json",
                     "tokenizer_config.json", "training.json"]
    loaded = SoMEForCausalLM.from_pretrained(out / "model")
    b = val_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(b["input_ids"], b["attention_mask"]).logits
        got = loaded(b["input_ids"], b["attention_mask"]).logits
    assert torch.equal(want, got)
    assert loaded.tokenizer.get_vocab_size() == trainer.data.tokenizer.get_vocab_size()
    assert loaded.eos_token_id == trainer.data.eot_id
    card = (out / "model" / "README.md").read_text()
    assert "SoME decoder LM" in card and "Parameters:" in card and "val_perplexity" in card
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_experts"] == 8 and "learning_rate" not in config  # model fields only


def test_experts_are_regenerated_not_stored(finished):
    _, out = finished
    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert not any(n.endswith((".w1", ".w2")) for n in names)  # the generator makes them again
    assert not any(".telemetry." in n for n in names)  # training state stays in the checkpoint
    assert any(n.endswith("ffn.key_store.keys") for n in names)


def test_some_export_of_an_older_run_writes_the_same_model(finished, tmp_path):
    _, out = finished
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "model")  # a run from before the automatic export
    assert main(["export", str(copy)]) == 0
    from safetensors import safe_open

    files = [safe_open(str(d / "model" / "model.safetensors"), framework="pt") for d in (copy, out)]
    assert files[0].metadata() == files[1].metadata() and sorted(files[0].keys()) == sorted(files[1].keys())
    for name in files[0].keys():  # (the header's key order is not fixed between processes: compare contents)
        assert torch.equal(files[0].get_tensor(name), files[1].get_tensor(name)), name
    assert export_run(copy, tmp_path / "elsewhere").is_dir()


def _model_copy(finished, tmp_path):
    _, out = finished
    d = tmp_path / "m"
    shutil.copytree(out / "model", d)
    return d


def test_damaged_model_files_give_clear_errors(finished, tmp_path):
    d = _model_copy(finished, tmp_path)
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        SoMEForCausalLM.from_pretrained(d)
    weights.write_bytes(data)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json: not valid JSON"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps({**cfg, "d_model": 48}))  # the weights are for d = 32
    with pytest.raises(ModelFileError, match="does not fit config.json"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps({**cfg, "colour": "blue"}))
    with pytest.raises(ModelFileError, match=r"unknown config fields \['colour'\]"):
        SoMEForCausalLM.from_pretrained(d)
    # a newer some's fields are not "unknown": the error says to upgrade
    cfg_path.write_text(json.dumps({**cfg, "some_version": "99.0.0", "expert_shape": "round"}))
    with pytest.raises(ModelFileError, match="written by some 99.0.0, newer than the installed some"):
        SoMEForCausalLM.from_pretrained(d)
    import some.nn.pretrained as pretrained  # a source tree that is not installed compares with nothing

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrained, "__version__", "0+unknown")
        cfg_path.write_text(json.dumps({**cfg, "some_version": "99.0.0"}))
        assert SoMEForCausalLM.from_pretrained(d).config.d_model == cfg["d_model"]
    cfg_path.write_text(json.dumps({**cfg, "format": "transformers"}))
    with pytest.raises(ModelFileError, match="not written by some"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps({**cfg, "top_k": 99}))
    with pytest.raises(ModelFileError, match="top_k"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps({**cfg, "seed": cfg["seed"] + 1}))  # other experts than the saved ones
    with pytest.raises(ModelFileError, match="seed"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps(cfg))
    weights.unlink()
    with pytest.raises(ModelFileError, match="has no model.safetensors"):
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.unlink()
    with pytest.raises(ModelFileError, match="no config.json"):
        SoMEForCausalLM.from_pretrained(d)
    # a directory that does not exist is taken for a hub id, which cannot be fetched here either
    with pytest.raises(Exception):  # noqa: B017 -- huggingface_hub's own validation/offline errors
        SoMEForCausalLM.from_pretrained(tmp_path / "nothing here")


def test_files_of_an_older_methods_revision_load_with_one_warning(finished, tmp_path):
    """Models and checkpoints written before the fidelity fixes (no methods_revision) of a
    method whose semantics changed: they load, with one warning naming the change."""
    import warnings

    from some.engine import load_checkpoint, save_checkpoint
    from some.nn import METHODS_REVISION

    d = _model_copy(finished, tmp_path)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["methods_revision"] == METHODS_REVISION
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current file: no warning
        SoMEForCausalLM.from_pretrained(d)
    old = {k: v for k, v in cfg.items() if k != "methods_revision"}
    cfg_path.write_text(json.dumps({**old, "gating": "avg_k"}))
    with pytest.warns(UserWarning, match=r"methods revision 1.*avg_k gates are now 1") as caught:
        model = SoMEForCausalLM.from_pretrained(d)
    assert len(caught) == 1 and model.methods_revision == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # softmax gating did not change: nothing to say
        cfg_path.write_text(json.dumps(old))
        SoMEForCausalLM.from_pretrained(d)
    cfg_path.write_text(json.dumps({**cfg, "methods_revision": "two"}))
    with pytest.raises(ModelFileError, match="methods_revision must be a positive integer"):
        SoMEForCausalLM.from_pretrained(d)

    # a run directory whose checkpoint predates the field: export warns and keeps revision 1
    _, out = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    state = load_checkpoint(run / "checkpoint.pt")
    assert state.pop("methods_revision") == METHODS_REVISION
    save_checkpoint(run / "checkpoint.pt", state)
    yaml_path = run / "config.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("adaptive: false", "adaptive: true"))
    with pytest.warns(UserWarning, match=r"checkpoint.pt was trained at methods revision 1.*adaptive process"):
        exported = export_run(run, tmp_path / "exported")
    assert json.loads((exported / "config.json").read_text())["methods_revision"] == 1


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_greedy_generate_with_cache_equals_full_recomputation(level):
    cfg = apply_overrides(get_preset("tiny-test"), [f"routing_level={level}"])
    model = SoMEForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, 20)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(20):  # the reference: the whole sequence through the model at every step
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)
    if level == "token":  # the cache is used: its logits match recomputation closely
        cache = model.new_cache(3, 24)
        with torch.no_grad():
            step = model(out[:, :4], cache=cache).logits
            full = model(out[:, :10]).logits
            for t in range(4, 10):
                step = model(out[:, t:t + 1], cache=cache).logits
                assert torch.allclose(step[:, -1], full[:, t], atol=1e-5, rtol=1e-5)


def test_generate_sampling_seed_eos_and_bad_arguments():
    cfg = get_preset("tiny-test")
    model = SoMEForCausalLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 3))
    a = model.generate(prompt, 15, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    b = model.generate(prompt, 15, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(a, b) and a.shape == (2, 18)
    state = torch.random.get_rng_state()
    model.generate(prompt, 5, do_sample=True, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    greedy = model.generate(prompt, 15)
    eos = int(greedy[0, 5])  # make the 3rd new token of row 0 the end
    stopped = model.generate(prompt, 15, eos_token_id=eos)
    assert torch.all(stopped[0, 5:] == eos)  # finished rows are filled with eos
    assert torch.equal(model.generate(prompt, 1, top_k=1, do_sample=True, seed=3), greedy[:, :4])  # top-1 = greedy
    for kwargs, match in (({"max_new_tokens": cfg.seq_len}, "exceeds the model's seq_len"),
                          ({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="token ids"):
        model.generate(torch.full((1, 2), cfg.vocab_size), 2)
    with pytest.raises(ValueError, match=r"\(B, S\) integer tensor"):
        model.generate(torch.zeros(3), 2)


def test_some_generate_prints_text(finished, capsys):
    _, out = finished
    assert main(["generate", str(out / "model"), "--prompt", "ka lo", "-n", "2", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- sample") == 2 and text.count("ka lo") >= 2
    assert generate_text(out / "model", "ka lo", greedy=True, max_new_tokens=5) == \
        generate_text(out / "model", "ka lo", greedy=True, max_new_tokens=5)


# ------------------------------------------------------------------ eval
def test_some_eval_reproduces_the_runs_val_perplexity(finished, tmp_path, capsys):
    trainer, out = finished
    want = trainer.history[-1]["val_perplexity"]
    result = evaluate_model(out / "model", device="cpu")
    assert abs(result["perplexity"] - want) <= 1e-6 * want
    assert result["documents"] == trainer.data.val.num_documents
    assert main(["eval", str(out / "model"), "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"Val Perplexity = {want:.2f}" in printed
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["experts_used"] <= 8 and (tmp_path / "ev" / "usage_histogram.png").is_file()
    other = evaluate_model(out / "model", "synthetic:500", device="cpu", val_docs=20)
    assert other["split"].startswith("validation split of a fresh") and other["documents"] == 20


# ------------------------------------------------------------------ token cache
def test_second_run_on_the_same_corpus_skips_tokenization(tmp_path, monkeypatch):
    cfg = DataConfig(source="synthetic:300", seq_len=32, vocab_size=300, train_subset_size=200, val_subset_size=50,
                     cache_dir=str(tmp_path))
    first = build_data(cfg)
    assert first.token_cache == "miss"

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(DocumentDataset, "from_texts", classmethod(no_tokenizing))
    second = build_data(cfg)
    assert second.token_cache == "hit"
    print(f"data preparation: {first.token_seconds:.3f} s tokenizing, {second.token_seconds:.3f} s from the cache")
    assert second.token_seconds < first.token_seconds
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert len(a) == len(b) and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))
    # another seq_len is another entry
    monkeypatch.undo()
    assert build_data(DataConfig(**{**cfg.__dict__, "seq_len": 16})).token_cache == "miss"


def test_a_damaged_cache_entry_is_rebuilt(tmp_path):
    cfg = DataConfig(source="synthetic:100", seq_len=16, vocab_size=300, train_subset_size=60, val_subset_size=20,
                     cache_dir=str(tmp_path))
    build_data(cfg)
    for f in (tmp_path / "tokens").glob("*/tokens.npy"):
        f.write_bytes(b"garbage")
    again = build_data(cfg)
    assert again.token_cache == "miss" and len(again.train) == 60


# ------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    results = {}
    for flag in ("false", "true"):
        cfg = apply_overrides(get_preset("tiny-test"), [f"compile={flag}", "epochs=1", "train_subset_size=32",
                                                        f"cache_dir={tmp_path / 'c'}"])
        trainer = Trainer(cfg, tmp_path / flag, progress=False, echo=False)
        trainer.run(make_plots=False)
        results[flag] = trainer.history[-1]
    assert json.loads((tmp_path / "true" / "run.json").read_text())["compile"] is True
    for key in ("train_loss", "val_loss"):
        assert results["true"][key] == pytest.approx(results["false"][key], rel=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["eval", "{tmp}/nonexistent"], "model directory not found"),
    (["generate", "{tmp}/nonexistent", "--prompt", "hi"], "model directory not found"),
    (["eval", "{model}/config.json"], "is a file, not a model directory"),
    (["eval", "{model}", "--data", "nonsense"], "unknown data source 'nonsense'"),
    (["eval", "{model}", "--data", "synthetic", "--ood", "synthetic"], "another corpus"),
    (["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["generate", "{model}", "--prompt", "hi", "--temperature", "-1"], "--temperature must be > 0"),
    (["generate", "{model}", "--prompt", "hi", "--temperature", "nan"], "--temperature must be > 0"),
    (["generate", "{model}", "--prompt", "hi", "--top-p", "2"], r"--top-p must be in \(0, 1\]"),
    (["generate", "{model}", "--prompt", "hi", "--top-k", "-3"], "--top-k must be >= 0"),
    (["selftest", "--device", "cuda:7"], "no CUDA device"),
    (["selftest", "--device", "gpu please"], "is not a device"),
])
def test_command_line_mistakes_are_one_error_line(finished, tmp_path, capsys, argv, message):
    import re

    _, out = finished
    argv = [a.format(tmp=tmp_path, model=out / "model") for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("some: error: ") and re.search(message, err[0]), err
