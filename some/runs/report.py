"""``report.md`` of a run directory, built only from the files in it
(``config.yaml``, ``run.json``, ``metrics.jsonl``, ``dynamics.jsonl``, ``analysis.json``, the PNGs),
so ``some report RUN_DIR`` can rebuild it at any time, also for an unfinished run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..analysis import entropy_bits, experts_used, gini, max_entropy_bits
from ..analysis.dynamics_plots import dynamics_curves, usage_heatmap
from ..analysis.plots import keystore_umap, usage_histogram
from ..errors import RunDirError
from ..files import atomic_write, read_text_file
from .config import SoMEConfig
from .dynamics import read_dynamics
from .rundir import RunDirectory
from .specialization import SPECIALIZATION_FILE, specialization_analysis, specialization_pictures

__all__ = ["build_report", "dynamics_pictures", "finish_run", "read_run", "utilization_analysis", "write_report"]

log = logging.getLogger(__name__)


def utilization_analysis(counts, layer: int, used_in_training=None) -> dict[str, Any]:
    """The aggregate utilization analysis of docs/method.md §6 from a layer's validation usage counts
    (and, given the layer's ``ever_used`` flags, the experts used at least once in training)."""
    used = experts_used(counts)
    n = len(counts)
    training = {}
    if used_in_training is not None:
        k = int(sum(bool(u) for u in used_in_training))
        training = {"experts_used_training": k, "experts_used_training_text": f"{k}/{n} ({100 * k / n:.2f}%)"}
    return {
        "middle_layer": layer,
        "num_experts": n,
        "experts_used": used.used,
        "experts_used_text": str(used),  # '64/64 (100.00%)'
        **training,
        "gini": float(gini(counts)),
        "entropy": float(entropy_bits(counts)),
        "max_entropy": float(max_entropy_bits(n)),
        "usage_counts": counts.tolist(),
    }


def finish_run(run_dir: RunDirectory, model, counts, middle: int | None, *, make_plots: bool = True, data=None,
               config: SoMEConfig | None = None, device=None, rp=None) -> dict[str, Any] | None:
    """The end of a run: log and write the middle layer's analysis, its pictures, the experts'
    specialization (given the run's ``data``, ``config`` and ``device``; from the routing pass
    ``rp`` over the validation set when the caller took one) and ``report.md``. A dense control
    (``middle`` None: no SoME layer) has no expert analysis: the report alone, and None."""
    if middle is None:
        if run_dir.is_main:
            log.info(f"Report: {write_report(run_dir.path)}")
        return None
    n_layers = len(model.blocks)
    layer = model.some_layers()[middle]
    analysis = utilization_analysis(counts, middle, layer.telemetry.ever_used.cpu().tolist())
    log.info(f"Aggregate utilization analysis (middle layer {middle} of {n_layers}, validation set):")
    log.info(f"Experts used: {analysis['experts_used_text']}")  # the seed's lines, as they were
    log.info(f"Final Gini: {analysis['gini']:.3f}")
    log.info(f"Final Entropy: {analysis['entropy']:.3f} (Max: {analysis['max_entropy']:.3f})")
    log.info(f"Experts used at least once during training: {analysis['experts_used_training_text']}")
    if not run_dir.is_main:  # rank 0 writes the analysis, pictures and report
        return analysis
    out = run_dir.path
    run_dir.write_json("analysis.json", analysis)
    spec = None
    if data is not None and config is not None:
        spec = specialization_analysis(model, data, batch_size=config.micro_batch_size,
                                       device=device, routing_level=config.routing_level, seed=config.seed, rp=rp,
                                       precision=config.precision)
        run_dir.write_json(SPECIALIZATION_FILE, spec)
        m = spec["layers"][middle]
        topic = (f", I(expert; topic) = {m['mi_topic_bits']:.3f} bits (excess {m['mi_topic_excess_bits']:.3f}, "
                 f"H(topic) = {m['topic_entropy_bits']:.2f})" if "mi_topic_bits" in m else "")
        log.info(f"Specialization (layer {middle}): I(expert; token class) = {m['mi_class_bits']:.3f} bits{topic}")
    if make_plots:
        n = analysis["num_experts"]
        usage_histogram(counts, out / "usage_histogram.png",
                        title=f"Expert usage, layer {middle} (N = {n}, validation set)", unit="selections")
        keystore_umap(layer.keys.detach().float().cpu(), counts, out / "keystore_umap.png",
                      title=f"Key store (UMAP), layer {middle}, colored by usage")
        dynamics_pictures(out, middle)
        if spec is not None:
            specialization_pictures(spec, out)
    log.info(f"Report: {write_report(out)}")
    return analysis


def dynamics_pictures(run_dir: str | Path, middle: int) -> list[Path]:
    """``usage_heatmap.png`` (the middle layer's experts x steps) and ``dynamics.png``
    (curves of every layer) from ``dynamics.jsonl``; none without records."""
    run_dir = Path(run_dir)
    records = read_dynamics(run_dir)
    mid = [r for r in records if r["layer"] == middle]
    if not mid:
        return []
    heat = usage_heatmap([r["step"] for r in mid], [r["counts"] for r in mid], run_dir / "usage_heatmap.png",
                         title=f"Expert usage per logging window, layer {middle} (training batches)")
    curves = dynamics_curves(records, run_dir / "dynamics.png", title="Routing dynamics per SoME layer")
    return [heat, curves]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The parsed files of a run directory: config, run info, history, analysis."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory (no config.yaml)")
    history = _read_jsonl(run_dir / "metrics.jsonl")
    return {
        "config": SoMEConfig.load_yaml(config_path),
        "info": _read_json(run_dir / "run.json"),
        "history": history,
        "analysis": _read_json(run_dir / "analysis.json"),
    }


def build_report(run_dir: str | Path) -> str:
    """The Markdown text of the run's report."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    cfg: SoMEConfig = run["config"]
    info, history, analysis = run["info"] or {}, run["history"], run["analysis"]
    lines = [f"# SoME run `{run_dir.name}`", ""]
    if history:  # the headline numbers first
        last = history[-1]
        ood = f" (OOD {cfg.ood_source}: {last['ood_perplexity']:.2f})" if "ood_perplexity" in last else ""
        used = f"; experts used {analysis['experts_used_text']}" if analysis else ""
        experts = (f"; middle layer Gini {last['gini']:.3f}, entropy {last['entropy']:.3f} bits{used}"
                   if last.get("gini") is not None else "")
        headline = (f"**After epoch {last['epoch']}/{cfg.epochs}:** val loss {last['val_loss']:.4f}, "
                    f"val perplexity {last['val_perplexity']:.2f}{ood}{experts}.")
        lines += [headline, ""]

    # ---- architecture
    lines += ["## Architecture", ""]
    lines += [cfg.describe(), ""]
    params = info.get("parameters")
    if params:
        total, trainable = params["total"], params["trainable"]
    if params and "total_steps" in info:  # the seed's one-line summary
        what = f"expert init {cfg.expert_init}, router {cfg.router}" if cfg.ffn == "some" else "dense control"
        summary = (f"**{total / 1e6:.2f}M total / {trainable / 1e6:.2f}M trainable parameters, "
                   f"{info['total_steps']} steps, {what}**")
        lines += [summary, ""]
    if params:
        lines.append(f"- Total parameters: {total / 1e6:.2f}M; Trainable parameters: {trainable / 1e6:.2f}M "
                     f"({100 * trainable / total:.2f}%)")
    if "total_steps" in info:
        lines.append(f"- Steps: {info['total_steps']} ({cfg.epochs} epochs x {info['steps_per_epoch']} steps of "
                     f"batch {cfg.batch_size})")
    keystore = (f"- Key store: α = {cfg.alpha}, β = {cfg.beta}, δ = {cfg.delta}, "
                f"θ percentile = {cfg.theta_percentile}, γ = {cfg.ema_decay}")
    data = (f"- Data: {cfg.data_source} ({info.get('train_samples', cfg.train_subset_size)} train / "
            f"{info.get('val_samples', cfg.val_subset_size)} val samples)"
            + (f", OOD: {cfg.ood_source}" if cfg.ood_source else ""))
    if cfg.ffn == "some":
        lines += [f"- Expert init: {cfg.expert_init}; router: {cfg.router} ({cfg.routing_level}-level)", keystore]
    lines += [data, ""]
    if info.get("device"):
        lines += [f"Trained on `{info['device']}` with torch {info.get('torch', '?')}, some {info.get('some', '?')}.",
                  ""]

    # ---- per-epoch results
    lines += ["## Results per epoch", ""]
    if history:
        has_ood = any("ood_loss" in r for r in history)
        head = ["Epoch", "Step", "Train loss", "Val loss", "Val PPL"]
        head += ["OOD loss", "OOD PPL"] if has_ood else []
        experts = cfg.ffn == "some"
        head += (["Gini (middle)", "Entropy (bits)"] if experts else []) + ["Train tok/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in history:
            row = [str(r["epoch"]), str(r["step"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
                   f"{r['val_perplexity']:.2f}"]
            if has_ood:
                row += [f"{r['ood_loss']:.4f}", f"{r['ood_perplexity']:.2f}"] if "ood_loss" in r else ["", ""]
            rate = (r.get("timing") or {}).get("train_tokens_per_s")
            if experts:
                row += ["" if r.get("gini") is None else f"{r['gini']:.3f}",
                        "" if r.get("entropy") is None else f"{r['entropy']:.3f}"]
            row.append(f"{rate:,.0f}" if rate else "")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", ("Losses are mean next-token cross-entropies over real (non-padding) tokens; "
                       "PPL = exp(loss). " + ("Gini and entropy: middle-layer expert usage on the validation set. "
                                              if experts else "") +
                       "Train tok/s counts all batch positions (batch x seq_len, padding included).")]
    else:
        lines.append("No epoch has finished yet.")
    lines.append("")

    # ---- analysis and pictures
    lines += ["## Expert utilization (aggregate, middle layer)", ""]
    if cfg.ffn == "dense":
        lines += ["A dense control has no experts: no utilization, dynamics or specialization.", ""]
    elif analysis:
        where = (f"Middle layer {analysis['middle_layer']} of {cfg.n_layers}, usage counts over the "
                 f"validation tokens after the last epoch.")
        entropy = (f"- Final entropy: {analysis['entropy']:.3f} bits (Max: log2 {analysis['num_experts']} = "
                   f"{analysis['max_entropy']:.3f})")
        training = analysis.get("experts_used_training_text")
        lines += [where, "",
                  f"- Experts used: {analysis['experts_used_text']} on the validation set after the last epoch"
                  + (f"; {training} at least once during training" if training else ""),
                  f"- Final Gini: {analysis['gini']:.3f}",
                  entropy, ""]
    else:
        done = len(history)
        lines += [f"The run has not finished ({done} of {cfg.epochs} epochs); no final analysis yet.", ""]
    for name, caption in (("usage_histogram.png", "Expert usage counts (log scale)"),
                          ("keystore_umap.png", "UMAP projection of the key store")):
        if (run_dir / name).is_file():
            lines += [f"![{caption}]({name})", ""]
    lines += _dynamics_section(run_dir, cfg, analysis["middle_layer"] if analysis else cfg.n_layers // 2)
    lines += _specialization_section(run_dir, cfg)

    # ---- configuration
    lines += ["## Configuration", "", "```yaml", (run_dir / "config.yaml").read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def _dynamics_section(run_dir: Path, cfg: SoMEConfig, middle: int) -> list[str]:
    records = read_dynamics(run_dir)
    if not records:
        return []
    lines = ["## Routing dynamics during training", ""]
    steps = sorted({r["step"] for r in records})
    lines += [f"{len(steps)} records per SoME layer in `dynamics.jsonl` (every "
              f"{steps[1] - steps[0] if len(steps) > 1 else steps[0]} optimizer steps, from the training batches' "
              f"routing; dead = not selected in the last {cfg.dead_after} key updates"
              + (f"; revival of dead keys after {cfg.revive_after} updates" if cfg.revive_after else "") + ").", ""]
    head = ["Layer", "Step", "Used (window)", "Used (total)", "Dead", "Effective", "Gini", "Top-1 score",
            "Key move", "Key cos", "Top-set share", "Common (input)", "Common (query)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    layers = sorted({r["layer"] for r in records})
    for layer in layers:
        rs = [r for r in records if r["layer"] == layer]
        picks = {0: rs[0], len(rs) // 4: rs[len(rs) // 4], len(rs) // 2: rs[len(rs) // 2], len(rs) - 1: rs[-1]}
        for r in (picks[i] for i in sorted(picks)):  # first, a quarter, half way, last
            lines.append("| " + " | ".join([
                str(layer), str(r["step"]), str(r["experts_used"]), str(r["experts_used_total"]), str(r["dead"]),
                f"{r['effective_experts']:.1f}", f"{r['gini']:.3f}", fmt(r["top1_score"], ".3f"),
                f"{r['key_move_mean']:.2e}", f"{r['key_cosine']:.3f}", fmt(r["top_set_share"], ".3f"),
                fmt(r.get("shared_input"), ".3f"), fmt(r.get("shared_query"), ".3f")]) + " |")
    lines += ["", "Window = the steps since the previous record; effective experts = 2^entropy of the window's "
              "selections; key move = mean per-key ||ΔK|| per update; top-set share = share of one batch's tokens "
              "routed to its most common top-k set; common = ||mean||² / mean ||·||² of the window's layer inputs "
              "and queries (1: every token the same direction, the state that precedes a collapse).", ""]
    for name, caption in (("usage_heatmap.png", f"Usage heat map, layer {middle}"),
                          ("dynamics.png", "Routing dynamics curves")):
        if (run_dir / name).is_file():
            lines += [f"![{caption}]({name})", ""]
    return lines


def _specialization_section(run_dir: Path, cfg: SoMEConfig) -> list[str]:
    spec = _read_json(run_dir / SPECIALIZATION_FILE)
    if not spec or not spec.get("layers"):
        return []
    has_topic = any("mi_topic_bits" in m for m in spec["layers"])
    has_seq = any("mi_topic_seq_bits" in m for m in spec["layers"])
    lines = ["## Expert specialization (validation set)", "",
             f"Over (token, selected expert) pairs, {spec['routing_level']}-level routing; topics: "
             + (f"{len(spec['topic_names'])} ({spec['topic_kind']})" if spec.get("topic_names")
                else f"{spec.get('topic_kind') or 'none'}") + ".", ""]
    head = ["Layer", "I(expert; class) (bits)", "H(class)", "I(expert; token) excess"]
    if has_topic:
        head += ["I(expert; topic)", "excess", "H(topic)", "Topic purity"]
    if has_seq:
        head += ["I(expert; topic) per sequence", "excess (seq)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in spec["layers"]:
        if "mi_class_bits" not in m:
            continue
        row = [str(m["layer"]), f"{m['mi_class_bits']:.3f}", f"{m['class_entropy_bits']:.2f}",
               f"{m['mi_token_excess_bits']:.3f}"]
        if has_topic:
            row += [f"{m['mi_topic_bits']:.3f}", f"{m['mi_topic_excess_bits']:.3f}", f"{m['topic_entropy_bits']:.2f}",
                    f"{m['topic_purity']:.3f}"]
        if has_seq:
            row += [f"{m['mi_topic_seq_bits']:.3f}", f"{m['mi_topic_seq_excess_bits']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Excess = the plug-in value minus its value with the labels shuffled across the pairs (the "
              "estimate's finite-sample bias). Topic purity: share of each expert's pairs from its most common "
              "topic, weighted by pairs. Token classes: special / whitespace / punctuation / digits / word start / "
              "word piece (a syntax proxy).", ""]
    for name, caption in (("topic_heatmap.png", "Experts x topics"), ("class_heatmap.png", "Experts x token classes")):
        if (run_dir / name).is_file():
            lines += [f"![{caption}]({name})", ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.md`` and return its path."""
    return atomic_write(Path(run_dir) / "report.md", build_report(run_dir))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(read_text_file(path, "run file"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                          "the run directory is damaged") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(read_text_file(path, "run file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{lineno}: not valid JSON ({e.msg}); the run directory is damaged") from None
    return records
