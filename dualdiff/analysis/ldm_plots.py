"""Figures of the ldm experiment: training curves (loss and the logged LR), loss per t quartile
per objective, conditioning error over cond_scale x rescaled_phi, sample grids per requested
class distribution. matplotlib on the Agg backend."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dualdiff.analysis.plots import _plt, save_figure

__all__ = ["plot_training", "plot_loss_quartiles", "plot_cond_error", "save_sample_grid", "plot_demo"]


def plot_training(history: Sequence[Mapping[str, Any]], out_path: str | os.PathLike) -> Path:
    """Loss (log scale) and learning rate against the step, from the Trainer's records."""
    plt = _plt()
    rows = [r for r in history if "loss" in r and "step" in r]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["loss"] for r in rows], label="loss")
    if any("mse" in r for r in rows):
        a.plot(steps, [r.get("mse", np.nan) for r in rows], label="unweighted mse", alpha=0.7)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.legend()
    b.plot(steps, [r.get("lr", np.nan) for r in rows])
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_loss_quartiles(quartiles: Mapping[str, Sequence[float]], out_path: str | os.PathLike) -> Path:
    """One bar group per t quartile, one bar per objective (log scale): the loss depends on t
    by orders of magnitude, so a step-to-step jump of the batch loss is mostly which t it drew."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(quartiles)
    w = 0.8 / max(len(names), 1)
    x = np.arange(4)
    for i, name in enumerate(names):
        ax.bar(x + i * w, quartiles[name], width=w, label=name)
    ax.set_xticks(x + w * (len(names) - 1) / 2, ["t in Q1 (low noise)", "Q2", "Q3", "Q4 (high noise)"])
    ax.set_yscale("log")
    ax.set_ylabel("MSE vs target")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_cond_error(ev: Mapping[str, Any], out_path: str | os.PathLike) -> Path:
    """Conditioning error against cond_scale, one line per rescaled_phi, with the unconditional
    and autoencoder round-trip references."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    rows = ev["cond_error"]
    for phi in sorted({r["rescaled_phi"] for r in rows}):
        pts = sorted((r["cond_scale"], r["cond_error"]) for r in rows if r["rescaled_phi"] == phi)
        ax.plot(*zip(*pts), marker="o", label=f"rescaled_phi {phi:g}")
    ax.axhline(ev["cond_error_unconditional"], color="gray", ls="--", label="unconditional")
    ax.axhline(ev["cond_error_ae_roundtrip"], color="k", ls=":", label="autoencoder round trip")
    ax.set_xlabel("cond_scale")
    ax.set_ylabel("TV distance to requested classes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_path)


def save_sample_grid(images: torch.Tensor, requested: torch.Tensor, out_path: str | os.PathLike, *,
                     title: str | None = None, class_names: Sequence[str] | None = None) -> Path:
    """``images [R, N, 3, S, S]`` in [0, 1]: one row per requested distribution ``[R, K]``, its
    fractions written at the row's left."""
    plt = _plt()
    R, N = images.shape[:2]
    fig, axes = plt.subplots(R, N, figsize=(1.2 * N + 1.6, 1.2 * R + 0.4), squeeze=False)
    for r in range(R):
        for n in range(N):
            ax = axes[r][n]
            ax.imshow(images[r, n].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(" ".join(f"{v:.2f}" for v in requested[r].tolist()), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)


def plot_demo(requested: torch.Tensor, images: Mapping[str, torch.Tensor], errors: Mapping[str, Sequence[float]],
              out_path: str | os.PathLike, *, title: str, class_names: Sequence[str] | None = None) -> Path:
    """The demo's one figure: a row per request, its requested class distribution (bars) beside
    one generated sample per guidance setting (``images[label] [R, 3, S, S]``), each captioned
    with that sample's TV distance (``errors[label][r]``); ``title``: the headline number."""
    plt = _plt()
    R, K = requested.shape
    labels = list(images)
    names = list(class_names) if class_names is not None else [str(k) for k in range(K)]
    fig, axes = plt.subplots(R, len(labels) + 1, figsize=(1.7 * (len(labels) + 1) + 1.2, 1.6 * R + 0.9),
                             squeeze=False)
    colours = ["0.85", "#c8a2c8", "#4b5bab", "#c68a4a", "#6b3a16"][:K] + ["C7"] * max(0, K - 5)
    for r in range(R):
        ax = axes[r][0]
        ax.bar(range(K), requested[r].tolist(), color=colours)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(K), [n[:4] for n in names] if r == R - 1 else [""] * K, fontsize=6, rotation=60)
        ax.tick_params(axis="y", labelsize=6)
        if r == 0:
            ax.set_title("requested classes", fontsize=8)
        for c, lab in enumerate(labels, start=1):
            a = axes[r][c]
            a.imshow(images[lab][r].permute(1, 2, 0).clamp(0, 1).numpy())
            a.set_xticks([])
            a.set_yticks([])
            a.set_xlabel(f"TV {errors[lab][r]:.2f}", fontsize=7)
            if r == 0:
                a.set_title(lab, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_path)
