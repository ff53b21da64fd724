"""A run's model for use outside training: export, evaluation, generation.

    export_run("runs/tiny", "models/tiny")            # some export runs/tiny models/tiny
    evaluate_model("runs/tiny/model", "fortunes")      # some eval runs/tiny/model --data fortunes
    generate_text("runs/tiny/model", "Q: Why")         # some generate runs/tiny/model --prompt "Q: Why"

Every run exports its final model to ``RUN_DIR/model/`` (:func:`export_model`),
a :mod:`some.nn.pretrained` directory plus ``training.json`` (the run's data
fields, so that ``some eval`` rebuilds the run's validation split exactly).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..analysis import entropy_bits, experts_used, gini, max_entropy_bits
from ..analysis.plots import usage_histogram
from ..data import DataConfig, build_data, build_eval_data
from ..engine import evaluate, load_checkpoint, pick_device
from ..errors import ConfigError, ModelFileError, RunDirError
from ..files import atomic_write, read_text_file
from ..nn import SoMEForCausalLM, warn_if_methods_changed
from .config import SoMEConfig

__all__ = ["MODEL_DIR", "TRAINING_FILE", "evaluate_model", "export_model", "export_run", "generate_text",
           "load_model", "training_record"]

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # RUN_DIR/model
TRAINING_FILE = "training.json"  # the run's data fields, next to the model files


def _card_info(run_name: str, config: SoMEConfig, history: list[dict[str, Any]], description: str) -> dict:
    last = history[-1] if history else {}
    metrics = {k: last[k] for k in ("val_loss", "val_perplexity", "ood_perplexity", "gini", "entropy")
               if last.get(k) is not None}  # (a dense control has no gini / entropy)
    if last:
        metrics["epochs"] = last.get("epoch")
    return {"name": run_name, "data": description, "metrics": metrics}


def _training_fields(config: SoMEConfig) -> dict[str, Any]:
    data = config.data_config()
    return {"data_source": config.data_source, "ood_source": config.ood_source, "seq_len": config.seq_len,
            "packed": config.packed, "seed": config.seed, "train_subset_size": config.train_subset_size,
            "val_subset_size": config.val_subset_size, "eval_batch_size": config.micro_batch_size,
            "tokenizer_min_frequency": data.tokenizer_min_frequency, "precision": config.precision}


def export_model(model: SoMEForCausalLM, out_dir: str | Path, *, tokenizer, config: SoMEConfig,
                 history: list[dict[str, Any]], description: str, run_name: str) -> Path:
    """Write ``model`` (with ``tokenizer`` and a model card) to ``out_dir``, replacing it whole:
    the files go to a sibling temporary directory that is then renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.tokenizer, model.card_info = tokenizer, _card_info(run_name, config, history, description)
    model.save_pretrained(tmp)
    atomic_write(tmp / TRAINING_FILE, json.dumps(_training_fields(config), indent=2) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a run's model from its checkpoint (runs of versions before the automatic
    export, or to another place): ``out_dir`` defaults to ``RUN_DIR/model``."""
    run_dir = Path(run_dir)
    config_path, ckpt = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    if not ckpt.is_file():
        raise RunDirError(f"{run_dir} has no checkpoint.pt to export")
    config = SoMEConfig.load_yaml(config_path)
    state = load_checkpoint(ckpt)
    model = SoMEForCausalLM(config)
    model.methods_revision = state.get("methods_revision", 1)  # checkpoints before the field: revision 1
    warn_if_methods_changed(config, model.methods_revision, str(ckpt))
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{ckpt}: the model state does not fit {config_path} ({' '.join(str(e).split())[:400]})"
                             ) from None
    data = build_data(config.data_config())  # the run's tokenizer (cached), made again from the same documents
    history = state.get("history") or []
    return export_model(model.eval(), out_dir or run_dir / MODEL_DIR, tokenizer=data.tokenizer, config=config,
                        history=history, description=data.description, run_name=run_dir.name)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> SoMEForCausalLM:
    """A model directory (or hub id) as an eval-mode model on ``device`` that has its tokenizer."""
    model = SoMEForCausalLM.from_pretrained(str(model_dir), device=str(pick_device(device)))
    if model.tokenizer is None:
        raise ModelFileError(f"{model_dir} has no tokenizer.json: text in and out needs it")
    return model


def training_record(model_dir: Path) -> dict[str, Any]:
    """The run's data fields saved next to its model (``training.json``); {} without the file."""
    path = model_dir / TRAINING_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(read_text_file(path, "training record"))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON ({e.msg})") from None


def evaluate_model(model_dir: str | Path, source: str | None = None, *, ood: str | None = None,
                   out_dir: str | Path | None = None, device: str | torch.device = "auto",
                   val_docs: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """Perplexity over real tokens and the middle layer's usage on the validation split of
    ``source`` (default: the run's own corpus, split as the run split it), and on ``ood``;
    writes ``eval.json``, ``eval.md`` and the usage histogram to ``out_dir`` when given."""
    model_dir = Path(model_dir)
    device = pick_device(device)
    model = load_model(model_dir, device)
    run = training_record(model_dir)
    source = source or run.get("data_source")
    if source is None:
        raise ModelFileError(f"{model_dir} records no training corpus: give --data SOURCE")
    same = source == run.get("data_source")
    try:  # the data module checks its config (source names, OOD another corpus) with ValueError
        cfg = DataConfig(source=source, ood_source=ood, seq_len=run.get("seq_len", model.config.seq_len),
                         vocab_size=model.config.vocab_size, packed=run.get("packed", False),
                         seed=run.get("seed", 0), train_subset_size=run.get("train_subset_size", 1) if same else 1,
                         val_subset_size=val_docs or run.get("val_subset_size", 2000)).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data = build_eval_data(cfg, model.tokenizer, same_split=same)
    batch = batch_size or run.get("eval_batch_size", 16)
    middle = len(model.some_layers()) // 2 if model.some_layers() else None  # None: a dense control
    result: dict[str, Any] = {"model": str(model_dir), "device": str(device), "source": source,
                              "split": "the run's validation split" if same else "validation split of a fresh split",
                              "documents": data.val.num_documents, "tokens": data.val.num_tokens}
    precision = run.get("precision", "auto")  # as the model was trained (runs before the field: auto)
    val = evaluate(model, data.val, batch, device, middle, precision=precision)
    counts = val.usage_counts
    result.update(loss=val.loss, perplexity=val.perplexity, middle_layer=middle)
    if counts is not None:
        result.update(experts_used=experts_used(counts).used, experts_used_text=str(experts_used(counts)),
                      gini=float(gini(counts)), entropy=float(entropy_bits(counts)),
                      max_entropy=float(max_entropy_bits(len(counts))), usage_counts=counts.tolist())
    if data.ood is not None:
        o = evaluate(model, data.ood, batch, device, precision=precision)
        result.update(ood_source=ood, ood_loss=o.loss, ood_perplexity=o.perplexity)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "eval.json", json.dumps(result, indent=2) + "\n")
        atomic_write(out / "eval.md", eval_text(result) + "\n")
        if counts is not None:
            usage_histogram(counts, out / "usage_histogram.png",
                            title=f"Expert usage, layer {middle} ({source}, validation)", unit="selections")
    return result


def eval_text(r: dict[str, Any]) -> str:
    """The few lines ``some eval`` prints."""
    lines = [f"Model {r['model']} on {r['source']} ({r['split']}: {r['documents']} documents, {r['tokens']:,} "
             f"tokens)", f"Val Loss = {r['loss']:.4f}, Val Perplexity = {r['perplexity']:.2f}"]
    if "ood_perplexity" in r:
        lines.append(f"OOD ({r['ood_source']}): Val Loss = {r['ood_loss']:.4f}, "
                     f"Val Perplexity = {r['ood_perplexity']:.2f}")
    if "gini" in r:
        lines.append(f"Middle layer {r['middle_layer']}: experts used {r['experts_used_text']}, "
                     f"Gini = {r['gini']:.3f}, Entropy = {r['entropy']:.3f} (Max: {r['max_entropy']:.3f})")
    return "\n".join(lines)


def generate_text(model_dir: str | Path | SoMEForCausalLM, prompt: str, *, num_samples: int = 1,
                  max_new_tokens: int = 60, temperature: float = 0.8, top_k: int | None = 50,
                  top_p: float | None = 0.95, greedy: bool = False, seed: int = 0,
                  device: str | torch.device = "cpu") -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the prompt is framed as a document is
    in training: after an ``<|endoftext|>``), decoded without special tokens."""
    model = model_dir if isinstance(model_dir, SoMEForCausalLM) else load_model(model_dir, device)
    tok = model.tokenizer
    eos = model.eos_token_id if model.eos_token_id is not None else tok.token_to_id("<|endoftext|>")
    ids = [eos] + tok.encode(prompt, add_special_tokens=False).ids
    room = model.config.seq_len - len(ids)
    if room < 1:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {model.config.seq_len}")
    device = model.lm_head.weight.device
    batch = torch.tensor([ids] * num_samples, device=device)
    out = model.generate(batch, min(max_new_tokens, room), do_sample=not greedy, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos)
    return [prompt + tok.decode(row[len(ids):].tolist(), skip_special_tokens=True) for row in out]
