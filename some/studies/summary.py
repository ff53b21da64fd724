"""The summary of a study: ``runs.csv`` (one row per run), ``results.csv`` and
``results.md`` (one row per variant, with the Friedman ranks over the
dataset × seed blocks) and the comparison pictures."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import TOKEN_CLASSES, friedman
from ..analysis.dynamics_plots import dynamics_comparison, usage_heatmap_grid
from ..analysis.plots import comparison_bars, label_heatmap, perplexity_plot, usage_grid
from ..files import atomic_write
from .schema import Run, Study, plural

__all__ = ["RESULT", "read_results", "summarize"]

RESULT = "result.json"  # written last into a run directory: the run is finished


# (key in result.json, header, format) of the per-variant table; perplexities come per dataset.
_COLUMNS = [
    ("flops_per_token_analytic", "MFLOPs/token (analytic)", "{:.4g}", 1e-6),
    ("flops_per_token_counted", "MFLOPs/token (counted)", "{:.4g}", 1e-6),
    ("peak_memory_mb", "Peak memory (MiB)", "{:,.0f}", 1),
    ("train_tokens_per_s", "Train tok/s", "{:,.0f}", 1),
    ("latency_ms", "Latency (ms)", "{:.3g}", 1),
    ("experts_per_token", "Experts/token", "{:.3g}", 1),
    ("experts_used", "Experts used", "{:.4g}", 1),
    ("active_experts", "Active experts", "{:.4g}", 1),
    ("gini", "Gini", "{:.3f}", 1),
    ("entropy_bits", "Entropy (bits)", "{:.3f}", 1),
    ("spec_mi_class_bits", "MI(expert; token class) (bits)", "{:.3f}", 1),
    ("spec_mi_token_excess_bits", "MI(expert; token) excess (bits)", "{:.3f}", 1),
    ("spec_mi_topic_excess_bits", "MI(expert; topic) excess (bits)", "{:.3f}", 1),
    ("spec_topic_purity", "Topic purity", "{:.3f}", 1),
    ("spec_mi_topic_seq_excess_bits", "MI(expert; topic) per sequence, excess (bits)", "{:.3f}", 1),
    ("dyn_experts_used_training", "Used in training", "{:.4g}", 1),
    ("dyn_effective_final", "Effective (end of training)", "{:.3g}", 1),
    ("dyn_dead_final", "Dead (end of training)", "{:.4g}", 1),
    ("dyn_collapse_step", "Collapse step", "{:.0f}", 1),
    ("dyn_revived_total", "Keys revived", "{:.4g}", 1),
]
# Measured only where a dataset labels its documents with topics: left out of the
# table (not shown as a column of n/a) when no run has them.
_TOPIC_COLUMNS = {"spec_mi_topic_excess_bits", "spec_topic_purity", "spec_mi_topic_seq_excess_bits"}


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every finished run under a study's output
    directory (no study file needed), each with its ``history`` (the run's
    ``metrics.jsonl``) and ``run_dir`` added; sorted by variant order of
    ``results.csv`` when there is one, then dataset and seed."""
    out = Path(out)
    rows = []
    for path in sorted(out.glob(f"runs/*/*/seed*/{RESULT}")):
        row = json.loads(path.read_text())
        metrics = path.parent / "metrics.jsonl"
        row["history"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.is_file() else []
        row["run_dir"] = str(path.parent)
        rows.append(row)
    order: dict[str, int] = {}
    if (out / "results.csv").is_file():
        with open(out / "results.csv", newline="") as f:
            order = {r["variant"]: i for i, r in enumerate(csv.DictReader(f))}
    return sorted(rows, key=lambda r: (order.get(r["variant"], len(order)), r["dataset"], r["seed"]))


def _load_results(study: Study, out: Path) -> tuple[list[dict[str, Any]], list[Run]]:
    rows, missing = [], []
    for run in study.runs:
        path = run.dir(out) / RESULT
        if path.is_file():
            rows.append(json.loads(path.read_text()))
        else:
            missing.append(run)
    return rows, missing


def _write_csv(path: Path, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value: no spread to show)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def summarize(study: Study, out: str | Path) -> Path:
    """Write ``runs.csv``, ``results.csv``, ``results.md`` and the pictures of
    the finished runs in ``out``; returns the path of ``results.md``."""
    out = Path(out)
    rows, missing = _load_results(study, out)
    variants = [v.name for v in study.variants]
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in variants}

    # ---- runs.csv: one row per run, every scalar measured
    # the union over the runs, in first-seen order: a key only some runs measure (the
    # per-sequence topic MI of sequence-level routing) still gets its column
    scalar_keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))
    _write_csv(out / "runs.csv", scalar_keys, rows)

    # ---- Friedman ranks over the complete dataset × seed blocks
    ranks: dict[str, Any] = {}
    for metric in ("id_perplexity", "ood_perplexity"):
        blocks: dict[str, dict[str, float]] = {}
        for r in rows:
            blocks.setdefault(f"{r['dataset']}/seed{r['seed']}", {})[r["variant"]] = r[metric]
        complete = {b: s for b, s in blocks.items() if set(s) == set(variants)}
        ranks[metric] = friedman(complete, variants=variants) if complete else None

    # ---- per-variant table
    table: list[dict[str, Any]] = []
    for v in variants:
        rs = by_variant[v]
        row: dict[str, Any] = {"variant": v, "runs": len(rs),
                               "num_experts": rs[0]["num_experts"] if rs and rs[0]["num_experts"] else math.nan}
        for ds in study.datasets:
            for metric in ("id_perplexity", "ood_perplexity"):
                vals = [r[metric] for r in rs if r["dataset"] == ds.name]
                mean, std = _mean_std(vals) if vals else (math.nan, math.nan)
                row[f"{metric}[{ds.name}]"], row[f"{metric}_std[{ds.name}]"] = mean, std
        for key, *_ in _COLUMNS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = _mean_std(vals)[0] if vals else math.nan
        # measured, and no run collapsed (rather than not measured)
        row["no_collapse"] = bool(rs) and all("dyn_collapse_step" in r and r["dyn_collapse_step"] is None for r in rs)
        for metric in ("id_perplexity", "ood_perplexity"):
            fr = ranks[metric]
            row[f"rank_{metric}"] = fr.avg_ranks[v] if fr is not None else math.nan
        table.append(row)
    _write_csv(out / "results.csv", list(table[0]), table)

    pictures = _pictures(study, out, table, by_variant)
    text = _markdown(study, out, rows, table, ranks, missing, pictures)
    atomic_write(out / "results.md", text)
    return out / "results.md"


def _construction_section(study: Study, rows) -> list[str]:
    """Where the experts came from, for variants with expert_init = cluster:
    the dense model's own perplexity and the clustering's cost and balance."""
    built = [r for r in rows if r.get("dense")]
    if not built:
        return []
    lines = ["## Expert construction", "",
             "| Variant | Dense source | Dense model val PPL | Clustering (s, all layers) | Cluster sizes before "
             "rebalancing | Neurons moved per layer |", "|---|---|---|---|---|---|"]
    for v in study.variants:
        rs = [r["dense"] for r in built if r["variant"] == v.name]
        if not rs:
            continue
        dense_ppl = [d["dense"]["val_perplexity"] for d in rs if "dense" in d]
        seconds = [sum(layer["seconds"] for layer in d["layers"]) for d in rs]
        lo = min(layer["raw_size_min"] for d in rs for layer in d["layers"])
        hi = max(layer["raw_size_max"] for d in rs for layer in d["layers"])
        moved = [layer["n_moved"] for d in rs for layer in d["layers"]]
        source = rs[0]["dense_source"] + (f" (transfer: {rs[0]['dense_transfer']})"
                                          if rs[0]["dense_source"] == "pretrained" else "")
        lines.append(f"| `{v.name}` | {source} | "
                     f"{_cell(*_mean_std(dense_ppl), fmt='{:.2f}') if dense_ppl else 'n/a (not pre-trained)'} | "
                     f"{np.mean(seconds):.2f} | {lo}..{hi} | {np.mean(moved):.0f} |")
    return lines + ["", "Clustering time is part of each run's process (and of its peak memory); the dense "
                        "model is pre-trained once per dataset × seed in a process of its own and cached.", ""]


def _baseline_note(rows) -> str:
    base = [r["baseline_rss_mb"] for r in rows if r.get("baseline_rss_mb") is not None
            and math.isfinite(r["baseline_rss_mb"]) and r["memory_kind"].startswith("peak RSS")]
    if not base:
        return ""
    return (f" (a CPU process's RSS includes Python, PyTorch and the extension: {np.mean(base):,.0f} MiB on average "
            f"before any data or model was built)")


def _cell(value: float, std: float | None = None, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = fmt.format(value * scale)
    if std is not None and math.isfinite(std):
        text += " ± " + fmt.format(std * scale)
    return text


def _markdown(study: Study, out: Path, rows, table, ranks, missing, pictures: list[tuple[str, str]]) -> str:
    kinds = sorted({r["memory_kind"] for r in rows})
    devices = sorted({r["device"] for r in rows})
    lines = [f"# Ablation study `{study.name}`{' (smoke)' if study.smoke else ''}", ""]
    if study.description:
        lines += [study.description, ""]
    if study.smoke:
        lines += ["*Smoke version* (the file's `smoke` section: a tiny model, a few steps): it checks that the "
                  "study runs end to end and every column is measured; its numbers are not results.", ""]
    lines += [(f"Study file `{study.path}`; preset `{study.preset}`; {plural(len(study.variants), 'variant')} × "
               f"{plural(len(study.datasets), 'dataset')} × {plural(len(study.seeds), 'seed')} "
               f"({', '.join(map(str, study.seeds))}); {len(rows)} of {len(study.runs)} runs finished; "
               f"device {', '.join(devices) or 'n/a'}."), ""]

    columns = [c for c in _COLUMNS if c[0] not in _TOPIC_COLUMNS
               or any(not math.isnan(row[c[0]]) for row in table)]
    if not _TOPIC_COLUMNS & {c[0] for c in columns}:
        lines += ["No run of this study measured topic specialization (no dataset labels its documents with topics, "
                  "or the runs predate the measure): the topic columns are left out.", ""]
    head = ["Variant"]
    for ds in study.datasets:
        suffix = f" {ds.name}" if len(study.datasets) > 1 else ""
        head += [f"ID PPL{suffix}", f"OOD PPL{suffix}"]
    for key, title, *_ in columns:
        head.append(f"Peak memory (MiB, {' / '.join(kinds) or 'n/a'})" if key == "peak_memory_mb" else title)
    head += ["Friedman rank (ID PPL)", "Friedman rank (OOD PPL)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [f"`{row['variant']}`"]
        for ds in study.datasets:
            for metric in ("id_perplexity", "ood_perplexity"):
                cells.append(_cell(row[f"{metric}[{ds.name}]"], row[f"{metric}_std[{ds.name}]"], "{:.2f}"))
        for key, _, fmt, scale in columns:
            cell = _cell(row[key], fmt=fmt, scale=scale)
            if key == "dyn_collapse_step" and row["no_collapse"]:
                cell = "none"
            if key in ("experts_used", "active_experts", "dyn_experts_used_training") and cell != "n/a":
                cell += f" / {row['num_experts']}"  # of N (scale studies vary N)
            cells.append(cell)
        for metric in ("id_perplexity", "ood_perplexity"):
            cells.append(_cell(row[f"rank_{metric}"], fmt="{:.2f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for metric, what in (("id_perplexity", "ID"), ("ood_perplexity", "OOD")):
        fr = ranks[metric]
        if fr is None:
            lines.append(f"Friedman test ({what} perplexity): n/a: no dataset × seed block has every variant finished.")
        elif fr.p_value is None:
            lines.append(f"Friedman test ({what} perplexity, {fr.n_blocks} blocks): n/a: {fr.reason}.")
        else:
            lines.append(f"Friedman test ({what} perplexity, {fr.n_variants} variants, {fr.n_blocks} dataset × seed "
                         f"blocks): χ² = {fr.statistic:.3f}, **p = {fr.p_value:.3g}**.")
        lines.append("")
    if missing:
        lines += [f"**Unfinished runs ({len(missing)})**, not in the table: "
                  + ", ".join(f"{r.variant}/{r.dataset}/seed{r.seed}" for r in missing), ""]

    lines += _construction_section(study, rows)
    lines += ["## How each column is measured", "",
              "- **ID / OOD PPL**: exp of the mean next-token loss over the real tokens of the validation set / "
              "of the OOD corpus after the last epoch; mean ± standard deviation over seeds."
              + "".join(f" `{ds.name}`: ID `{ds.data_source}`, OOD `{ds.ood_source}`." for ds in study.datasets),
              "- **MFLOPs/token**: forward FLOPs per token (a multiply-add = 2; matrix products only, attention as the "
              "full S×S product, S = seq_len), analytic from the architecture with the measured experts per token of "
              "each layer, and counted with `torch.utils.flop_counter.FlopCounterMode` (the SoME ops register their "
              "formulas) on a forward of real validation tokens without padding.",
              f"- **Peak memory**: of each run's training, which runs in its own process: "
              f"{'; '.join(kinds) or 'n/a'}" + _baseline_note(rows) + ".",
              "- **Train tok/s**: input positions (padding included) per second of training, over the epochs.",
              "- **Latency**: median wall time of one eval-mode forward of "
              f"{study.measure.latency_batch} × seq_len real tokens, over {study.measure.latency_repeats} timed "
              f"passes after {study.measure.latency_warmup} untimed.",
              "- **Experts/token, experts used, active experts, Gini, entropy**: middle layer (L // 2), over the "
              "validation tokens after training; active = experts routing may select (the adaptive process masks "
              "some out; N otherwise).",
              "- **MI(expert; token class)**: mutual information in bits between the expert id and the class of the "
              "token it receives (special / whitespace / punctuation / digits / word start / word piece), over "
              "(token, selected expert) pairs of the middle layer on the validation set. **MI(expert; token) "
              "excess**: the same with the token id, minus its value with the token ids shuffled across pairs (the "
              "finite-sample bias of the plug-in estimate).",
              "- **MI(expert; topic) excess**: the same over (token, selected expert) pairs with the topic of the "
              "token's document (fortunes: its file; the Bible: its book), minus its shuffled-label value; **topic "
              "purity**: the share of each expert's pairs from its most common topic, weighted by pairs; **per "
              "sequence** (sequence-level routing only): over (sequence, selected expert) pairs with the sequence's "
              "topic, minus its value with the topics permuted between sequences (runs made before 2026-12-02 "
              "shuffled the pairs one by one instead, a baseline biased upward because each sequence's k experts "
              "are distinct by construction: there a value below 0 means no topic signal). Fan et al. (2024) "
              "expect sequence-level routing to specialize by topic and token-level "
              "routing by syntax (the token class).",
              "- **Used in training / Effective / Dead (end of training)**: the middle layer's routing dynamics "
              "(`dynamics.jsonl`, the training batches): experts selected at least once during training; 2^entropy "
              "of the last logging window's selections; experts not selected in the last `dead_after` key updates. "
              "**Collapse step**: the first logged step at which the window's effective experts fell to N/4 or "
              "fewer (mean over the runs that collapsed; none: no run did). **Keys revived**: by `revive_after`.",
              "- **Friedman rank**: average rank of the variant (1 = lowest perplexity) over the dataset × seed "
              "blocks; the Friedman test's p-value is under the table.", ""]

    lines += ["## Variants", "", "| Variant | Config fields it sets |", "|---|---|"]
    for v in study.variants:
        sets = ", ".join(f"`{k}={val}`" for k, val in v.overrides.items()) or "(the base configuration)"
        lines.append(f"| `{v.name}` | {sets} |")
    lines.append("")
    if pictures:
        lines += ["## Pictures", ""]
        for name, caption in pictures:
            lines += [f"![{caption}]({name})", ""]
    lines += ["Run directories: `runs/VARIANT/DATASET/seedS/` (report.md, metrics.jsonl, result.json); one row per "
              "run in `runs.csv`, this table in `results.csv`.", ""]
    return "\n".join(lines)


def _pictures(study: Study, out: Path, table, by_variant) -> list[tuple[str, str]]:
    pics = []
    for ds in study.datasets:
        runs = {v: [r for r in rs if r["dataset"] == ds.name] for v, rs in by_variant.items()}
        if any(runs.values()):
            name = f"perplexity_{ds.name}.png"
            perplexity_plot(runs, out / name, title=f"{study.name}: perplexity per variant (ID {ds.data_source}, "
                                                    f"OOD {ds.ood_source})")
            pics.append((name, f"Perplexity per variant, {ds.name}"))
    counts = {}
    for v, rs in by_variant.items():
        first = sorted(rs, key=lambda r: (r["dataset"] != study.datasets[0].name, r["seed"]))
        if first and "usage_counts" in first[0]:  # (a dense control has no experts)
            counts[v] = np.asarray(first[0]["usage_counts"], dtype=np.float64)
    if counts:
        ds0, seed0 = study.datasets[0].name, study.seeds[0]
        usage_grid(counts, out / "usage.png",
                   title=f"{study.name}: expert usage of the middle layer on the validation set ({ds0}, seed {seed0})")
        pics.append(("usage.png", "Expert usage per variant"))
    series = {}
    for v, rs in by_variant.items():
        first = sorted(rs, key=lambda r: (r["dataset"] != study.datasets[0].name, r["seed"]))
        if first and first[0].get("dyn_series"):
            series[v] = first[0]["dyn_series"]
    if series:
        ds0, seed0 = study.datasets[0].name, study.seeds[0]
        dynamics_comparison(series, out / "dynamics.png",
                            title=f"{study.name}: routing dynamics of the middle layer during training "
                                  f"({ds0}, seed {seed0})")
        usage_heatmap_grid({v: (s["step"], s["counts"]) for v, s in series.items()}, out / "usage_heatmaps.png",
                           title=f"{study.name}: middle-layer expert usage per logging window ({ds0}, seed {seed0})")
        pics += [("dynamics.png", "Routing dynamics per variant"), ("usage_heatmaps.png", "Usage heat maps")]
    for v, rs in by_variant.items():  # the first run's experts x topics / classes of each variant
        first = sorted(rs, key=lambda r: (r["dataset"] != study.datasets[0].name, r["seed"]))
        if not first or "middle_layer" not in first[0]:  # (a dense control has no experts)
            continue
        r0 = first[0]
        where = f"{r0['dataset']}, seed {r0['seed']}, layer {r0['middle_layer']}"
        if r0.get("spec_topic_matrix") is not None:
            label_heatmap(r0["spec_topic_matrix"], r0["spec_topic_names"], out / f"topic_heatmap_{v}.png",
                          title=f"{study.name} / {v}: experts x topics ({where})", what="topic")
            pics.append((f"topic_heatmap_{v}.png", f"Experts x topics, {v}"))
        if r0.get("spec_class_matrix") is not None:
            label_heatmap(r0["spec_class_matrix"], list(TOKEN_CLASSES), out / f"class_heatmap_{v}.png",
                          title=f"{study.name} / {v}: experts x token classes ({where})", what="token class")
            pics.append((f"class_heatmap_{v}.png", f"Experts x token classes, {v}"))
    mi = {row["variant"]: row["spec_mi_class_bits"] for row in table if math.isfinite(row["spec_mi_class_bits"])}
    if mi:
        comparison_bars(mi, out / "specialization.png", ylabel="bits", fmt="{:.3f}",
                        title=f"{study.name}: MI(expert; token class), middle layer, mean over runs "
                              f"(higher = more specialized)")
        pics.append(("specialization.png", "Expert specialization"))
    return pics
