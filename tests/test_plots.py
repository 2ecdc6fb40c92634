"""Plots: files written, valid PNGs of the expected size, paths drawn."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dualdiff.analysis.heatmap import HeatmapResult, gamma_grid
from dualdiff.analysis.paths import fixed_step_path, greedy_path, seed_dp_path
from dualdiff.analysis.plots import plot_heatmap, plot_mse_bars, plot_sample_grids


def _heatmap(n=7):
    g = gamma_grid(n)
    i = torch.arange(n, dtype=torch.float64)
    e64 = (1.0 / g[:, None] ** 2) * (1 + 0.2 * i[None, :])
    e32 = (1.0 / g[None, :] ** 2) * (1 + 0.2 * i[:, None])
    return HeatmapResult(gammas=g, timesteps=torch.arange(n), snr=g, error_64=e64, error_32=e32,
                         computed=torch.ones(n, n, dtype=torch.bool))


def test_heatmap_plot_with_paths(tmp_path):
    hm = _heatmap()
    e64, e32, g = hm.error_64.numpy(), hm.error_32.numpy(), hm.gammas.numpy()
    paths = {"dp total": seed_dp_path(e64, e32), "dp 64": seed_dp_path(e64, e32, objective="64"),
             "greedy": greedy_path(e64, e32), "fixed": fixed_step_path(e64, e32, g, num_steps=6, max_jump=3)}
    f = plot_heatmap(hm, tmp_path / "hm.png", paths)
    im = np.asarray(Image.open(f).convert("RGB"))
    assert im.shape[0] > 300 and im.shape[1] > 1000
    # the overlays are drawn: pure red (2nd path colour) pixels exist, absent without paths
    red = ((im[..., 0] > 240) & (im[..., 1] < 30) & (im[..., 2] < 30)).sum()
    bare = np.asarray(Image.open(plot_heatmap(hm, tmp_path / "bare.png")).convert("RGB"))
    red_bare = ((bare[..., 0] > 240) & (bare[..., 1] < 30) & (bare[..., 2] < 30)).sum()
    assert red > 50 and red_bare == 0


def test_mse_and_sample_plots(tmp_path):
    res = {"timestep": 500, "num_samples": 8,
           "test1_both_noisy": {"mse_64": 0.1, "mse_32": 0.2, "total_mse": 0.15},
           "test2a_clean32_noisy64": {"mse_64": 0.05, "mse_32": 0.01, "total_mse": 0.03},
           "test2b_clean64_noisy32": {"mse_64": 0.02, "mse_32": 0.3, "total_mse": 0.16}}
    f = plot_mse_bars(res, tmp_path / "mse.png")
    assert Image.open(f).size[0] > 400
    imgs = {"diagonal": torch.rand(4, 3, 64, 64) * 2 - 1, "dp_total": torch.zeros(4, 3, 64, 64)}
    f2 = plot_sample_grids(imgs, tmp_path / "samples.png", nrow=2)
    assert Image.open(f2).size[0] > 300
