"""Plots of the toy2d grid (matplotlib, Agg backend), from :func:`dualdiff.experiments.toy2d.
load_results`'s dictionary:

* ``train_loss.png``: one panel per dataset (2 x 2 for four), one line per variant: the per-step
  training loss smoothed with a Hanning window of 25 steps (the template's ``plot.py``);
* ``generated_images.png``: variants (rows) x datasets (columns) scatter grid of the samples;
* ``weight_evolution.png``: one panel per dataset, the global (solid) and local (dashed) weight
  of every adaptive variant against the timestep t = 0..T-1;
* ``demo.png`` (``dualdiff toy2d demo``): datasets (rows) x [data, variants...] (columns), each
  run's samples beside its data on the same axes, the KL in each panel's title.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dualdiff.analysis.plots import _plt, save_figure

__all__ = ["smooth", "plot_train_loss", "plot_generated_images", "plot_weight_evolution",
           "plot_all", "plot_demo"]

_ADAPTIVE = ("adaptive", "adaptive_deep")


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def smooth(x: np.ndarray, window_len: int = 25) -> np.ndarray:
    """Hanning-window moving average with reflected ends; same length as ``x`` (the template's
    ``smooth``; shorter inputs are returned unchanged)."""
    x = np.asarray(x, dtype=np.float64)
    if window_len < 3 or x.shape[0] < window_len:
        return x
    s = np.r_[x[window_len - 1:0:-1], x, x[-2:-window_len - 1:-1]]
    w = np.hanning(window_len)
    y = np.convolve(w / w.sum(), s, mode="valid")
    lo = (window_len - 1) // 2
    return y[lo:lo + x.shape[0]]


def _grid(n: int) -> tuple[int, int]:
    cols = 2 if n > 1 else 1
    return math.ceil(n / cols), cols


def plot_train_loss(results: dict, path: str | os.PathLike, window_len: int = 25) -> Path:
    """``train_loss.png``: per dataset panel, one smoothed loss curve per variant."""
    plt = _plt()
    datasets, variants, arrays = results["datasets"], results["variants"], results["arrays"]
    rows, cols = _grid(len(datasets))
    fig, axs = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), sharex=True, squeeze=False)
    colors = _colors(len(variants))
    for j, d in enumerate(datasets):
        ax = axs[j // cols, j % cols]
        for i, v in enumerate(variants):
            y = arrays.get(f"{v}/{d}/train_losses")
            if y is None:
                continue
            ax.plot(np.arange(1, len(y) + 1), smooth(y, window_len), label=v, color=colors[i],
                    lw=1)
        ax.set_title(d)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.legend()
    for j in range(len(datasets), rows * cols):
        axs[j // cols, j % cols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_generated_images(results: dict, path: str | os.PathLike) -> Path:
    """``generated_images.png``: variants x datasets scatter plots of the generated points."""
    plt = _plt()
    datasets, variants, arrays = results["datasets"], results["variants"], results["arrays"]
    runs = results.get("runs", {})
    fig, axs = plt.subplots(len(variants), len(datasets),
                            figsize=(3.5 * len(datasets), 3.2 * len(variants)), squeeze=False)
    colors = _colors(len(variants))
    for i, v in enumerate(variants):
        for j, d in enumerate(datasets):
            ax = axs[i, j]
            pts = arrays.get(f"{v}/{d}/images")
            if pts is not None:
                ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.2, color=colors[i],
                           rasterized=True)
            kl = runs.get(f"{v}/{d}", {}).get("kl_divergence")
            ax.set_title(f"{d}" + (f"  KL {kl:.3f}" if isinstance(kl, (int, float)) else ""),
                         fontsize=9)
            if j == 0:
                ax.set_ylabel(v)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_weight_evolution(results: dict, path: str | os.PathLike) -> Path | None:
    """``weight_evolution.png``: per dataset, global (solid) and local (dashed) weight of each
    adaptive variant over t. Returns None (no file) when the grid has no adaptive variant."""
    datasets, variants, arrays = results["datasets"], results["variants"], results["arrays"]
    adaptive = [v for v in variants if v in _ADAPTIVE]
    if not adaptive:
        return None
    plt = _plt()
    rows, cols = _grid(len(datasets))
    fig, axs = plt.subplots(rows, cols, figsize=(7 * cols, 4 * rows), squeeze=False)
    colors = _colors(len(variants))
    for j, d in enumerate(datasets):
        ax = axs[j // cols, j % cols]
        for v in adaptive:
            w = arrays.get(f"{v}/{d}/weights")
            if w is None:
                continue
            c = colors[variants.index(v)]
            t = np.arange(w.shape[0])
            ax.plot(t, w[:, 0], color=c, ls="-", label=f"{v} global")
            ax.plot(t, w[:, 1], color=c, ls="--", label=f"{v} local")
        ax.set_title(d)
        ax.set_xlabel("timestep t")
        ax.set_ylabel("weight")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    for j in range(len(datasets), rows * cols):
        axs[j // cols, j % cols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_all(results: dict, out_dir: str | os.PathLike) -> dict[str, Path | None]:
    """The three plots into ``out_dir``; returns ``{name: path or None}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"train_loss": plot_train_loss(results, out / "train_loss.png"),
            "generated_images": plot_generated_images(results, out / "generated_images.png"),
            "weight_evolution": plot_weight_evolution(results, out / "weight_evolution.png")}


def plot_demo(results: dict, data: dict[str, np.ndarray], path: str | os.PathLike, title: str,
              subtitle: str = "", max_points: int | None = None) -> Path:
    """``demo.png``: one row per dataset, the training data (grey, first column) beside each
    variant's samples (one column per variant, the same axes along a row), ``<variant>  KL x.xx``
    in each panel's title and ``title`` / ``subtitle`` above. ``data``: ``{dataset: [n, 2]}``;
    at most ``max_points`` (default: the number of samples per run) data points are drawn, a
    seeded random subset, so that both columns show the same density. About 1450 px wide for
    four variants."""
    plt = _plt()
    datasets, variants, arrays = results["datasets"], results["variants"], results["arrays"]
    runs = results.get("runs", {})
    missing = [d for d in datasets if d not in data]
    if missing:
        raise ValueError(f"data: no points for dataset(s) {missing}")
    cols = 1 + len(variants)
    rows = len(datasets)
    fig, axs = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.75 * rows + 0.9), squeeze=False)
    colors = _colors(len(variants))
    rng = np.random.default_rng(0)
    for i, d in enumerate(datasets):
        x = np.asarray(data[d], dtype=np.float64)
        n = max_points
        if n is None:
            n = max((len(arrays.get(f"{v}/{d}/images", ())) for v in variants), default=len(x))
        if 0 < n < len(x):
            x = x[rng.choice(len(x), n, replace=False)]
        lo, hi = np.percentile(x, [0.5, 99.5], axis=0)
        pad = 0.15 * (hi - lo).max() + 1e-3
        mid, half = (lo + hi) / 2, (hi - lo).max() / 2 + pad
        panels = [("data", x, (0.25, 0.25, 0.25, 1.0), f"{d}: data ({len(x)} pts)")]
        for j, v in enumerate(variants):
            kl = runs.get(f"{v}/{d}", {}).get("kl_divergence")
            kl_s = f"{kl:.2f}" if isinstance(kl, (int, float)) and np.isfinite(kl) else "nan"
            panels.append((v, arrays.get(f"{v}/{d}/images"), colors[j], f"{v}  KL {kl_s}"))
        for j, (_, pts, color, label) in enumerate(panels):
            ax = axs[i, j]
            if pts is not None:  # denser clouds drawn fainter, so structure stays visible
                alpha = float(np.clip(12 / np.sqrt(max(len(pts), 1)), 0.2, 0.7))
                ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=alpha, color=color, lw=0,
                           rasterized=True)
            ax.set_xlim(mid[0] - half, mid[0] + half)
            ax.set_ylim(mid[1] - half, mid[1] + half)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=10, fontweight="bold" if j == 0 else "normal")
            for side in ax.spines.values():
                side.set_color("0.75")
        axs[i, 0].set_ylabel(d, fontsize=11)
    fig.suptitle(title, fontsize=13, fontweight="bold", y=0.995)
    if subtitle:
        fig.text(0.5, 1 - 0.55 / fig.get_figheight(), subtitle, ha="center", va="top",
                 fontsize=10, color="0.3")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    return save_figure(fig, path, dpi=100)
