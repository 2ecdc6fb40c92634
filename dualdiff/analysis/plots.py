"""Plots for the LIFT analysis: error heatmaps with path overlays, MSE bars, sample grids.

matplotlib with the Agg backend (no display needed). Heatmap axes are log-scaled in γ:
x = γ0 (64x64 SNR, heatmap axis 0), y = γ1 (32x32 SNR, axis 1), colour = log10 error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dualdiff.data.images import scale_labels

__all__ = ["plot_heatmap", "plot_mse_bars", "plot_sample_grids"]

_COLORS = ["white", "red", "orange", "cyan", "magenta", "lime", "yellow"]


def _plt():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out_path`` (parent folders created), close it, return the path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _plt().close(fig)
    return out


def _edges(g: np.ndarray) -> np.ndarray:
    """Cell edges of a log-spaced grid (geometric midpoints, extrapolated at the ends)."""
    lg = np.log10(g)
    if len(lg) == 1:
        return 10 ** np.array([lg[0] - 0.5, lg[0] + 0.5])
    mid = (lg[1:] + lg[:-1]) / 2
    return 10 ** np.concatenate([[lg[0] - (mid[0] - lg[0])], mid, [lg[-1] + (lg[-1] - mid[-1])]])


def plot_heatmap(result, out_path: str | os.PathLike, paths: Mapping[str, object] | None = None,
                 title: str | None = None) -> Path:
    """Three panels (large-scale, small-scale, total error) with paths drawn on top; the panels
    name the scales by size (``result.meta["image_size"]``, 64 when absent: 64x64 and 32x32).

    result: a HeatmapResult. paths: name -> GridPath (from seed_dp_path, greedy_path,
    fixed_step_path) or an int array [L, 2] of (i, j) grid indices.
    """
    plt = _plt()
    g = result.gammas.double().numpy()
    e = _edges(g)
    big, small = scale_labels(result.meta)
    maps = [(f"{big} error", result.error_64), (f"{small} error", result.error_32), ("total error", result.error_total)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (name, m) in zip(axes, maps):
        d = m.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.log10(np.where(d > 0, d, np.nan))
        im = ax.pcolormesh(e, e, d.T, cmap="viridis", shading="flat")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"γ0 ({big} SNR)")
        ax.set_ylabel(f"γ1 ({small} SNR)")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, label="log10 error")
        ax.plot([g[0], g[-1]], [g[0], g[-1]], ls=":", color="0.8", lw=1)
        for k, (label, p) in enumerate((paths or {}).items()):
            pts = np.asarray(p.points if hasattr(p, "points") else p)
            # earlier paths drawn wider and below, so coinciding paths stay visible
            ax.plot(g[pts[:, 0]], g[pts[:, 1]], marker="o", ms=max(2.0, 6 - k), lw=max(1.0, 4.5 - 0.8 * k),
                    color=_COLORS[k % len(_COLORS)], label=label, zorder=2 + k)
        if paths:
            ax.legend(fontsize=7, loc="lower right", framealpha=0.6)
    fig.suptitle(title or "LIFT discretization error")
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_mse_bars(results: dict, out_path: str | os.PathLike) -> Path:
    """Grouped bars (large- and small-scale MSE, titled by size) for the three MSE tests
    (run_mse_tests output)."""
    from dualdiff.metrics.mse_tests import MSE_TESTS

    plt = _plt()
    keys = list(MSE_TESTS)
    m64 = [results[k]["mse_64"] for k in keys]
    m32 = [results[k]["mse_32"] for k in keys]
    big, small = scale_labels(results)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for off, vals, lab, col in ((-0.18, m64, f"MSE {big}", "steelblue"), (0.18, m32, f"MSE {small}", "coral")):
        bars = ax.bar(x + off, vals, 0.36, label=lab, color=col)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.4f}", (b.get_x() + b.get_width() / 2, v), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([MSE_TESTS[k].replace(": ", "\n") for k in keys])
    ax.set_ylabel("noise-prediction MSE")
    ax.set_title(f"MSE tests (t = {results['timestep']}, {results['num_samples']} samples)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_sample_grids(samples: Mapping[str, torch.Tensor], out_path: str | os.PathLike, nrow: int = 4) -> Path:
    """One panel per path: a grid of its images (in [-1, 1]) with the path name as title."""
    from torchvision.utils import make_grid

    plt = _plt()
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 3.6), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], samples.items()):
        grid = make_grid(((imgs.detach().float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=1)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out_path)
