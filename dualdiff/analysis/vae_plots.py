"""Figures of the vae experiment: reconstruction grids (PNG), the training curves with β(step),
and the kl_weight sweep / leave-one-domain-out summaries. matplotlib on the Agg backend."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dualdiff.analysis.plots import _plt, save_figure

__all__ = ["save_recon_grid", "plot_training", "plot_sweep", "plot_loo", "plot_demo"]


def save_recon_grid(targets: torch.Tensor, recons: torch.Tensor, out_path: str | os.PathLike) -> Path:
    """PNG grid: the [0, 1] inputs ``[N, 3, H, W]`` on the top row, their reconstructions below."""
    from torchvision.utils import save_image

    if targets.shape != recons.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and recons {tuple(recons.shape)} differ in shape")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = torch.cat([targets, recons]).detach().float().clamp(0, 1).cpu()
    save_image(grid, out, nrow=len(targets), padding=2, pad_value=1.0)
    return out


_TERMS = (("recon", "reconstruction (BCE)"), ("kl", "KL per latent dim"), ("ce", "classifier CE"),
          ("beta", "β(step)"), ("loss", "total"), ("lr", "learning rate"))


def plot_training(records: Sequence[Mapping], out_path: str | os.PathLike, title: str = "") -> Path:
    """Six panels over the step: recon, KL (per latent dim), CE, β, total and lr."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.9, wspace=0.3, hspace=0.35)
    for ax, (key, label) in zip(axes.flat, _TERMS):
        pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, lw=1.2)
        ax.set_title(label)
        ax.set_xlabel("step")
        if key in ("kl", "recon") and pts and min(v) > 0:
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    return save_figure(fig, out_path)


def plot_sweep(summary: Mapping[str, Mapping], out_path: str | os.PathLike) -> Path:
    """kl_weight sweep: PSNR, high-pass error and active units per kl_weight (summary: weight -> metrics)."""
    plt = _plt()
    ws = sorted(summary, key=float)
    x = np.array([float(w) for w in ws])
    keys = (("psnr", "PSNR (dB) ↑"), ("ssim", "SSIM ↑"), ("highpass_rel_error", "high-pass rel. error ↓"),
            ("active_units", "active units"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, (k, label) in zip(axes, keys):
        ax.plot(x, [summary[w].get(k, np.nan) for w in ws], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("kl_weight")
        ax.set_title(label)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_loo(summary: Mapping[str, Mapping], out_path: str | os.PathLike) -> Path:
    """Leave-one-domain-out: held-out accuracy and in-domain validation accuracy per environment."""
    plt = _plt()
    envs = list(summary)
    test = [summary[e].get("test_accuracy", np.nan) for e in envs]
    val = [summary[e].get("val_accuracy", np.nan) for e in envs]
    fig, ax = plt.subplots(figsize=(1.8 * len(envs) + 2, 3.5))
    pos = np.arange(len(envs))
    ax.bar(pos - 0.2, val, 0.4, label="in-domain val")
    ax.bar(pos + 0.2, test, 0.4, label="held-out environment")
    ax.set_xticks(pos, envs)
    ax.set_ylabel("grade accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_demo(targets: torch.Tensor, recons: torch.Tensor, out_path: str | os.PathLike, title: str,
              subtitle: str = "") -> Path:
    """The demo's one figure: the [0, 1] validation images ``[N, 3, H, W]`` (top row) beside
    their reconstructions (bottom row), the headline number in the title."""
    if targets.shape != recons.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and recons {tuple(recons.shape)} differ in shape")
    plt = _plt()
    n = len(targets)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n + 0.8, 3.9), squeeze=False)
    for row, (imgs, label) in enumerate(((targets, "data"), (recons, "reconstruction"))):
        for j in range(n):
            ax = axes[row, j]
            ax.imshow(imgs[j].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)
