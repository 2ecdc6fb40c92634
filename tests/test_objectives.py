"""Objectives: q_sample/v against diffusers and closed forms, round trips, conversions, loss weights."""
from __future__ import annotations

import itertools

import pytest
import torch

from dualdiff.diffusion import (
    OBJECTIVES,
    convert_prediction,
    loss_weight,
    make_schedule,
    min_snr_loss_weight,
    model_output_to_x0_eps,
    normalize_objective,
    p2_loss_weight,
    predict_noise_from_start,
    predict_noise_from_v,
    predict_start_from_noise,
    predict_start_from_v,
    predict_v,
    q_sample,
    training_target,
)


@pytest.fixture
def diffusers(require):
    """diffusers, the reference these tests compare with (a skip without it; a failure under CI=true)."""
    return require("diffusers")


SHAPES = [(5, 3, 7, 6), (1, 2, 9), (4, 11), (3, 2, 3, 4, 5)]


def _t(B, T=1000):
    return torch.randint(0, T, (B,))


@pytest.mark.parametrize("shape", SHAPES)
def test_q_sample_closed_form(shape):
    s = make_schedule("cosine")
    x0, noise = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    t = _t(shape[0])
    out = q_sample(x0, t, noise, s)
    for b in range(shape[0]):
        a = s.alphas_cumprod[t[b]]
        torch.testing.assert_close(out[b], a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_and_velocity_vs_diffusers(beta_schedule, diffusers):
    d = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    name = {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule)
    s = make_schedule(name)
    x0, noise = torch.randn(6, 3, 5, 4), torch.randn(6, 3, 5, 4)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(q_sample(x0, t, noise, s), d.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict_v(x0, t, noise, s), d.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)
    # fp64 tables injected into diffusers: tight
    d.alphas_cumprod = s.alphas_cumprod.clone()
    x0d, nd = x0.double(), noise.double()
    torch.testing.assert_close(q_sample(x0d, t, nd, s), d.add_noise(x0d, nd, t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(predict_v(x0d, t, nd, s), d.get_velocity(x0d, nd, t), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name,shape", list(itertools.product(["linear", "cosine", "sigmoid"], SHAPES[:3])))
def test_round_trips(name, shape):
    """x0 -> x_t -> x0 through each objective's target."""
    s = make_schedule(name)
    x0, noise = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    t = _t(shape[0])
    t[0] = 0
    if shape[0] > 1:
        t[-1] = 999
    xt = q_sample(x0, t, noise, s)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(predict_start_from_noise(xt, t, noise, s), x0, **tol)
    torch.testing.assert_close(predict_noise_from_start(xt, t, x0, s), noise, rtol=1e-7, atol=1e-7)
    v = predict_v(x0, t, noise, s)
    torch.testing.assert_close(predict_start_from_v(xt, t, v, s), x0, **tol)
    torch.testing.assert_close(predict_noise_from_v(xt, t, v, s), noise, **tol)
    for obj in OBJECTIVES:
        target = training_target(obj, x0, t, noise, s)
        x0_hat, eps_hat = model_output_to_x0_eps(obj, target, xt, t, s)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(eps_hat, noise, rtol=1e-7, atol=1e-7)
        for obj2 in OBJECTIVES:
            conv = convert_prediction(target, obj, obj2, xt, t, s)
            torch.testing.assert_close(conv, training_target(obj2, x0, t, noise, s), rtol=1e-7, atol=1e-7)


def test_round_trip_fp32_mid_range():
    s = make_schedule("cosine")
    x0, noise = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    t = torch.randint(50, 900, (8,))
    xt = q_sample(x0, t, noise, s)
    assert xt.dtype == torch.float32
    for obj in OBJECTIVES:
        x0_hat, _ = model_output_to_x0_eps(obj, training_target(obj, x0, t, noise, s), xt, t, s)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_bf16_dtype_preserved():
    s = make_schedule("linear")
    x0 = torch.randn(2, 3, dtype=torch.bfloat16)
    out = q_sample(x0, torch.tensor([3, 400]), torch.randn_like(x0), s)
    assert out.dtype == torch.bfloat16


def test_per_sample_t_is_per_sample():
    s = make_schedule("linear")
    x0, noise = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    t = torch.tensor([5, 900, 5, 300])
    both = q_sample(x0, t, noise, s)
    for b in range(4):
        torch.testing.assert_close(both[b : b + 1], q_sample(x0[b : b + 1], t[b : b + 1], noise[b : b + 1], s))


def test_aliases():
    assert normalize_objective("epsilon") == "pred_noise"
    assert normalize_objective("sample") == "pred_x0"
    assert normalize_objective("v_prediction") == "pred_v"


# --------------------------------------------------------------------------- weights


def test_p2_weight():
    s = make_schedule("linear")
    t = torch.tensor([0, 10, 500, 999])
    snr = s.snr[t]
    torch.testing.assert_close(p2_loss_weight(t, s, 1.0, 1.0, dtype=torch.float64), 1 / (1 + snr))
    torch.testing.assert_close(p2_loss_weight(t, s, 0.5, 2.0, dtype=torch.float64), (2 + snr) ** -0.5)
    assert torch.equal(p2_loss_weight(t, s), torch.ones(4))  # gamma = 0
    w = p2_loss_weight(t, s, 1.0)
    assert w.dtype == torch.float32 and w.shape == (4,)
    assert bool((w.diff() > 0).all())  # down-weights high-SNR (small t)


@pytest.mark.parametrize("obj", OBJECTIVES)
def test_min_snr_weight(obj):
    s = make_schedule("cosine")
    t = torch.arange(0, 1000, 7)
    snr = s.snr[t]
    w = min_snr_loss_weight(t, s, obj, 5.0, dtype=torch.float64)
    c = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    expect = {"pred_noise": c / snr, "pred_x0": c, "pred_v": c / (snr + 1)}[obj]
    torch.testing.assert_close(w, expect, rtol=1e-14, atol=0)


def test_min_snr_equalises_objectives():
    """Weighted losses of the three objectives agree for the same x0 error."""
    s = make_schedule("cosine")
    B = 6
    t = torch.tensor([3, 40, 200, 500, 800, 990])
    x0, noise = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 5, dtype=torch.float64)
    xt = q_sample(x0, t, noise, s)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)  # some model's x0 prediction
    snr = s.snr[t]
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) * ((x0_hat - x0) ** 2).mean(1)
    for obj in OBJECTIVES:
        pred = convert_prediction(x0_hat, "pred_x0", obj, xt, t, s)
        raw = ((pred - training_target(obj, x0, t, noise, s)) ** 2).mean(1)
        got = raw * min_snr_loss_weight(t, s, obj, 5.0, dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_loss_weight_dispatch_and_errors():
    s = make_schedule("linear")
    t = torch.tensor([1, 2, 3])
    assert torch.equal(loss_weight(t, s, "pred_v"), torch.ones(3))
    torch.testing.assert_close(loss_weight(t, s, "pred_x0", "p2", p2_gamma=1.0), p2_loss_weight(t, s, 1.0))
    torch.testing.assert_close(loss_weight(t, s, "pred_v", "min_snr", min_snr_gamma=3.0), min_snr_loss_weight(t, s, "pred_v", 3.0))
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(t, s, "pred_v", "snr")
    with pytest.raises(ValueError, match="objective"):
        loss_weight(t, s, "pred_eps", "min_snr")
    with pytest.raises(ValueError, match="gamma"):
        min_snr_loss_weight(t, s, "pred_v", 0.0)
    with pytest.raises(ValueError, match="gamma"):
        p2_loss_weight(t, s, -1.0)


def test_bad_inputs():
    s = make_schedule("linear", 100)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"t values must be in \[0, 99\]"):
        q_sample(x, torch.tensor([0, 1, 100]), x, s)
    with pytest.raises(ValueError, match=r"t values"):
        q_sample(x, torch.tensor([0, -1, 5]), x, s)
    with pytest.raises(TypeError, match="integer tensor"):
        q_sample(x, torch.tensor([0.0, 1.0, 2.0]), x, s)
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        q_sample(x, torch.tensor([0, 1]), x, s)
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(x, torch.tensor([0, 1, 2]), torch.randn(3, 5), s)
    with pytest.raises(TypeError, match="x0 must be a floating-point"):
        q_sample(torch.ones(3, 4, dtype=torch.long), torch.tensor([0, 1, 2]), x, s)
    with pytest.raises(TypeError, match="schedule"):
        q_sample(x, torch.tensor([0, 1, 2]), x, "linear")
    with pytest.raises(ValueError, match="objective"):
        training_target("pred_eps", x, torch.tensor([0, 1, 2]), x, s)
    with pytest.raises(ValueError, match="to_objective"):
        convert_prediction(x, "pred_v", "v", x, torch.tensor([0, 1, 2]), s)
    # an int t is an explicit "same t for every sample"
    torch.testing.assert_close(q_sample(x, 7, x, s), q_sample(x, torch.full((3,), 7), x, s))


def test_torch_compile_fullgraph():
    """The training-side functions trace without graph breaks (the train loop may compile them)."""
    s = make_schedule("cosine")

    def f(x0, t, noise):
        xt = q_sample(x0, t, noise, s)
        v = training_target("pred_v", x0, t, noise, s)
        w = loss_weight(t, s, "pred_v", "min_snr")
        return xt, v, w, predict_start_from_v(xt, t, v, s)

    g = torch.compile(f, fullgraph=True, backend="eager")
    x, t = torch.randn(4, 3, 5, 5), torch.randint(0, 1000, (4,))
    n = torch.randn_like(x)
    for a, b in zip(f(x, t, n), g(x, t, n)):
        torch.testing.assert_close(a, b)


def _losses(objective, weighting, **kw):
    """(weighted loss of a random prediction of ``objective``, the x0 MSE of the same prediction,
    snr) per sample, in float64, over t spanning the whole cosine schedule."""
    sched = make_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0, 3, 50, 250, 500, 750, 950, 999])
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = q_sample(x0, t, noise, sched)
    pred = training_target(objective, x0, t, noise, sched) + 0.1 * torch.randn(8, 3, 4, 4, generator=g,
                                                                             dtype=torch.float64)
    w = loss_weight(t, sched, objective, weighting, dtype=torch.float64, **kw)
    loss = w * (pred - training_target(objective, x0, t, noise, sched)).pow(2).flatten(1).mean(1)
    x0_hat = convert_prediction(pred, objective, "pred_x0", x_t, t, sched)
    return loss, (x0_hat - x0).pow(2).flatten(1).mean(1), sched.snr[t].double(), (pred, noise, x0, t, sched)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting,kw", [("none", {}), ("p2", {"p2_gamma": 0.0}), ("p2", {"p2_gamma": 1.0}),
                                          ("p2", {"p2_gamma": 0.5, "p2_k": 2.0}),
                                          ("min_snr", {"min_snr_gamma": 5.0})])
def test_effective_x0_weight_of_every_combination(objective, weighting, kw):
    """The README's table: w(t)·‖target - pred‖² == λ(snr)·‖x0 - x̂0‖² for the same prediction."""
    from dualdiff.diffusion.objectives import x0_loss_weight

    loss, x0_mse, snr, _ = _losses(objective, weighting, **kw)
    lam = x0_loss_weight(snr, objective, weighting, **kw)
    torch.testing.assert_close(loss, lam * x0_mse, rtol=1e-6, atol=1e-12)


def test_named_equivalences():
    """pred_v with p2 γ=1, k=1 is the unweighted x0 MSE; pred_noise with γ=0 (the seed's) is the
    ε MSE, which is snr · x0 MSE; min-SNR makes the three objectives equal."""
    loss, x0_mse, _, _ = _losses("pred_v", "p2", p2_gamma=1.0, p2_k=1.0)
    torch.testing.assert_close(loss, x0_mse, rtol=1e-6, atol=1e-12)
    loss, x0_mse, snr, (pred, noise, _, _, _) = _losses("pred_noise", "p2", p2_gamma=0.0)
    torch.testing.assert_close(loss, (pred - noise).pow(2).flatten(1).mean(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, snr * x0_mse, rtol=1e-6, atol=1e-12)
    loss, x0_mse, snr, _ = _losses("pred_x0", "p2", p2_gamma=1.0)
    torch.testing.assert_close(loss, x0_mse / (1 + snr), rtol=1e-6, atol=1e-12)
    # not all the same thing: at the default (γ=0) pred_v and pred_noise differ by (1+snr)/snr
    lv, xv, snr, _ = _losses("pred_v", "none")
    assert not torch.allclose(lv, snr * xv)
