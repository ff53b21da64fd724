"""A trained SoME model in the tools researchers use (issue 24): transformers' Auto classes
(after ``import some.hf``, and with ``trust_remote_code`` without importing some),
``generate`` with a cache and ``pipeline`` token for token as ``some generate``, the
log-likelihoods of ``some eval``, lm-evaluation-harness on the offline tasks of
``some lm-eval-task``, and clear errors for directories that are not (this) some's."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV

from some.cli import main
from some.data import collate
from some.errors import ModelFileError
from some.nn import SoMEForCausalLM
from some.runs import Trainer, apply_overrides, get_preset
from some.runs.export import evaluate_model, generate_text

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="needs transformers (pip install 'some[hf]')")
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="needs lm-evaluation-harness (pip install 'some[hf]')")
FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = ["ka lo", "mi nu pe ra so"]


@pytest.fixture
def finished(tiny_test_run):
    """The session's tiny-test run (tests/conftest.py, read only) and its model directory RUN/model."""
    trainer, out = tiny_test_run
    return trainer, out / "model"


@pytest.fixture(scope="module")
def finished_dense(tmp_path_factory):
    """A dense baseline (ffn = dense, width 2d) trained and exported the same way."""
    out = tmp_path_factory.mktemp("hf_dense") / "run"
    cfg = apply_overrides(get_preset("tiny-test"), [f"cache_dir={out.parent / 'cache'}", "ffn=dense", "dense_width=64"])
    trainer = Trainer(cfg, out, progress=False, echo=False)
    trainer.run(make_plots=False)
    return trainer, out / "model"


@pytest.fixture(scope="module")
def hf():
    """``some.hf`` (imported: the Auto classes know model_type "some") and transformers."""
    if not HAS_TRANSFORMERS:
        pytest.skip("needs transformers (pip install 'some[hf]')")
    import transformers

    import some.hf

    return some.hf, transformers


def _env(tmp_path: Path) -> dict:
    # transformers copies modeling_some.py into HF_HOME/modules: a private one per test
    return {**ENV, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": "1"}


def test_import_some_does_not_import_transformers():
    code = ("import sys, some, some.nn, some.runs, some.cli\n"
            "print([m for m in ('transformers', 'lm_eval', 'some.hf') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_model_directory_carries_the_transformers_files(finished):
    _, model_dir = finished
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "modeling_some.py", "tokenizer.json", "tokenizer_config.json",
        "training.json"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "some"
    assert config["auto_map"] == {"AutoConfig": "modeling_some.SoMEHFConfig",
                                  "AutoModelForCausalLM": "modeling_some.SoMEHFForCausalLM"}
    assert "from some.hf import SoMEHFConfig, SoMEHFForCausalLM" in (model_dir / "modeling_some.py").read_text()
    tok = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok["bos_token"] == tok["eos_token"] == "<|endoftext|>" and tok["pad_token"] == "<|pad|>"
    loaded = SoMEForCausalLM.from_pretrained(model_dir)  # some's own loader takes the new keys
    # some encodes without special tokens (as before); with them (transformers' default) <|endoftext|> comes first
    assert loaded.tokenizer.encode("ka lo", add_special_tokens=False).ids[0] != loaded.eos_token_id
    assert loaded.tokenizer.encode("ka lo").ids[0] == loaded.eos_token_id


# ------------------------------------------------------------------ import some.hf + Auto classes
def test_auto_classes_load_the_same_model_and_logits(finished, hf):
    trainer, model_dir = finished
    some_hf, transformers = hf
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert isinstance(config, some_hf.SoMEHFConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (32, 2, 32)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, some_hf.SoMEHFForCausalLM) and isinstance(model.model, SoMEForCausalLM)
    native = SoMEForCausalLM.from_pretrained(model_dir)
    # the wrapper adds nothing: its parameters and buffers are the SoME model's
    assert [k for k, _ in model.named_parameters()] == [f"model.{k}" for k, _ in native.named_parameters()]
    assert [k for k, _ in model.named_buffers()] == [f"model.{k}" for k, _ in native.named_buffers()]
    for device_map in ("cpu", {"": "cpu"}):
        assert transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map).device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map={"model.embed": "cpu"})
    b = collate(trainer.data.val, range(6), torch.device("cpu"))
    with torch.no_grad():
        want = native(b["input_ids"], b["attention_mask"]).logits
        got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(got, want)
    # transformers' labels are the inputs (the model shifts them)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"])
    shifted = torch.cat([b["input_ids"][:, 1:], torch.full_like(b["input_ids"][:, :1], -100)], 1)
    real = b["attention_mask"]
    mask = real & torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1)  # a real token follows
    logp = torch.log_softmax(want.float(), -1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert math.isclose(out.loss.item(), -logp[mask].mean().item(), rel_tol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert tok("ka lo")["input_ids"] == [native.eos_token_id] + native.tokenizer.encode("ka lo",
                                                                                        add_special_tokens=False).ids
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (native.eos_token_id, native.pad_token_id, "right")


def test_per_token_log_likelihoods_are_some_evals(finished, hf):
    """The mean next-token loss over the run's validation split, from the transformers model,
    is what ``some eval`` reports (both from the same per-token log-likelihoods)."""
    trainer, model_dir = finished
    _, transformers = hf
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    val = trainer.data.val
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 8):
            b = collate(val, range(start, min(start + 8, len(val))), torch.device("cpu"))
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            keep = (b["labels"] != -100) & b["attention_mask"]
            logp = torch.log_softmax(logits.double(), -1).gather(-1, b["labels"].clamp(min=0).unsqueeze(-1))
            total -= logp.squeeze(-1)[keep].sum().item()
            count += int(keep.sum())
    result = evaluate_model(model_dir, device="cpu")
    assert count == result["tokens"]  # the targets of the split
    assert math.isclose(total / count, result["loss"], rel_tol=1e-5)


def test_greedy_generate_and_pipeline_are_some_generate(finished, hf):
    _, model_dir = finished
    _, transformers = hf
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    native = SoMEForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.use_cache and model.generation_config.eos_token_id == native.eos_token_id
    pipe = transformers.pipeline("text-generation", model=str(model_dir))
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        got = model.generate(**ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, native.generate(ids["input_ids"], 12, eos_token_id=native.eos_token_id))
        text = generate_text(model_dir, prompt, max_new_tokens=12, greedy=True)[0]  # `some generate --greedy`
        assert pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"] == text


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_greedy_generate_of_an_untrained_model_with_and_without_cache(finished, hf, tmp_path, level):
    """Untrained (the tiny trained model repeats one word greedily), the continuations vary:
    transformers' generate, with its cache (token-level routing) or without, gives some's tokens."""
    _, model_dir = finished
    _, transformers = hf
    cfg = apply_overrides(get_preset("tiny-test"), [f"routing_level={level}", "seed=7"])
    native = SoMEForCausalLM(cfg.model_config()).eval()
    native.tokenizer = SoMEForCausalLM.from_pretrained(model_dir).tokenizer
    native.save_pretrained(tmp_path / level)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / level)
    assert model.generation_config.use_cache is (level == "token")  # sequence-level routing pools the sequence
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / level)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        want = native.generate(ids["input_ids"], 20)
        assert len(set(want[0, -20:].tolist())) > 5
        assert torch.equal(model.generate(**ids, max_new_tokens=20, do_sample=False, eos_token_id=None), want)
        uncached = model.generate(**ids, max_new_tokens=20, do_sample=False, eos_token_id=None, use_cache=False)
        assert torch.equal(uncached, want)
    if level == "sequence":  # a cache asked for is refused (generate: with a warning, and without one)
        with pytest.warns(UserWarning, match="sequence-level routing"):
            got = model.generate(**ids, max_new_tokens=20, do_sample=False, eos_token_id=None, use_cache=True)
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="runs without a cache"):
            model(input_ids=ids["input_ids"], cache=transformers.DynamicCache())


def test_the_cache_gives_the_full_forwards_logits(finished, hf):
    _, model_dir = finished
    some_hf, transformers = hf
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 265, 281, 285, 272, 290, 300, 270]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        cache = first.cache if hasattr(first, "cache") else first.past_key_values
        assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == 5
        steps = [first.logits]
        for t in range(5, 8):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding must be at the end"):
        model(input_ids=ids[:, :3], attention_mask=torch.tensor([[0, 1, 1]]))  # left padding


# ------------------------------------------------------------------ older directories
def test_a_directory_from_before_the_transformers_files_loads(hf, tmp_path):
    some_hf, transformers = hf
    old = tmp_path / "model_v0_1"
    shutil.copytree(FIXTURES / "model_v0_1", old)
    ids = torch.load(old / "expected_logits.pt", weights_only=True)["input_ids"]
    native = SoMEForCausalLM.from_pretrained(old)
    with torch.no_grad():
        want = native(ids).logits  # (tests/test_compat.py: the logits the fixture was written with)
    with pytest.raises(ValueError, match="model_type"):  # no model_type in its config.json: give the config
        transformers.AutoModelForCausalLM.from_pretrained(old)
    model = transformers.AutoModelForCausalLM.from_pretrained(old, config=some_hf.SoMEHFConfig.from_model_dir(old))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    native.save_pretrained(tmp_path / "new")  # or save it again: the files come with it
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)


# ------------------------------------------------------------------ bad input
def _bad_dirs(finished, tmp_path) -> dict[str, Path]:
    """name -> a directory that must not load (ERRORS: the words of its error)."""
    trainer, model_dir = finished
    dirs = {}
    dirs["run"] = model_dir.parent  # a run directory, not its model
    damaged = dirs["damaged"] = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 2])
    newer = dirs["newer"] = tmp_path / "newer"
    shutil.copytree(model_dir, newer)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "some_version": "99.0.0"}))
    foreign = dirs["foreign"] = tmp_path / "foreign"
    shutil.copytree(model_dir, foreign)
    (foreign / "config.json").write_text(json.dumps({**config, "format": "gpt-ish"}))
    return dirs


ERRORS = {"run": "config.json", "damaged": "truncated or damaged", "newer": "newer than the installed some",
          "foreign": "format 'gpt-ish' is not 'some-model-1'"}


def test_bad_directories_give_clear_errors_with_import_some(finished, hf, tmp_path):
    some_hf, transformers = hf
    for name, path in _bad_dirs(finished, tmp_path).items():
        for load in (transformers.AutoModelForCausalLM.from_pretrained, some_hf.SoMEHFForCausalLM.from_pretrained):
            with pytest.raises((ModelFileError, OSError, ValueError), match=ERRORS[name]):
                load(path)
    assert issubclass(ModelFileError, RuntimeError)


@pytest.mark.slow
@needs_transformers
def test_trust_remote_code_without_importing_some(finished, tmp_path):
    """A fresh process that never imports some: the directory's modeling_some.py brings it;
    the same tokens as some's generate, and the same errors for bad directories."""
    _, model_dir = finished
    native = SoMEForCausalLM.from_pretrained(model_dir)
    prompt = native.tokenizer.encode(PROMPTS[1], add_special_tokens=False).ids
    want = native.generate(torch.tensor([[native.eos_token_id, *prompt]]), 12, eos_token_id=native.eos_token_id)
    bad = _bad_dirs(finished, tmp_path)
    script = tmp_path / "remote.py"
    script.write_text(f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
ids = tok({PROMPTS[1]!r}, return_tensors="pt")
out = {{"class": type(model).__module__ + "." + type(model).__name__,
        "tokens": model.generate(**ids, max_new_tokens=12, do_sample=False)[0].tolist(), "errors": {{}}}}
for name, path in {json.dumps({k: str(v) for k, v in bad.items()})}.items():
    try:
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        out["errors"][name] = "loaded"
    except Exception as e:
        out["errors"][name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
""")
    assert "import some" not in script.read_text()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"] == "some.hf.SoMEHFForCausalLM"
    assert out["tokens"] == want[0].tolist()
    for name, words in ERRORS.items():
        assert words in out["errors"][name], (name, out["errors"][name])
    assert out["errors"]["damaged"].startswith("ModelFileError") and out["errors"]["newer"].startswith("ModelFileError")


# ------------------------------------------------------------------ lm-evaluation-harness
def _some_loglikelihood(model: SoMEForCausalLM, context: str, target: str) -> tuple[float, bool]:
    """(log p(target | <|endoftext|> context), greedy) as lm_eval asks it of a causal LM:
    the tokens of context + target after the context's, the input cut to the model's length."""
    encode = lambda text: [model.eos_token_id, *model.tokenizer.encode(text, add_special_tokens=False).ids]
    whole, ctx = encode(context + target), encode(context)
    n = len(whole) - len(ctx)
    inputs = whole[-(model.config.seq_len + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inputs])).logits[0, -n:].float(), -1)
    cont = torch.tensor(whole[-n:])
    return float(logp.gather(-1, cont.unsqueeze(-1)).sum()), bool((logp.argmax(-1) == cont).all())


@pytest.mark.slow
@needs_lm_eval
@pytest.mark.parametrize("model", ["finished", "finished_dense"])  # a SoME model and a dense baseline
def test_lm_eval_runs_the_offline_tasks_on_the_model(model, request, hf, tmp_path, monkeypatch, capsys):
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    _, model_dir = request.getfixturevalue(model)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert main(["lm-eval-task", str(tmp_path / "tasks"), "--model", str(model_dir), "--items", "16"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic: 16 items from the run's validation split" in printed and "--tasks some_heldout" in printed
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # (lm_eval's own: not read)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},trust_remote_code=True",
                                      tasks=["some_heldout"], task_manager=tasks, device="cpu", batch_size=8,
                                      log_samples=True)
    got = results["results"]
    assert set(got) >= {"some_synthetic_lastword", "some_synthetic_lastword_choice"}
    assert 0 <= got["some_synthetic_lastword_choice"]["acc,none"] <= 1 and got["some_synthetic_lastword"][
        "perplexity,none"] > 1
    # every item's log-likelihood is SoMEForCausalLM's, to 1e-5
    native = SoMEForCausalLM.from_pretrained(model_dir)
    samples = results["samples"]["some_synthetic_lastword"]
    assert len(samples) == 16
    for s in samples:
        (logp, greedy), = s["resps"][0] if isinstance(s["resps"][0][0], (list, tuple)) else [s["resps"][0]]
        want, want_greedy = _some_loglikelihood(native, s["doc"]["context"], s["doc"]["target"])
        assert math.isclose(float(logp), want, rel_tol=1e-5, abs_tol=1e-5) and bool(greedy) == want_greedy


def test_lm_eval_task_files_and_mistakes(finished, tmp_path, capsys):
    _, model_dir = finished
    with pytest.warns(UserWarning, match="using all of them"):  # (300 documents: fewer than a default run's split)
        assert main(["lm-eval-task", str(tmp_path / "t"), "--data", "synthetic:300", "--items", "20"]) == 0
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["some_synthetic_300.jsonl", "some_synthetic_300_lastword.yaml",
                     "some_synthetic_300_lastword_choice.yaml"]
    items = [json.loads(line) for line in (tmp_path / "t" / "some_synthetic_300.jsonl").read_text().splitlines()]
    assert len(items) == 20
    for it in items:
        assert it["choices"][it["label"]] == it["target"] and len(set(it["choices"])) == 4
        assert it["target"].startswith(" ") and not it["context"].endswith(" ")
    stories = tmp_path / "tinystories"  # a local copy of TinyStories (its .txt form): its validation split
    stories.mkdir()
    for split, n in (("train", 3), ("valid", 12)):
        (stories / f"TinyStories-{split}.txt").write_text("".join(
            f"Once upon a time story {i} had a cat named Tom{i}.\n<|endoftext|>\n" for i in range(n)))
    assert main(["lm-eval-task", str(tmp_path / "ts"), "--data", f"tinystories:{stories}", "--items", "8"]) == 0
    items = [json.loads(line) for line in next((tmp_path / "ts").glob("*.jsonl")).read_text().splitlines()]
    assert len(items) == 8 and all(it["target"].startswith(" Tom") for it in items)
    capsys.readouterr()
    for argv, message in ((["--data", "nonsense"], "unknown data source"), (["--items", "2"], "items must be"),
                          (["--model", str(tmp_path / "nope")], "model directory not found")):
        assert main(["lm-eval-task", str(tmp_path / "x"), *argv]) != 0
        assert message in capsys.readouterr().err
