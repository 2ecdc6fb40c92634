"""Samplers: CFG, the DDPM posterior (closed form, Bayes, diffusers' DDPMScheduler), DDPM/DDIM
loops (diffusers' loop, per-sample sequences, tuple inputs, analytic Gaussian data)."""
from __future__ import annotations

import itertools

import pytest
import torch

from dualdiff.diffusion import (
    DDIMScheduler,
    NoiseSchedule,
    cfg_combine,
    cfg_model_fn,
    ddim_sample,
    ddpm_sample,
    ddpm_step,
    make_schedule,
    predict_noise_from_start,
    q_posterior,
)


@pytest.fixture
def diffusers(require):
    """diffusers, the reference these tests compare with (a skip without it; a failure under CI=true)."""
    return require("diffusers")


PRED = ["epsilon", "sample", "v_prediction"]


# --------------------------------------------------------------------------- CFG


def test_cfg_combine():
    u, c = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    torch.testing.assert_close(cfg_combine(u, c, 3.0), u + 3.0 * (c - u))
    torch.testing.assert_close(cfg_combine(u, c, 1.0), c)
    torch.testing.assert_close(cfg_combine(u, c, 0.0), u)
    s = torch.tensor([0.0, 1.0, 7.5]).view(3, 1, 1)
    torch.testing.assert_close(cfg_combine(u, c, s), u + s * (c - u))
    # rescale (Lin et al. 2023): phi = 1 gives per-sample std equal to cond's
    r = cfg_combine(u, c, 5.0, rescale_phi=1.0)
    torch.testing.assert_close(r.std(dim=(1, 2)), c.std(dim=(1, 2)))
    g = u + 5.0 * (c - u)
    torch.testing.assert_close(cfg_combine(u, c, 5.0, rescale_phi=0.3), 0.3 * r + 0.7 * g)
    with pytest.raises(ValueError, match="cond shape"):
        cfg_combine(u, c[:2], 2.0)
    with pytest.raises(ValueError, match="rescale_phi"):
        cfg_combine(u, c, 2.0, rescale_phi=1.5)
    fn = cfg_model_fn(lambda x, t: x * 2, lambda x, t: x, 4.0)
    x = torch.randn(2, 3)
    torch.testing.assert_close(fn(x, None), x + 4.0 * (2 * x - x))


# --------------------------------------------------------------------------- posterior


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_posterior_closed_form(name):
    s = make_schedule(name)
    B = 6
    t = torch.tensor([0, 1, 10, 400, 998, 999])
    x0, xt = torch.randn(B, 7, dtype=torch.float64), torch.randn(B, 7, dtype=torch.float64)
    mean, var, logvar = q_posterior(x0, xt, t, s)
    ab, ab_prev, beta, alpha = s.alphas_cumprod[t], s.alphas_cumprod_prev[t], s.betas[t], s.alphas[t]
    c1 = (beta * ab_prev.sqrt() / (1 - ab)).view(B, 1)
    c2 = ((1 - ab_prev) * alpha.sqrt() / (1 - ab)).view(B, 1)
    torch.testing.assert_close(mean, c1 * x0 + c2 * xt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var.view(B), beta * (1 - ab_prev) / (1 - ab), rtol=1e-12, atol=0)
    torch.testing.assert_close(logvar.view(B), torch.log((beta * (1 - ab_prev) / (1 - ab)).clamp(min=1e-20)))
    assert var[0].item() == 0.0  # t = 0: posterior is a point mass at x0
    torch.testing.assert_close(mean[0], x0[0], rtol=1e-12, atol=1e-12)


def test_q_posterior_is_bayes_for_skipped_steps():
    """q(x_p | x_t, x0) ∝ q(x_p | x0) q(x_t | x_p) for any p < t (Gaussian product)."""
    s = make_schedule("cosine")
    t = torch.tensor([999, 600, 321, 50])
    tp = torch.tensor([899, 200, 320, 0])
    x0, xt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    mean, var, _ = q_posterior(x0, xt, t, s, tp)
    ab, abp = s.alphas_cumprod[t].view(4, 1), s.alphas_cumprod[tp].view(4, 1)
    a_cur = ab / abp  # q(x_t | x_p) = N(sqrt(a_cur) x_p, 1 - a_cur)
    prec = 1 / (1 - abp) + a_cur / (1 - a_cur)
    m = (abp.sqrt() * x0 / (1 - abp) + a_cur.sqrt() * xt / (1 - a_cur)) / prec
    torch.testing.assert_close(var, 1 / prec, rtol=1e-10, atol=0)
    torch.testing.assert_close(mean, m, rtol=1e-10, atol=1e-10)


def _ddpm_pair(diffusers, pred, variance_type, beta_schedule="linear"):
    d = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=pred,
                                variance_type=variance_type, clip_sample=False)
    s = NoiseSchedule(d.betas.double())
    d.alphas_cumprod = s.alphas_cumprod.clone()
    return s, d


@pytest.mark.parametrize("pred,variance_type", list(itertools.product(PRED, ["fixed_small", "fixed_large"])))
def test_ddpm_step_matches_diffusers_full_chain(pred, variance_type, diffusers):
    s, d = _ddpm_pair(diffusers, pred, variance_type)
    B = 2
    x_ours = torch.randn(B, 3, dtype=torch.float64)
    x_d = x_ours.clone()
    g_ours, g_d, g_model = (torch.Generator().manual_seed(k) for k in (7, 7, 1))
    for t in range(999, -1, -1):
        out = torch.randn(B, 3, generator=g_model, dtype=torch.float64)
        ref = d.step(out, t, x_d, generator=g_d)
        got = ddpm_step(out, torch.full((B,), t), x_ours, s, prediction_type=pred, variance_type=variance_type, generator=g_ours)
        torch.testing.assert_close(got[1], ref.pred_original_sample, rtol=1e-9, atol=1e-9, msg=f"x0 t={t}")
        torch.testing.assert_close(got[0], ref.prev_sample, rtol=1e-9, atol=1e-9, msg=f"prev t={t}")
        x_ours, x_d = got[0], ref.prev_sample


@pytest.mark.parametrize("pred", PRED)
def test_ddpm_step_matches_diffusers_skipped_steps(pred, diffusers):
    s, d = _ddpm_pair(diffusers, pred, "fixed_small", "squaredcos_cap_v2")
    d.set_timesteps(40)
    ts = d.timesteps
    prev = torch.cat([ts[1:], torch.tensor([-1])])
    x_ours = torch.randn(3, 2, 4, dtype=torch.float64)
    x_d = x_ours.clone()
    g_ours, g_d = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t, tp in zip(ts.tolist(), prev.tolist()):
        out = torch.randn(3, 2, 4, dtype=torch.float64)
        ref = d.step(out, t, x_d, generator=g_d)
        got = ddpm_step(out, torch.full((3,), t), x_ours, s, torch.full((3,), tp), prediction_type=pred, generator=g_ours)
        torch.testing.assert_close(got[0], ref.prev_sample, rtol=1e-9, atol=1e-9, msg=f"t={t}")
        x_ours, x_d = got[0], ref.prev_sample


# --------------------------------------------------------------------------- loops


def _gauss_model(s, mu, sd, dtype=torch.float64):
    """Exact eps-prediction for data ~ N(mu, sd^2) per dim."""

    def fn(x, t):
        ab = s.alphas_cumprod[t].to(dtype).view(-1, *([1] * (x.dim() - 1)))
        x0 = mu + ab.sqrt() * sd**2 / (ab * sd**2 + 1 - ab) * (x - ab.sqrt() * mu)
        return predict_noise_from_start(x, t, x0, s)

    return fn


def test_ddpm_sample_gaussian_data():
    s = make_schedule("linear")
    mu, sd = 0.5, 0.3
    x_T = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ddpm_sample(_gauss_model(s, mu, sd), x_T, s, generator=torch.Generator().manual_seed(1)).sample
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() - sd) < 0.02


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_sample_gaussian_data(spacing):
    """For data N(mu, sd^2) the probability-flow ODE maps x_T to mu + sd * x_T; DDIM (eta = 0)
    with the exact denoiser converges to that map at first order in the step count."""
    s = make_schedule("cosine")
    sched = DDIMScheduler(s)
    mu, sd = -0.4, 0.5
    x_T = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = mu + sd * x_T
    err = {}
    for n in (50, 200, 1000):
        out = ddim_sample(_gauss_model(s, mu, sd), x_T, sched.set_timesteps(n, spacing), sched).sample
        err[n] = (out - exact).abs().max().item()
    assert err[1000] < 0.004
    assert err[50] > 3 * err[200] > 9 * err[1000]


def _toy_model(x, t):
    return 0.5 * torch.tanh(x) + (t.to(x.dtype) / 1000).view(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("pred,eta", [("epsilon", 0.0), ("v_prediction", 0.0), ("sample", 0.0), ("epsilon", 1.0)])
def test_ddim_sample_matches_diffusers_loop(pred, eta, diffusers):
    d = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=pred, clip_sample=False)
    s = NoiseSchedule(d.betas.double())
    d.alphas_cumprod = s.alphas_cumprod.clone()
    d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched = DDIMScheduler(s)
    d.set_timesteps(25)
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x = x_T.clone()
    g = torch.Generator().manual_seed(2)
    for t in d.timesteps:
        x = d.step(_toy_model(x, torch.full((3,), int(t))), t, x, eta=eta, generator=g).prev_sample
    got = ddim_sample(_toy_model, x_T, sched.set_timesteps(25, "leading"), sched, eta=eta, prediction_type=pred,
                      generator=torch.Generator().manual_seed(2), return_trajectory=True)
    torch.testing.assert_close(got.sample, x, rtol=1e-9, atol=1e-9)
    assert len(got.trajectory) == 25


@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_sample_clipped_model_output_matches_diffusers_loop(use_clipped, diffusers):
    d = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=True)
    s = NoiseSchedule(d.betas.double())
    d.alphas_cumprod = s.alphas_cumprod.clone()
    d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched = DDIMScheduler(s)
    d.set_timesteps(10)
    x_T = 2 * torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x = x_T.clone()
    for t in d.timesteps:
        x = d.step(_toy_model(x, torch.full((3,), int(t))), t, x, use_clipped_model_output=use_clipped).prev_sample
    kw = dict(clip_sample=True, use_clipped_model_output=use_clipped)
    got = ddim_sample(_toy_model, x_T, sched.set_timesteps(10, "leading"), sched, **kw).sample
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-9)
    other = ddim_sample(_toy_model, x_T, sched.set_timesteps(10, "leading"), sched, clip_sample=True,
                        use_clipped_model_output=not use_clipped).sample
    assert (other - got).abs().max() > 1e-3  # the clip is active: the option changes the samples


def test_ddim_sample_per_sample_sequences_equal_each_alone():
    s = make_schedule("cosine")
    sched = DDIMScheduler(s)
    S, B = 12, 3
    seqs = torch.stack(
        [
            sched.set_timesteps(S, "trailing"),
            torch.linspace(999, 0, S).round().long(),
            torch.tensor([999, 999, 999, 800, 800, 500, 400, 300, 200, 100, 50, 0]),  # holds, as a DP path may
        ],
        dim=1,
    )
    x_T = torch.randn(B, 2, 5, 5)
    both = ddim_sample(_toy_model, x_T, seqs, sched).sample
    for b in range(B):
        alone = ddim_sample(_toy_model, x_T[b : b + 1], seqs[:, b], sched).sample
        torch.testing.assert_close(both[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_ddim_sample_tuple_inputs_dual_scale():
    """Two scales, each with its own per-sample sequence; model_fn sees tuples."""
    s = make_schedule("lift_cosine")
    sched = DDIMScheduler(s)
    seq64 = torch.tensor([999, 900, 700, 400, 100, 20])
    seq32 = torch.tensor([999, 700, 400, 100, 20, 0])
    x64, x32 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    seen = []

    def model(xs, ts):
        a, b = xs
        seen.append((int(ts[0][0]), int(ts[1][0])))
        return _toy_model(a, ts[1]), _toy_model(b, ts[0])  # cross-conditioned, like a dual-scale net

    out64, out32 = ddim_sample(model, (x64, x32), (seq64, seq32), sched, progress=True).sample
    assert seen == list(zip(seq64.tolist(), seq32.tolist()))
    a, b = x64, x32
    prev64, prev32 = seq64.tolist()[1:] + [-1], seq32.tolist()[1:] + [-1]
    for t64, t32, p64, p32 in zip(seq64.tolist(), seq32.tolist(), prev64, prev32):
        ta, tb = torch.full((2,), t64), torch.full((2,), t32)
        oa, ob = _toy_model(a, tb), _toy_model(b, ta)
        a = sched.step(oa, ta, a, torch.full((2,), p64)).prev_sample
        b = sched.step(ob, tb, b, torch.full((2,), p32)).prev_sample
    torch.testing.assert_close(out64, a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out32, b, rtol=1e-12, atol=1e-12)


def test_ddpm_sample_one_generator_per_chunk_equals_each_chunk_alone():
    """Per-run generators: chunk g of the batch gets its step noise from generator g, so each
    chunk's samples are those it gets sampled alone with that generator (whatever is sampled
    beside it, in whatever order)."""
    from dualdiff.diffusion.samplers import randn_chunks

    s = make_schedule("linear", 30)
    model = _gauss_model(s, 0.5, 0.3)  # acts on each sample separately
    seeds, n = [3, 4, 5], 40
    gens = [torch.Generator().manual_seed(k) for k in seeds]
    x_T = randn_chunks((3 * n, 2), gens, dtype=torch.float64)
    got = ddpm_sample(model, x_T, s, generator=gens).sample
    for g, k in enumerate(seeds):
        gen = torch.Generator().manual_seed(k)
        x_alone = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(x_T[g * n:(g + 1) * n], x_alone, rtol=0, atol=0)
        alone = ddpm_sample(model, x_alone, s, generator=gen).sample
        torch.testing.assert_close(got[g * n:(g + 1) * n], alone, rtol=1e-12, atol=1e-12)
    # the chunks in another order: each chunk's samples move with its generator
    perm = [2, 0, 1]
    gens_p = [torch.Generator().manual_seed(seeds[g]) for g in perm]
    x_p = randn_chunks((3 * n, 2), gens_p, dtype=torch.float64)
    got_p = ddpm_sample(model, x_p, s, generator=gens_p).sample
    for i, g in enumerate(perm):
        torch.testing.assert_close(got_p[i * n:(i + 1) * n], got[g * n:(g + 1) * n],
                                   rtol=1e-12, atol=1e-12)


def test_randn_chunks_and_ddpm_step_generator_lists():
    from dualdiff.diffusion.samplers import randn_chunks

    gens = lambda: [torch.Generator().manual_seed(k) for k in (1, 2)]  # noqa: E731
    x = randn_chunks((6, 3), gens())
    ref = torch.cat([torch.randn(3, 3, generator=g) for g in gens()])
    assert torch.equal(x, ref)
    one = randn_chunks((6, 3), torch.Generator().manual_seed(1))
    assert torch.equal(one, torch.randn(6, 3, generator=torch.Generator().manual_seed(1)))
    # ddpm_step with a list draws exactly randn_chunks' noise
    s = make_schedule("linear", 100)
    xt, eps, t = torch.randn(6, 3), torch.randn(6, 3), torch.full((6,), 40)
    a, _ = ddpm_step(eps, t, xt, s, generator=gens())
    b, _ = ddpm_step(eps, t, xt, s, variance_noise=randn_chunks((6, 3), gens()))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="divisible by 4"):
        randn_chunks((6, 3), gens() * 2)
    with pytest.raises(TypeError, match="non-empty"):
        randn_chunks((6, 3), [])
    with pytest.raises(TypeError, match="torch.Generator"):
        randn_chunks((6, 3), [torch.Generator(), 3])
    with pytest.raises(TypeError, match="generator"):
        ddpm_step(eps, t, xt, s, generator=7)


def test_bad_inputs():
    s = make_schedule("linear", 100)
    sched = DDIMScheduler(s)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="non-increasing"):
        ddim_sample(_toy_model, x, torch.tensor([10, 20, 0]), sched)
    with pytest.raises(ValueError, match=r"shape \[S\] or \[S, 2\]"):
        ddim_sample(_toy_model, x, torch.zeros(3, 5, dtype=torch.long), sched)
    with pytest.raises(ValueError, match=r"values must be in \[0, 99\]"):
        ddim_sample(_toy_model, x, torch.tensor([100, 0]), sched)
    with pytest.raises(TypeError, match="integer tensor"):
        ddim_sample(_toy_model, x, torch.tensor([50.0, 0.0]), sched)
    with pytest.raises(ValueError, match="structure"):
        ddim_sample(_toy_model, (x, x), torch.tensor([50, 0]), sched)
    with pytest.raises(ValueError, match="model_fn output shape"):
        ddim_sample(lambda x, t: x[:, :2], x, torch.tensor([50, 0]), sched)
    with pytest.raises(TypeError, match="scheduler"):
        ddim_sample(_toy_model, x, torch.tensor([50, 0]), s)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddpm_sample(_toy_model, x, s, torch.tensor([50, 50, 0]))
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(x, torch.tensor([5, 5]), x, s, variance_type="learned")
    with pytest.raises(ValueError, match="t_prev must be < t"):
        q_posterior(x, x, torch.tensor([5, 5]), s, torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="at most one"):
        ddpm_step(x, torch.tensor([5, 5]), x, s, generator=torch.Generator(), variance_noise=x)
