"""Figures of the tadiff experiment (matplotlib, Agg backend).

* ``plot_lambda_schedules``: λ(t) of every schedule over t = 0..T-1 on the real schedule (log y),
  plus any learned λ tables;
* ``plot_loss_curves``: training loss, noise MSE and Dice loss per schedule over steps;
* ``plot_dice_vs_t``: Dice (threshold 0.5) of the one-step mask head vs t, target (solid) and
  reference sessions (dashed), per schedule;
* ``plot_sample_grid``: per case the input sessions (FLAIR), the true and predicted target
  image and mask, and the per-pixel standard deviation over samples (uncertainty);
* ``plot_demo_summary``: the demo's one figure (the data beside each schedule's denoised target
  and predicted mask, the headline number in the title).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dualdiff.analysis.plots import _plt, save_figure

__all__ = ["plot_lambda_schedules", "plot_loss_curves", "plot_dice_vs_t", "plot_sample_grid",
           "plot_demo_summary"]

_CURVE_SCHEDULES = ("fixed", "power", "cosine", "cosine_seed", "step")


def plot_lambda_schedules(schedule, out_path: str | os.PathLike, *, lambda0: float = 0.01, k: float = 2.0,
                          learned: dict[str, list[float]] | None = None) -> Path:
    """λ(t) of the closed-form schedules (and ``learned`` tables) against t, log scale."""
    from dualdiff.diffusion.loss_weights import lambda_weight

    plt = _plt()
    ab = schedule.alphas_cumprod.double()
    t = np.arange(ab.shape[0])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name in _CURVE_SCHEDULES:
        lam = lambda_weight(name, ab, lambda0=lambda0, k=k).numpy()
        for a in ax:
            a.plot(t, lam, label=name)
    lam1 = lambda_weight("power", ab, lambda0=lambda0, k=1.0).numpy()
    for a in ax:
        a.plot(t, lam1, ls=":", label="power k=1 (seed 'linear')")
    for name, tab in (learned or {}).items():
        for a in ax:
            a.plot(t, np.asarray(tab), ls="--", label=f"{name} (learned)")
    ax[0].set_yscale("log")
    ax[0].set_ylim(1e-13, lambda0 * 2)
    ax[0].set_title("λ(t), log scale")
    ax[1].set_title(f"λ(t); ᾱ_(T/2) = {float(ab[len(ab) // 2]):.3f}")
    for a in ax:
        a.set_xlabel("t")
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_path)


def _smooth(y: np.ndarray, n: int = 5) -> np.ndarray:
    if len(y) < n:
        return y
    return np.convolve(np.pad(y, (n // 2, n - 1 - n // 2), mode="edge"), np.ones(n) / n, mode="valid")


def plot_loss_curves(histories: dict[str, list[dict]], out_path: str | os.PathLike) -> Path:
    """Per schedule: total loss, noise MSE and Dice loss (unweighted) against the step."""
    plt = _plt()
    keys = ("loss", "noise_mse", "dice_loss")
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, hist in histories.items():
        for a, key in zip(ax, keys):
            pts = [(r["step"], r[key]) for r in hist if key in r and "step" in r]
            if pts:
                s, v = map(np.asarray, zip(*pts))
                a.plot(s, _smooth(v), label=name)
    for a, key in zip(ax, keys):
        a.set_title(key)
        a.set_xlabel("step")
        a.set_yscale("log")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_dice_vs_t(results: dict[str, dict], out_path: str | os.PathLike) -> Path:
    """Dice of the one-step mask head vs t per schedule (target solid, references dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.get_cmap("tab10")
    for i, (name, r) in enumerate(results.items()):
        ax.plot(r["t"], r["target"], color=colors(i % 10), marker="o", ms=3, label=f"{name} target")
        ax.plot(r["t"], r["reference"], color=colors(i % 10), ls="--", label=f"{name} references")
    ax.set_xlabel("t")
    ax.set_ylabel("Dice (threshold 0.5)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_sample_grid(samples: dict[str, torch.Tensor], case: dict[str, torch.Tensor],
                     out_path: str | os.PathLike, title: str = "") -> Path:
    """One row per case: FLAIR of the reference sessions, true / predicted target FLAIR, true /
    predicted mask (probability), and the std of the predicted FLAIR over samples."""
    plt = _plt()
    img, mask = samples["image"], samples["mask"]          # [N, K, 3, H, W], [N, K, H, W]
    N, S = img.shape[0], case["image"].shape[1]
    cols = (S - 1) + 5
    fig, ax = plt.subplots(N, cols, figsize=(1.6 * cols, 1.6 * N + 0.4), squeeze=False)
    names = [f"ses {s + 1}" for s in range(S - 1)] + ["true", "pred (mean)", "true mask", "pred mask", "std"]
    for n in range(N):
        tiles = [case["image"][n, s, 2] for s in range(S - 1)]
        tiles += [case["image"][n, -1, 2], img[n, :, 2].mean(0), case["label"][n, -1], mask[n].mean(0)]
        for j, tile in enumerate(tiles):
            ax[n, j].imshow(np.asarray(tile, dtype=np.float32), cmap="gray", vmin=0, vmax=1)
        ax[n, -1].imshow(np.asarray(img[n, :, 2].std(0), dtype=np.float32) if img.shape[1] > 1
                         else np.zeros(img.shape[-2:]), cmap="magma")
        for j in range(cols):
            ax[n, j].set_xticks([])
            ax[n, j].set_yticks([])
            if n == 0:
                ax[n, j].set_title(names[j], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_demo_summary(case: dict[str, torch.Tensor], samples: dict[str, dict[str, torch.Tensor]],
                      per_case: dict[str, dict[str, list[float]]], out_path: str | os.PathLike,
                      title: str, max_cases: int = 4) -> Path:
    """The demo's one figure: per case (row) the data (last reference FLAIR, true target FLAIR
    with the true mask outlined), then per schedule the denoised target FLAIR (sample mean) with
    its predicted mask (> 0.5) outlined in the schedule's colour, titled with that case's Dice;
    ``title`` carries the headline number."""
    plt = _plt()
    names = list(samples)
    n = min(max_cases, case["image"].shape[0])
    cols = 2 + len(names)
    fig, ax = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n + 0.9), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i in range(n):
        true_mask = np.asarray(case["label"][i, -1], dtype=np.float32)
        ax[i, 0].imshow(np.asarray(case["image"][i, -2, 2], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
        ax[i, 1].imshow(np.asarray(case["image"][i, -1, 2], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
        if true_mask.max() > 0.5:
            ax[i, 1].contour(true_mask, levels=[0.5], colors="lime", linewidths=0.8)
        for j, name in enumerate(names):
            a = ax[i, 2 + j]
            img = np.asarray(samples[name]["image"][i, :, 2].mean(0), dtype=np.float32)
            prob = np.asarray(samples[name]["mask"][i].mean(0), dtype=np.float32)
            a.imshow(img, cmap="gray", vmin=0, vmax=1)
            if true_mask.max() > 0.5:
                a.contour(true_mask, levels=[0.5], colors="lime", linewidths=0.6, linestyles="dotted")
            if prob.max() > 0.5:
                a.contour(prob, levels=[0.5], colors=[colors(j % 10)], linewidths=0.9)
            a.set_title(f"{name}: Dice {per_case[name]['dice'][i]:.2f}", fontsize=7)
        if i == 0:
            ax[i, 0].set_title("data: last reference", fontsize=7)
            ax[i, 1].set_title("data: true target (mask)", fontsize=7)
        for a in ax[i]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)
