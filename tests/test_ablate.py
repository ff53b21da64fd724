"""Ablation studies (some.ablate, some.analysis, some.dense): a small study end
to end with every table cell measured, resumability, study-file errors before
any training, the variant -> config mapping of experiments/, FLOPs counted vs
analytic, specialization MI on constructed cases, experts cut from a dense FFN."""
import csv
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from some import studies as ablate
from some.analysis import analytic_flops_per_token, count_flops, mutual_information_bits, specialization, token_batch
from some.cli import main as cli_main
from some.errors import ConfigError, RunsFailed, StudyError
from some.nn import SoMEForCausalLM
from some.runs import apply_overrides, get_preset
from some.studies import load_study, run_status, runner

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "experiments").glob("*.yaml"))


def _ood_corpus(tmp_path: Path) -> Path:
    """A small corpus of another domain than the synthetic pseudo-words."""
    path = tmp_path / "ood.txt"
    sentences = ["The quick brown fox jumps over the lazy dog, again and again.",
                 "In the beginning the numbers were 1, 2, 3; then came 42!",
                 "She sells sea shells by the sea shore."]
    path.write_text("\n\n".join(sentences[i % 3] + f" Line {i}." for i in range(24)))
    return path


def _study(tmp_path: Path, **changes) -> Path:
    """A small study on tiny-test: 3 variants x 1 dataset x 2 seeds."""
    study = {
        "study": "mini",
        "preset": "tiny-test",
        "set": {"epochs": 1, "train_subset_size": 32, "val_subset_size": 16, "cache_dir": str(tmp_path / "cache")},
        "datasets": [{"name": "synth", "data_source": "synthetic", "ood_source": f"files:{_ood_corpus(tmp_path)}"}],
        "seeds": [0, 1],
        "variants": {"softmax": {"gating": "softmax"}, "top_p": {"gating": "top_p", "top_p": 0.6},
                     "sequence": {"routing_level": "sequence", "router": "linear"}},
        "measure": {"latency_repeats": 2, "latency_warmup": 1, "latency_batch": 2, "flops_rows": 2},
        "run_plots": False,
    }
    for key, value in changes.items():
        if value is None:
            study.pop(key, None)
        else:
            study[key] = value
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if not line.startswith("|---")]
    return head, [r for r in rows if len(r) == len(head)]


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    path = _study(tmp)
    out = tmp / "out"
    assert cli_main(["ablate", str(path), "--out", str(out), "--quiet"]) == 0
    return path, out


@pytest.mark.slow
def test_study_writes_a_fully_measured_table(finished_study):
    path, out = finished_study
    text = (out / "results.md").read_text()
    head, rows = _table(text.split("## How each column")[0])
    assert [r[0] for r in rows] == ["`softmax`", "`top_p`", "`sequence`"]
    for name in ("ID PPL", "OOD PPL", "MFLOPs/token (analytic)", "MFLOPs/token (counted)", "Train tok/s",
                 "Latency (ms)", "Experts/token", "Experts used", "Gini", "Entropy (bits)",
                 "MI(expert; token class) (bits)", "Friedman rank (ID PPL)"):
        assert name in head, name
    assert any(h.startswith("Peak memory (MiB, peak RSS of the process)") for h in head)
    for row in rows:
        for title, cell in zip(head, row, strict=True):
            assert cell and cell != "n/a", (title, row)
    # perplexities are mean ± std over the two seeds; ranks average to (n + 1) / 2
    assert all("±" in row[1] and "±" in row[2] for row in rows)
    ranks = [float(row[head.index("Friedman rank (ID PPL)")]) for row in rows]
    assert sum(ranks) == pytest.approx(2.0 * 3)
    assert re.search(r"Friedman test \(ID perplexity, 3 variants, 2 dataset × seed blocks\): χ² = [\d.]+, "
                     r"\*\*p = [\d.e-]+\*\*", text)
    for picture in ("perplexity_synth.png", "usage.png", "specialization.png"):
        assert (out / picture).stat().st_size > 1000, picture

    runs = list(csv.DictReader(open(out / "runs.csv")))
    # every scalar any run measured has its column (the union, not the first run's keys)
    measured = {k for p in out.glob("runs/*/*/seed*/result.json")
                for k, v in json.loads(p.read_text()).items() if not isinstance(v, (list, dict))}
    assert set(runs[0]) == measured
    assert len(runs) == 6 and {(r["variant"], r["seed"]) for r in runs} == {
        (v, s) for v in ("softmax", "top_p", "sequence") for s in ("0", "1")}
    for r in runs:
        assert float(r["peak_memory_mb"]) > 50  # a real process's RSS, not a placeholder
        assert float(r["experts_per_token"]) <= 2  # top_k = 2 in tiny-test
        assert float(r["flops_per_token_counted"]) == pytest.approx(float(r["flops_per_token_analytic"]), rel=0.05)
    fixed_k = [r for r in runs if r["variant"] != "top_p"]
    assert all(float(r["experts_per_token"]) == 2.0 for r in fixed_k)
    by_variant = list(csv.DictReader(open(out / "results.csv")))
    assert [r["variant"] for r in by_variant] == ["softmax", "top_p", "sequence"]


@pytest.mark.slow
def test_second_invocation_reruns_nothing(finished_study, monkeypatch, capsys):
    path, out = finished_study
    results = sorted(out.glob("runs/*/*/seed*/result.json"))
    assert len(results) == 6
    stamps = [p.stat().st_mtime_ns for p in results]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(runner, "_run_in_subprocess", no_training)
    assert cli_main(["ablate", str(path), "--out", str(out), "--quiet"]) == 0
    assert "6 finished, 0 to run" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert (out / "results.md").is_file()


@pytest.mark.slow
def test_only_the_unfinished_run_runs_again(finished_study, monkeypatch):
    path, out = finished_study
    study = load_study(path)
    target = study.runs[0]
    (target.dir(out) / "result.json").rename(target.dir(out) / "result.json.bak")
    assert run_status(target, out) == "new"  # the checkpoint was deleted after measuring
    started = []
    monkeypatch.setattr(runner, "_run_in_subprocess", lambda run, *a, **k: started.append(run) or 1)
    with pytest.raises(RunsFailed, match="1 of 6 runs failed"):
        ablate.run_study(study, out, stream=False)
    assert started == [target]
    (target.dir(out) / "result.json.bak").rename(target.dir(out) / "result.json")


@pytest.mark.slow
def test_a_changed_study_file_is_refused_not_mixed_in(finished_study, tmp_path):
    path, out = finished_study
    changed = yaml.safe_load(path.read_text())
    changed["set"]["learning_rate"] = 1e-2
    path2 = tmp_path / "changed.yaml"
    path2.write_text(yaml.safe_dump(changed))
    with pytest.raises(StudyError, match=r"run with another configuration \(learning_rate: ran with 0.003"):
        ablate.run_study(load_study(path2), out)


@pytest.mark.slow
def test_one_study_process_per_output_directory(finished_study):
    import fcntl

    path, out = finished_study
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running 'some ablate' holds it
        with pytest.raises(StudyError, match="another 'some ablate' is running into"):
            ablate.run_study(load_study(path), out)


# ------------------------------------------------------------ bad study files


@pytest.mark.parametrize("changes, message", [
    ({"variants": {"softmax": {"gatng": "softmax"}}},
     r"variants: softmax: unknown config key 'gatng'; did you mean 'gating'"),
    ({"variants": {"softmax": {"gating": "softmx"}}},
     r"variant 'softmax' on dataset 'synth' \(seed 0\): config field gating = 'softmx'; expected one of"),
    ({"variants": {"a": {"top_k": 9}}}, r"variant 'a' .*top_k = 9 must be in 1..num_experts"),
    ({"variants": {"a": {"seed": 3}}}, r"a variant cannot set 'seed'"),
    ({"datasets": None}, r"datasets: missing; give 'datasets'"),
    ({"datasets": [{"name": "x", "data_source": "synthetic"}]}, r"datasets\[0\]: missing 'ood_source'"),
    ({"datasets": [{"name": "x", "data_source": "synthetic", "ood_source": "files:/nonexistent/corpus.txt"}]},
     r"dataset 'x': ood_source 'files:/nonexistent/corpus.txt' is not available"),
    ({"seeds": []}, r"seeds: expected a non-empty list"),
    ({"preset": "A5"}, r"unknown preset 'A5' \(did you mean A4"),
    ({"varaints": {}}, r"unknown key 'varaints'; did you mean 'variants'"),
    ({"measure": {"latency_repeats": 0}}, r"measure: latency_repeats must be an integer >= 1"),
])
def test_bad_study_file_fails_before_any_training(tmp_path, monkeypatch, capsys, changes, message):
    path = _study(tmp_path, **changes)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started for an invalid study")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    out = tmp_path / "out"
    assert cli_main(["ablate", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("some: error: ") and re.search(message, err), err
    assert str(path) in err or "unknown preset" in err
    assert not out.exists()


def test_smoke_section_variant_names_are_checked(tmp_path):
    path = _study(tmp_path, smoke={"variants": ["softmax", "sofmax"]})
    with pytest.raises(StudyError, match=r"smoke: variants: unknown variant 'sofmax'; did you mean 'softmax'"):
        load_study(path, smoke=True)
    with pytest.raises(StudyError, match="--smoke needs a 'smoke' section"):
        load_study(_study(tmp_path), smoke=True)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    # PyYAML reads 3e-3 (no dot) as a string; a study file means the number
    path = _study(tmp_path, variants={"a": {"learning_rate": "3e-3"}, "b": {}, "c": {"top_k": 1}})
    study = load_study(path)
    assert study.runs[0].config.learning_rate == 3e-3


# ------------------------------------------------- experiments/: variant mapping


def test_every_study_of_spec_7_is_in_experiments():
    assert {p.stem for p in STUDIES} >= {"construction", "pretrained_vs_random", "gating", "adaptive", "router",
                                         "self_organization", "scale"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_files_and_their_smoke_sections_are_valid(path):
    full = load_study(path, check_corpora=False)
    smoke = load_study(path, smoke=True, check_corpora=False)
    assert full.runs and smoke.runs
    assert all(r.config.d_model == 512 and r.config.n_layers == 10 for r in full.runs)  # A4-sized
    assert all(r.config.d_model <= 64 for r in smoke.runs)  # CPU-sized
    assert len(smoke.variants) >= 3 and len(smoke.seeds) >= 2  # the Friedman test is defined


def _variant_configs(name, smoke=False):
    study = load_study(REPO / "experiments" / f"{name}.yaml", smoke=smoke, check_corpora=False)
    return {r.variant: r.config for r in study.runs if r.seed == study.seeds[0] and r.dataset == study.datasets[0].name}


def test_variant_to_config_mapping():
    reference = get_preset("A4")
    gating = _variant_configs("gating")
    assert {v: c.gating for v, c in gating.items()} == {
        "softmax": "softmax", "sigmoid": "sigmoid", "relu": "relu", "avg_k": "avg_k", "top_p": "top_p",
        "top_any": "top_any"}
    router = _variant_configs("router")
    assert (router["frozen"].router, router["random"].router, router["linear"].router) == ("frozen", "random", "linear")
    assert router["mlp"].routing_level == "token" and router["mlp_sequence"].routing_level == "sequence"
    so = _variant_configs("self_organization")
    assert (so["full"].alpha, so["full"].beta, so["full"].delta, so["full"].ema_decay) == (
        reference.alpha, reference.beta, reference.delta, reference.ema_decay)
    assert so["no_attraction"].alpha == 0 and so["no_attraction"].beta == reference.beta
    assert so["no_peer_pull"].beta == 0 and so["no_repulsion"].delta == 0 and so["no_inertia"].ema_decay == 0
    assert (so["all_removed"].alpha, so["all_removed"].beta, so["all_removed"].delta) == (0, 0, 0)
    adaptive = _variant_configs("adaptive")
    assert not adaptive["off"].adaptive and adaptive["on"].adaptive and adaptive["on_grow"].initial_experts == 32
    assert _variant_configs("adaptive", smoke=True)["on_grow"].initial_experts == 8  # tiny: N = 16
    assert {v: c.num_experts for v, c in _variant_configs("scale").items()} == {
        "A4": 64, "B1": 128, "B2": 256, "B3": 512}
    construction = _variant_configs("construction")
    assert construction["default"].expert_init == "default"
    for method in ("balanced_kmeans", "kmeans", "agglomerative", "spectral"):
        assert (construction[method].expert_init, construction[method].cluster_method,
                construction[method].dense_source) == ("cluster", method, "pretrained")
    assert construction["random_assignment"].cluster_method == "random"
    source = _variant_configs("pretrained_vs_random")
    assert (source["random"].dense_source, source["pretrained"].dense_source) == ("random", "pretrained")
    assert (source["pretrained"].dense_transfer, source["pretrained_ffn"].dense_transfer) == ("all", "ffn")
    # everything a variant does not set is the study's base: variants differ in their own fields only
    assert set(gating["softmax"].diff(gating["top_any"])) == {"gating"}


# ------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("overrides", [[], ["router=linear", "routing_level=sequence"], ["gating=avg_k"],
                                       ["router=frozen", "num_experts=5", "top_k=3"]])
def test_counted_flops_equal_the_analytic_formula(overrides):
    config = apply_overrides(get_preset("tiny-test"), overrides)
    model = SoMEForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (3, config.seq_len))
    counted = count_flops(model, ids)
    analytic = analytic_flops_per_token(config, config.top_k)
    assert counted["total"] / ids.numel() == pytest.approx(analytic["total"], rel=1e-12)
    # term by term: the SoME ops and the attention products are counted, not left out
    assert counted["some.experts"] / ids.numel() == pytest.approx(analytic["experts"])
    assert counted["some.route"] / ids.numel() == pytest.approx(analytic["route"])
    assert counted["aten._scaled_dot_product_flash_attention_for_cpu"] / ids.numel() == \
        pytest.approx(analytic["attention_sdpa"])


def test_token_batch_has_no_padding():
    from some.data import DataConfig, build_data

    data = build_data(DataConfig(source="synthetic", seq_len=32, vocab_size=320, train_subset_size=16,
                                 val_subset_size=8))
    ids = token_batch(data.val, 2, 32)
    assert ids.shape == (2, 32) and not (ids == data.pad_id).any()
    with pytest.raises(ValueError, match="fewer than one row"):
        token_batch(data.val, 1, 10**6)


# --------------------------------------------------------------- specialization


def test_mutual_information_on_constructed_cases():
    # expert 0 receives only token 5, expert 1 only token 7: the expert says everything (1 bit)
    assert mutual_information_bits([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    # both experts receive both tokens equally: nothing (0 bits)
    assert mutual_information_bits([0, 1, 0, 1], [5, 5, 7, 7]) == pytest.approx(0.0, abs=1e-12)
    # expert 0 gets exactly one token type (A twice); expert 1 gets A and B once each:
    # I = H(E) - H(E|X) = 1 - P(A) H(2/3, 1/3) = 1 - 3/4 H2(1/3)
    h2 = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert mutual_information_bits([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(1 - 0.75 * h2)
    with pytest.raises(ValueError, match="pair up"):
        mutual_information_bits([0, 1], [0])


def test_specialization_by_token_class():
    classes = np.array([2, 2, 4, 4, 5])  # token ids 0,1: punctuation; 2,3: word starts; 4: a word piece
    experts = np.array([0] * 40 + [1] * 40)
    tokens = np.array([0, 1] * 20 + [2, 3] * 20)  # expert 0: only punctuation; expert 1: only word starts
    s = specialization(experts, tokens, classes, seed=0)
    assert s["mi_class_bits"] == pytest.approx(1.0) and s["class_entropy_bits"] == pytest.approx(1.0)
    assert s["mi_token_bits"] == pytest.approx(1.0)  # the token determines the expert
    assert s["mi_token_shuffled_bits"] < 0.1 and s["mi_token_excess_bits"] > 0.9
    rng = np.random.default_rng(0)
    independent = specialization(rng.integers(0, 4, 4000), rng.integers(0, 5, 4000), classes, seed=1)
    assert independent["mi_class_bits"] < 0.01 and abs(independent["mi_token_excess_bits"]) < 0.01


# ---------------------------------------------------------- experts from dense


def test_cluster_init_from_a_random_dense_ffn_reproduces_it(tmp_path):
    """Every expert with gate 1 sums to the dense FFN it was cut from (the
    construction's identity; each expert carries b2 / k, so the N experts add
    b2 N/k times), and the keys are unit vectors (the cosine layer's direction
    of each cluster's mean raw W1 row)."""
    from some.construction import init_experts_from_dense, random_dense_ffn

    config = apply_overrides(get_preset("tiny-test"), ["expert_init=cluster", "cluster_method=kmeans",
                                                       f"cache_dir={tmp_path}"])
    model = SoMEForCausalLM(config)
    record = init_experts_from_dense(model, config)
    assert [layer["layer"] for layer in record["layers"]] == [0, 1]
    layer, ffn = model.some_layers()[1], random_dense_ffn(config, 1, "cpu")
    x = torch.randn(5, config.d_model)
    dense = ffn(x)
    experts = sum(torch.nn.functional.gelu(x @ layer.w1[e].T + layer.b1[e]) @ layer.w2[e].T + layer.b2[e]
                  for e in range(config.num_experts))
    N, k = config.num_experts, config.top_k
    torch.testing.assert_close(layer.b2, (ffn.fc2.bias / k).detach().expand(N, -1))
    torch.testing.assert_close(experts - (N / k - 1) * ffn.fc2.bias.detach(), dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.keys.norm(dim=1), torch.ones(config.num_experts))


def test_pretrained_source_trains_caches_and_transfers(tmp_path):
    from some.construction import dense_cache_path
    from some.runs import Trainer

    config = apply_overrides(get_preset("tiny-test"), [
        "expert_init=cluster", "dense_source=pretrained", "dense_pretrain_epochs=1", "epochs=1",
        "train_subset_size=32", "val_subset_size=8", f"cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(config, tmp_path / "run", progress=False, echo=False)
    record = json.loads((tmp_path / "run" / "dense.json").read_text())
    assert record["dense"]["steps"] == 4 and not record["dense"]["cached"]
    assert math.isfinite(record["dense"]["val_perplexity"])
    state = torch.load(dense_cache_path(config), weights_only=True)["model"]
    torch.testing.assert_close(trainer.model.embed.weight, state["embed.weight"])  # dense_transfer = all
    torch.testing.assert_close(trainer.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # a second run with the same dense configuration takes the cached model
    Trainer(config, tmp_path / "run2", progress=False, echo=False)
    assert json.loads((tmp_path / "run2" / "dense.json").read_text())["dense"]["cached"]


def test_dense_fields_are_validated():
    config = get_preset("tiny-test")
    with pytest.raises(ConfigError, match="cluster_method"):
        apply_overrides(config, ["expert_init=cluster", "cluster_method=dbscan"])
    with pytest.raises(ConfigError, match="dense_source = 'pretrained' needs expert_init = 'cluster'"):
        apply_overrides(config, ["dense_source=pretrained"])
    with pytest.raises(ConfigError, match="expert_init"):
        apply_overrides(config, ["expert_init=orthogonal"])
    with pytest.raises(ConfigError, match="dense_grad_accum"):
        apply_overrides(config, ["dense_grad_accum=3"])  # batch_size 8


# --------------------------------------------------------------------- notebook


@pytest.mark.slow
def test_ablations_notebook_runs_on_a_study_output(finished_study, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path, out = finished_study
    monkeypatch.setenv("SOME_STUDY_DIR", str(out))
    # as tests/test_notebooks.py: the on-import rebuild of an editable install needs a real stderr
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    nb = nbformat.read(REPO / "notebooks" / "ablations.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert pngs == 4
    assert "6 runs, variants ['softmax', 'top_p', 'sequence']" in text
    assert re.search(r"id_perplexity: average ranks over 2 blocks: .*; Friedman test p = [\d.e-]+", text)
