"""Noise schedules (closed forms, diffusers) and the SNR <-> timestep maps (round trips, anchors)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dualdiff.diffusion import (
    SCHEDULES,
    NoiseSchedule,
    ScheduleRangeWarning,
    log_snr_to_timestep,
    make_schedule,
    snr_to_timestep,
    timestep_to_log_snr,
    timestep_to_snr,
)


@pytest.fixture
def diffusers(require):
    """diffusers, the reference these tests compare with (a skip without it; a failure under CI=true)."""
    return require("diffusers")


@pytest.mark.parametrize("name", SCHEDULES)
def test_tables_consistent(name):
    s = make_schedule(name)
    assert s.num_timesteps == len(s) == 1000
    for k in NoiseSchedule._TABLES:
        v = getattr(s, k)
        assert v.dtype == torch.float64 and v.shape == (1000,), k
    torch.testing.assert_close(s.alphas, 1 - s.betas, rtol=0, atol=0)
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0), rtol=0, atol=0)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=0, atol=0)
    assert s.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod), rtol=1e-15, atol=0)
    torch.testing.assert_close(s.log_snr, torch.log(s.snr), rtol=0, atol=0)
    assert bool((s.log_snr.diff() < 0).all()), "log-SNR must decrease strictly"
    assert bool(((s.betas > 0) & (s.betas < 1)).all())


def test_linear_closed_form():
    s = make_schedule("linear", 1000)
    b = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas.numpy(), b, rtol=1e-14)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - b), rtol=1e-12)
    s2 = make_schedule("linear", 10, beta_start=1e-3, beta_end=0.2)
    np.testing.assert_allclose(s2.betas.numpy(), np.linspace(1e-3, 0.2, 10), rtol=1e-14)


def test_scaled_linear_closed_form():
    s = make_schedule("scaled_linear", 500, beta_start=0.00085, beta_end=0.012)
    b = np.linspace(0.00085**0.5, 0.012**0.5, 500) ** 2
    np.testing.assert_allclose(s.betas.numpy(), b, rtol=1e-13)


def test_cosine_against_formula():
    T, sh = 1000, 0.008
    s = make_schedule("cosine", T)
    f = lambda u: math.cos((u + sh) / (1 + sh) * math.pi / 2) ** 2  # noqa: E731
    ab = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
    betas = s.betas.numpy()
    unclipped = betas < 0.999
    assert unclipped.sum() >= 990 and betas[-1] == 0.999  # only the last few hit the cap
    first_clip = int(np.argmin(unclipped)) if not unclipped.all() else T
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[:first_clip], ab[:first_clip], rtol=1e-9)
    assert betas.max() == 0.999


def test_lift_cosine_clips():
    s = make_schedule("lift_cosine")
    assert float(s.betas.min()) == pytest.approx(1e-4) and float(s.betas.max()) == pytest.approx(0.02)
    ref = make_schedule("cosine")
    torch.testing.assert_close(s.betas, ref.betas.clamp(1e-4, 0.02), rtol=0, atol=0)


def test_sigmoid_closed_form():
    T, start, end, tau = 200, -3.0, 3.0, 1.0
    s = make_schedule("sigmoid", T)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    g = lambda u: (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))  # noqa: E731
    ab = np.array([g((t + 1) / T) / g(0.0) for t in range(T)])
    ok = s.betas.numpy() < 0.999
    np.testing.assert_allclose(s.alphas_cumprod.numpy()[ok], ab[ok], rtol=1e-9)


@pytest.mark.parametrize(
    "ours,theirs,kw",
    [
        ("linear", "linear", {}),
        ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_betas_match_diffusers(ours, theirs, kw, diffusers):
    d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    s = make_schedule(ours, 1000, **kw)
    torch.testing.assert_close(s.betas.float(), d.betas, rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(s.alphas_cumprod.float(), d.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_to_device_keeps_values():
    s = make_schedule("cosine", 50)
    s2 = s.to("cpu")
    assert s2 is not s and s2.device.type == "cpu"
    for k in NoiseSchedule._TABLES:
        assert torch.equal(getattr(s, k), getattr(s2, k))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda():
    s = make_schedule("cosine").to("cuda")
    assert s.alphas_cumprod.is_cuda and s.alphas_cumprod.dtype == torch.float64
    t = snr_to_timestep(torch.tensor([0.01, 100.0], device="cuda"), s)
    assert t.is_cuda


# --------------------------------------------------------------------------- SNR <-> t


@pytest.mark.parametrize("name", SCHEDULES)
def test_round_trip_all_integer_t(name):
    s = make_schedule(name)
    k = torch.arange(s.num_timesteps)
    snr = timestep_to_snr(k, s)
    assert torch.equal(snr, s.snr)  # exact table values at integer t
    assert torch.equal(snr_to_timestep(snr, s), k.double())  # exact inverse
    assert torch.equal(snr_to_timestep(s.snr, s), k.double())
    assert torch.equal(log_snr_to_timestep(timestep_to_log_snr(k, s), s), k.double())


@pytest.mark.parametrize("name", ["linear", "cosine", "lift_cosine"])
def test_continuous_monotone_and_inverse(name):
    s = make_schedule(name)
    t = torch.linspace(0, s.num_timesteps - 1, 20001, dtype=torch.float64)
    ls = timestep_to_log_snr(t, s)
    assert bool((ls.diff() < 0).all()), "log-SNR(t) must be strictly decreasing"
    back = log_snr_to_timestep(ls, s)
    torch.testing.assert_close(back, t, rtol=0, atol=1e-9)
    snr = timestep_to_snr(t, s)
    torch.testing.assert_close(snr_to_timestep(snr, s), t, rtol=0, atol=1e-8)
    # linear in log-SNR between integers: the midpoint is the mean of the neighbours' log-SNR
    mid = timestep_to_log_snr(torch.tensor([10.5]), s)
    torch.testing.assert_close(mid, (s.log_snr[10:11] + s.log_snr[11:12]) / 2, rtol=1e-14, atol=0)
    g = torch.logspace(-3, 3, 1001, dtype=torch.float64)
    g = g[(g >= s.snr[-1]) & (g <= s.snr[0])]
    tt = snr_to_timestep(g, s)
    assert bool((tt.diff() < 0).all()), "t(SNR) must be strictly decreasing"


def test_vectorised_shapes_and_inputs():
    s = make_schedule("cosine")
    x = torch.rand(3, 4, dtype=torch.float64) * 100 + 1
    assert snr_to_timestep(x, s).shape == (3, 4)
    assert timestep_to_snr(torch.tensor([[1, 2], [3, 4]]), s).shape == (2, 2)
    assert snr_to_timestep(1.0, s).shape == ()
    assert snr_to_timestep(np.array([1.0, 2.0]), s).shape == (2,)
    np.testing.assert_allclose(snr_to_timestep([1.0], s).numpy(), snr_to_timestep(torch.tensor([1.0]), s).numpy())


def test_lift_anchors():
    """γ = 0.01 <-> t ≈ 943 and γ = 100 <-> t ≈ 54 (T = 1000): only the LIFT clipped cosine."""
    s = make_schedule("lift_cosine", 1000)
    t = snr_to_timestep(torch.tensor([0.01, 100.0]), s)
    assert t.round().long().tolist() == [943, 54]
    assert abs(float(t[0]) - 943) < 0.05 and abs(float(t[1]) - 54) < 0.25
    # the LIFT code's own rule: argmin_t |ᾱ_t - γ/(1+γ)|
    for g, want in ((0.01, 943), (100.0, 54)):
        assert int(torch.argmin((s.alphas_cumprod - g / (1 + g)).abs())) == want
    # the float32 construction of the LIFT code gives the same integers
    x = torch.linspace(0, 1000, 1001, dtype=torch.float32)
    f = torch.cos(((x / 1000) + 0.008) / 1.008 * math.pi * 0.5) ** 2
    f = f / f[0]
    b32 = torch.clip(1 - f[1:] / f[:-1], 1e-4, 0.02)
    s32 = NoiseSchedule(b32)
    assert snr_to_timestep(torch.tensor([0.01, 100.0]), s32).round().long().tolist() == [943, 54]


@pytest.mark.parametrize(
    "name,expected", [("cosine", (935, 55)), ("linear", (674, 26)), ("scaled_linear", (851, 53)), ("sigmoid", (969, 29))]
)
def test_other_schedules_miss_the_anchors(name, expected):
    t = snr_to_timestep(torch.tensor([0.01, 100.0]), make_schedule(name)).round().long().tolist()
    assert tuple(t) == expected and tuple(t) != (943, 54)


def test_out_of_range_clamp_modes():
    s = make_schedule("cosine")
    lo, hi = s.snr_range
    with pytest.warns(ScheduleRangeWarning, match="snr"):
        t = snr_to_timestep(torch.tensor([0.0, hi * 10, float("inf"), 1.0]), s)
    assert t[:3].tolist() == [999.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="snr"):
        snr_to_timestep(torch.tensor([hi * 10]), s, clamp="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert snr_to_timestep(lo / 2, s, clamp="silent").item() == 999.0
        assert snr_to_timestep(lo, s).item() == 999.0  # ends are inside the range
        assert snr_to_timestep(hi, s).item() == 0.0
    with pytest.warns(ScheduleRangeWarning, match="t value"):
        v = timestep_to_snr(torch.tensor([-3.0, 1200.0]), s)
    assert v.tolist() == [s.snr[0].item(), s.snr[-1].item()]
    with pytest.raises(ValueError, match="t value"):
        timestep_to_snr(1000, s, clamp="error")
    with pytest.raises(ValueError, match="clamp"):
        snr_to_timestep(1.0, s, clamp="yes")


def test_bad_inputs():
    s = make_schedule("linear", 100)
    with pytest.raises(ValueError, match="snr must be >= 0"):
        snr_to_timestep(torch.tensor([-1.0]), s)
    with pytest.raises(ValueError, match="NaN"):
        snr_to_timestep(torch.tensor([float("nan")]), s)
    with pytest.raises(ValueError, match="NaN"):
        timestep_to_snr(torch.tensor([float("nan")]), s)
    with pytest.raises(TypeError, match="snr"):
        snr_to_timestep("high", s)
    with pytest.raises(ValueError, match="schedule name"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule("linear", 1)
    with pytest.raises(TypeError, match="num_timesteps"):
        make_schedule("linear", 10.0)
    with pytest.raises(ValueError, match="open interval"):
        NoiseSchedule(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError, match="open interval"):
        NoiseSchedule(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.full((2, 2), 0.1))
    with pytest.raises(ValueError, match="max_beta"):
        make_schedule("cosine", max_beta=1.0)
