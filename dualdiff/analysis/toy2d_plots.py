"""Plots of the toy2d grid (matplotlib, Agg backend), from :func:`dualdiff.experiments.toy2d.
load_results`'s dictionary:

* ``train_loss.png``: one panel per dataset (2 x 2 for four), one line per variant: the per-step
  training loss smoothed with a Hanning window of 25 steps (the template's ``plot.py``);
* ``generated_images.png``: variants (rows) x datasets (columns) scatter grid of the samples;
* ``weight_evolution.png``: one panel per dataset, the global (solid) and local (dashed) weight
  of every adaptive variant against the timestep t = 0..T-1.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dualdiff.analysis.plots import _plt, save_figure

__all__ = ["smooth", "plot_train_loss", "plot_generated_images", "plot_weight_evolution",
           "plot_all"]

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
