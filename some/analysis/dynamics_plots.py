"""Pictures of routing dynamics (``dynamics.jsonl``): experts x steps usage heat
maps (log colour scale) and curves of experts used / effective / dead experts,
key movement and the top-set share, for the layers of one run
(:func:`usage_heatmap`, :func:`dynamics_curves`) or one layer across the runs
of a study (:func:`usage_heatmap_grid`, :func:`dynamics_comparison`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import PathLike
from .plots import new_figure, save_figure

__all__ = ["COLOR_UNUSED_BG", "dynamics_comparison", "dynamics_curves", "usage_heatmap", "usage_heatmap_grid"]

COLOR_UNUSED_BG = "#d9d9d9"  # heat-map cells of experts unused in a window


def _matrix(counts) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().to("cpu", torch.float64).numpy()
    return np.asarray(counts, dtype=np.float64)


def _heatmap_on(ax, steps, counts):
    """Draw a (windows, N) count matrix as experts x steps; returns (mesh or None, N, windows, never, unused share)."""
    from matplotlib.colors import LogNorm

    c = _matrix(counts)
    steps = np.asarray(steps, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != steps.size:
        raise ValueError(f"usage_heatmap: counts must be (windows, N) with one window per step, got {c.shape} "
                         f"for {steps.size} steps")
    order = np.argsort(-c.sum(axis=0), kind="stable")
    c = c[:, order].T  # (N, windows), most used first
    n, w = c.shape
    positive = c[c > 0]
    masked = np.ma.masked_where(c <= 0, c)
    cmap = _cmap("viridis").with_extremes(bad=COLOR_UNUSED_BG)
    edges = np.concatenate([[0.0], steps])  # the windows' right edges are the steps; the first starts at 0
    norm = LogNorm(vmin=max(positive.min(), 1), vmax=max(positive.max(), 2)) if positive.size else None
    mesh = ax.pcolormesh(edges, np.arange(n + 1) - 0.5, masked, cmap=cmap, norm=norm, shading="flat")
    ax.set_ylim(n - 0.5, -0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_yticks([t for t in ax.get_yticks() if 0 <= t < n])
    never = int((c.sum(axis=1) == 0).sum())
    unused_share = float((c <= 0).mean()) if c.size else 0.0
    return (mesh if positive.size else None), n, w, never, unused_share


def usage_heatmap(steps, counts, path: PathLike, title: str = "Expert usage over training") -> Path:
    """Experts x steps: each column is one logging window's selection counts
    (``counts`` ``(windows, N)``), on a log colour scale; experts unused in a
    window are drawn in grey. Rows are sorted by total use (the most used
    expert on top), so a collapse shows as the mass drawing into a few top rows."""
    n_rows = np.shape(counts)[1] if np.ndim(counts) == 2 else 0
    fig = new_figure(11, min(2.5 + n_rows * 0.03, 7.5))
    ax = fig.subplots()
    mesh, n, w, never, unused_share = _heatmap_on(ax, steps, counts)
    if mesh is not None:
        fig.colorbar(mesh, ax=ax, pad=0.01).set_label("selections in the window (log)", fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert rank (by total use)")
    ax.set_title(f"{title}\nN = {n}, {w} windows; grey = unused in the window ({100 * unused_share:.0f}% of cells); "
                 f"never used: {never}", fontsize=10)
    return save_figure(fig, path)


def usage_heatmap_grid(panels: Mapping[str, tuple[Any, Any]], path: PathLike, title: str = "") -> Path:
    """:func:`usage_heatmap` of several runs side by side: ``{name: (steps, counts)}``,
    each panel with its own log colour scale."""
    names = list(panels)
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = new_figure(4.6 * cols, 2.9 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        steps, counts = panels[name]
        mesh, n, w, never, unused_share = _heatmap_on(ax, steps, counts)
        if mesh is not None:
            fig.colorbar(mesh, ax=ax, pad=0.01).ax.tick_params(labelsize=6)
        ax.set_title(f"{name}: N = {n}, {100 * unused_share:.0f}% cells unused, never used {never}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("expert rank", fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n(log colour scale per panel; grey = unused in the window)", fontsize=10)
    return save_figure(fig, path)


def dynamics_comparison(series: Mapping[str, Mapping[str, list]], path: PathLike, title: str = "") -> Path:
    """One layer's dynamics in several runs: ``{name: {"step": [...], "experts_used": [...],
    "effective_experts": [...], "dead": [...], "top_set_share": [...]}}``, one line per run
    in four panels (what :func:`dynamics_curves` shows for the layers of one run)."""
    fig = new_figure(11, 7)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (("experts_used", "experts used per window"), ("effective_experts", "effective experts 2^H"),
              ("dead", "dead experts"), ("top_set_share", "share of a batch on the most common top-k set"))
    cmap = _cmap("tab10")
    for i, (name, s) in enumerate(series.items()):
        color, style = cmap(i % 10), ("-", "--", ":")[(i // 10) % 3]
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(x, y) for x, y in zip(s["step"], s[key], strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=color, linestyle=style, linewidth=1.2,
                        label=name if key == "experts_used" else None)
    for ax, (key, caption) in zip(axes, panels, strict=True):
        ax.set_title(caption, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if key == "top_set_share":
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # an all-zero panel (no dead experts) still reads 0
    axes[0].legend(fontsize=7, ncols=2, loc="best")
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def dynamics_curves(records: list[dict[str, Any]], path: PathLike, title: str = "Routing dynamics") -> Path:
    """Five panels over optimizer steps, one line per SoME layer: experts used in
    each window (solid) with the effective experts 2^H (dashed); dead experts;
    the share of the layer input (solid) and of the query (dashed) common to all
    tokens (a shared direction rising precedes a collapse; runs recorded before
    it have no such lines); mean key movement per update (log); the probed
    top-set share (a collapse signal: 1 = every token picks the same k experts)."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    fig = new_figure(15, 7)
    (ax_used, ax_dead, ax_common), (ax_move, ax_share, ax_spare) = fig.subplots(2, 3, sharex=True)
    ax_spare.set_visible(False)
    cmap = _cmap("tab10")
    n_experts = max((len(r.get("counts", [])) for r in records), default=0)
    for i, (layer, rs) in enumerate(sorted(by_layer.items())):
        color = cmap(i % 10)
        x = [r["step"] for r in rs]
        ax_used.plot(x, [r["experts_used"] for r in rs], color=color, linewidth=1.3, label=f"layer {layer}")
        ax_used.plot(x, [r["effective_experts"] for r in rs], color=color, linewidth=1.0, linestyle="--")
        ax_dead.plot(x, [r["dead"] for r in rs], color=color, linewidth=1.3)
        moves = [r["key_move_mean"] if r["key_move_mean"] > 0 else np.nan for r in rs]
        ax_move.plot(x, moves, color=color, linewidth=1.3)
        share = [(r["step"], r["top_set_share"]) for r in rs if r.get("top_set_share") is not None]
        if share:
            ax_share.plot(*zip(*share, strict=True), color=color, linewidth=1.3, marker=".", markersize=3)
        for key, style in (("shared_input", "-"), ("shared_query", "--")):
            common = [(r["step"], r[key]) for r in rs if r.get(key) is not None]
            if common:
                ax_common.plot(*zip(*common, strict=True), color=color, linewidth=1.3, linestyle=style)
    if n_experts:
        ax_used.axhline(n_experts, color="grey", linestyle=":", linewidth=1)
        ax_used.set_ylim(0, n_experts * 1.05)
        ax_dead.set_ylim(0, n_experts * 1.05)
    ax_used.set_title("experts used per window (solid), effective 2^H (dashed)", fontsize=9)
    ax_used.legend(fontsize=7, loc="best", ncols=2)
    ax_dead.set_title("dead experts (no selection in the last dead_after updates)", fontsize=9)
    ax_move.set_title("key movement: mean ||ΔK|| per update (log)", fontsize=9)
    if any(r["key_move_mean"] > 0 for r in records):
        ax_move.set_yscale("log")
    ax_share.set_title("share of a batch's tokens on the most common top-k set", fontsize=9)
    ax_share.set_ylim(0, 1.02)
    ax_common.set_title("common to all tokens: ||mean||² / mean ||·||²\n(layer input solid, query dashed)",
                        fontsize=9)
    ax_common.set_ylim(0, 1.02)
    for ax in (ax_move, ax_share, ax_common):
        ax.set_xlabel("optimizer step")
    for ax in (ax_used, ax_dead, ax_common, ax_move, ax_share):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name]
