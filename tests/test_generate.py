"""Generation along γ paths: path construction, DDIM with an oracle denoiser, PNG output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dualdiff.analysis.generate import (
    GenerationPath,
    generate,
    generate_for_fid,
    make_path,
    save_image_grid,
)
from dualdiff.analysis.heatmap import HeatmapResult, gamma_grid
from dualdiff.diffusion import make_schedule


@pytest.fixture(scope="module")
def schedule():
    return make_schedule("lift_cosine", 1000)


class Oracle(nn.Module):
    """The exact ε-predictor when every training image is the constant image ``c``."""

    def __init__(self, schedule, c64, c32):
        super().__init__()
        self.ac = schedule.alphas_cumprod.float()
        self.c64, self.c32 = c64, c32
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x64, x32, t64, t32):
        def eps(x, t, c):
            a = self.ac[t].reshape(-1, 1, 1, 1)
            return (x - a.sqrt() * c) / (1 - a).sqrt()
        return eps(x64, t64, self.c64), eps(x32, t32, self.c32)


class TinyDual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x64, x32, t64, t32):
        h = torch.cat([x64, F.interpolate(x32, scale_factor=2)], 1)
        h = torch.tanh(self.conv(h)) * (t64.float()[:, None, None, None] / 1000)
        return h[:, :3], F.avg_pool2d(h[:, 3:], 2)


def _heatmap(n=8):
    g = gamma_grid(n)
    i = torch.arange(n, dtype=torch.float64)
    e64 = (1.0 / g[:, None] ** 2) * (1 + 0.1 * i[None, :])   # prefers small γ1
    e32 = (1.0 / g[None, :] ** 2) * (1 + 0.1 * i[:, None])
    return HeatmapResult(gammas=g, timesteps=torch.arange(n), snr=g, error_64=e64, error_32=e32,
                         computed=torch.ones(n, n, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["diagonal", "ddim", "dp_total", "dp_64", "fixed_total", "fixed_64"])
def test_paths_give_valid_timesteps(schedule, kind, tmp_path):
    p = make_path(kind, schedule, heatmap=_heatmap(), num_steps=10, max_jump=4)
    assert p.num_steps == 10
    for t in (p.t64, p.t32):
        assert t.dtype == np.int64 and (t >= 0).all() and (t < 1000).all() and (np.diff(t) <= 0).all()
    assert (np.diff(p.gamma_64) >= 0).all() and (np.diff(p.gamma_32) >= 0).all()
    if kind == "diagonal":
        assert np.array_equal(p.t64, p.t32) and p.t64[0] == 943 and p.t64[-1] == 54  # the seed's anchors
    if kind == "dp_64":  # 64-only objective: e64 grows with γ1, so the 32x32 scale stays noisy
        assert p.gamma_32.max() == pytest.approx(0.01)
    back = make_path(str(p.save(tmp_path / "p.json")), schedule)
    assert np.array_equal(back.t64, p.t64) and np.array_equal(back.t32, p.t32) and back.name == kind


def test_bad_paths(schedule):
    with pytest.raises(ValueError, match="heatmap"):
        make_path("dp_total", schedule)
    with pytest.raises(ValueError, match="kind"):
        make_path("spiral", schedule)
    with pytest.raises(ValueError, match="non-increasing"):
        GenerationPath("x", [1, 2], [1, 2], [10, 20], [20, 10])


@pytest.mark.parametrize("kind", ["diagonal", "dp_total"])
def test_oracle_ddim_recovers_the_data(schedule, kind):
    c64 = torch.linspace(-0.8, 0.8, 3 * 16 * 16).reshape(1, 3, 16, 16)
    c32 = F.avg_pool2d(c64, 2)
    path = make_path(kind, schedule, heatmap=_heatmap(), num_steps=6)
    x64, x32 = generate(Oracle(schedule, c64, c32), path, 2, schedule=schedule, size=16,
                        generator=torch.Generator().manual_seed(0))
    assert x64.shape == (2, 3, 16, 16) and x32.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x64, c64.expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(x32, c32.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("clipped", [False, True])
def test_generate_matches_diffusers_ddim(schedule, require, clipped):
    """generate() on a t-dependent model along the DDIM scheduler's own timesteps equals a
    plain diffusers DDIMScheduler loop (same betas, clip_sample, eta 0, use_clipped_model_output)
    at both scales."""
    diffusers = require("diffusers")
    torch.manual_seed(0)
    tiny = TinyDual()

    class Model(nn.Module):  # non-zero ε at t = 0 too, so the final step's ᾱ_prev matters
        def __init__(self):
            super().__init__()
            self.tiny = tiny

        def forward(self, x64, x32, t64, t32):
            e64, e32 = self.tiny(x64, x32, t64, t32)
            return e64 + 0.5 * x64, e32 + 0.5 * x32

    model = Model()
    ds = diffusers.DDIMScheduler(num_train_timesteps=1000, trained_betas=schedule.betas.double().numpy().tolist(),
                                 clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                 timestep_spacing="leading", prediction_type="epsilon")
    ds.set_timesteps(7)
    path = make_path("ddim", schedule, num_steps=7)
    assert path.t64.tolist() == ds.timesteps.tolist()
    x64, x32 = generate(model, path, 2, schedule=schedule, size=16, generator=torch.Generator().manual_seed(3),
                        clipped_model_output=clipped)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        for t in ds.timesteps:
            e64, e32 = model(a, b, t.expand(2), t.expand(2))
            a = ds.step(e64, t, a, use_clipped_model_output=clipped).prev_sample
            b = ds.step(e32, t, b, use_clipped_model_output=clipped).prev_sample
    torch.testing.assert_close(x64, a.clamp(-1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(x32, b.clamp(-1, 1), atol=1e-5, rtol=0)


def test_generate_for_fid_writes_pngs(schedule, tmp_path):
    torch.manual_seed(0)
    m = TinyDual()
    path = make_path("diagonal", schedule, num_steps=3)
    files = generate_for_fid(m, path, 5, tmp_path / "a", batch_size=2, seed=3, progress=False)
    assert [f.name for f in files] == [f"{k:05d}.png" for k in range(5)]
    im = Image.open(files[0])
    assert im.size == (64, 64) and im.mode == "RGB"
    again = generate_for_fid(m, path, 5, tmp_path / "b", batch_size=2, seed=3, progress=False)
    assert all(np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for a, b in zip(files, again))
    x64, _ = generate(m, path, 2, generator=torch.Generator().manual_seed(3))
    grid = save_image_grid(x64, tmp_path / "grid.png", nrow=2)
    assert Image.open(grid).size == (2 * 64 + 3 * 2, 64 + 2 * 2)


def test_generate_takes_the_image_side_from_the_model_config(schedule, tmp_path):
    """A LIFT model built for 32x32 (its 16x16 view) samples at that size without ``size=``,
    for the grids and for the FID PNGs alike (the analysis used to ask for 64x64 and fail)."""
    from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig

    torch.manual_seed(0)
    m = LIFTDualTimestepModel(LIFTModelConfig(channels=[8], time_freq_dim=8, time_emb_dim=16, num_heads=1,
                                              image_size=32))
    path = make_path("diagonal", schedule, num_steps=2)
    x64, x32 = generate(m, path, 2, schedule=schedule, generator=torch.Generator().manual_seed(0))
    assert x64.shape == (2, 3, 32, 32) and x32.shape == (2, 3, 16, 16)
    (f,) = generate_for_fid(m, path, 1, tmp_path, batch_size=1, schedule=schedule, progress=False)
    assert Image.open(f).size == (32, 32)
