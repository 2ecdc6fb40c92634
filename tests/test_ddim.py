"""DDIMScheduler against diffusers' DDIMScheduler: timesteps, step for every prediction type,
spacing and eta, per-sample timesteps, final-alpha handling, bad inputs."""
from __future__ import annotations

import itertools

import pytest
import torch

from dualdiff.diffusion import DDIMScheduler, NoiseSchedule, ddim_timesteps, make_schedule, previous_timesteps


@pytest.fixture
def diffusers(require):
    """diffusers, the reference these tests compare with (a skip without it; a failure under CI=true)."""
    return require("diffusers")


PRED = ["epsilon", "sample", "v_prediction"]
SPACING = ["leading", "trailing", "linspace"]
SHAPE = (3, 2, 5, 4)


def _pair(diffusers, beta_schedule="linear", set_alpha_to_one=True, steps_offset=0, spacing="leading", pred="epsilon", fp64=True, clip=False, clip_range=1.0):
    """(ours, diffusers) built on the same betas; with fp64 diffusers gets our float64 ᾱ table."""
    d = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset, timestep_spacing=spacing, prediction_type=pred, clip_sample=clip,
        clip_sample_range=clip_range,
    )
    s = NoiseSchedule(d.betas.double())
    ours = DDIMScheduler(s, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset)
    if fp64:
        d.alphas_cumprod = s.alphas_cumprod.clone()
        d.final_alpha_cumprod = ours.final_alpha_cumprod.clone()
    return ours, d


@pytest.mark.parametrize(
    "spacing,n,offset",
    [(sp, n, off) for sp in SPACING for n in (1, 7, 30, 50, 333, 1000) for off in (0, 1)
     if not (sp == "leading" and off == 1 and n == 1000)],
)
def test_set_timesteps_matches_diffusers(spacing, n, offset, diffusers):
    ours, d = _pair(diffusers, spacing=spacing, steps_offset=offset)
    d.set_timesteps(n)
    ts = ours.set_timesteps(n, spacing)
    assert ts.dtype == torch.int64
    assert torch.equal(ts, d.timesteps), (ts[:5], d.timesteps[:5])
    assert torch.equal(ours.prev_timesteps[:-1], ts[1:]) and ours.prev_timesteps[-1] == -1
    if spacing == "leading":  # diffusers' t - T//N is the next timestep exactly for leading spacing
        theirs = (ts - 1000 // n).clamp(min=-1)  # any negative value means "final step"
        assert torch.equal(ours.prev_timesteps, theirs)


def _run_both(ours, d, pred, n, eta, clip=False, clip_range=1.0, dtype=torch.float64, spacing="leading", use_clipped=False):
    d.set_timesteps(n)
    ts = ours.set_timesteps(n, spacing)
    x_ours = torch.randn(SHAPE, dtype=dtype)
    x_d = x_ours.clone()
    B = SHAPE[0]
    for t in ts.tolist():
        model_out = torch.randn(SHAPE, dtype=dtype) * 0.7
        z = torch.randn(SHAPE, dtype=dtype)
        t_prev = t - 1000 // n  # diffusers' rule, whatever the spacing
        ref = d.step(model_out, t, x_d, eta=eta, variance_noise=z if eta > 0 else None,
                     use_clipped_model_output=use_clipped)
        got = ours.step(
            model_out, torch.full((B,), t), x_ours, torch.full((B,), t_prev), eta=eta, prediction_type=pred,
            clip_sample=clip, clip_range=clip_range, variance_noise=z if eta > 0 else None,
            use_clipped_model_output=use_clipped,
        )
        yield t, got, ref
        x_ours, x_d = got.prev_sample, ref.prev_sample


@pytest.mark.parametrize("pred,spacing,eta", list(itertools.product(PRED, SPACING, [0.0, 0.6])))
def test_step_matches_diffusers_fp64(pred, spacing, eta, diffusers):
    ours, d = _pair(diffusers, beta_schedule="linear", spacing=spacing, pred=pred)
    for t, got, ref in _run_both(ours, d, pred, 13, eta, spacing=spacing):
        torch.testing.assert_close(got.pred_original_sample, ref.pred_original_sample, rtol=1e-10, atol=1e-10, msg=f"x0 t={t}")
        torch.testing.assert_close(got.prev_sample, ref.prev_sample, rtol=1e-10, atol=1e-10, msg=f"prev t={t}")


@pytest.mark.parametrize("pred,set_one", list(itertools.product(PRED, [True, False])))
def test_step_matches_diffusers_clip_and_final_alpha(pred, set_one, diffusers):
    ours, d = _pair(diffusers, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=set_one, steps_offset=1, pred=pred, clip=True, clip_range=1.5)
    for use_clipped in (False, True):
        for t, got, ref in _run_both(ours, d, pred, 10, 1.0, clip=True, clip_range=1.5, use_clipped=use_clipped):
            assert float(got.pred_original_sample.abs().max()) <= 1.5
            torch.testing.assert_close(got.pred_original_sample, ref.pred_original_sample, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got.prev_sample, ref.prev_sample, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pred", PRED)
def test_step_matches_diffusers_default_fp32(pred, diffusers):
    """Out of the box (diffusers' float32 tables, our float64 ones) on float32 samples."""
    ours, d = _pair(diffusers, beta_schedule="scaled_linear", pred=pred, fp64=False, spacing="trailing")
    for t, got, ref in _run_both(ours, d, pred, 20, 0.0, dtype=torch.float32, spacing="trailing"):
        assert got.prev_sample.dtype == torch.float32
        torch.testing.assert_close(got.prev_sample, ref.prev_sample, rtol=2e-4, atol=2e-4, msg=f"t={t}")
        torch.testing.assert_close(got.pred_original_sample, ref.pred_original_sample, rtol=2e-4, atol=2e-4)


def test_generator_noise_matches_diffusers(diffusers):
    ours, d = _pair(diffusers)
    d.set_timesteps(10)
    x, out = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    ref = d.step(out, 500, x, eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    got = ours.step(out, torch.full((3,), 500), x, torch.full((3,), 400), eta=1.0, generator=torch.Generator().manual_seed(3)).prev_sample
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pred,eta", list(itertools.product(PRED, [0.0, 1.0])))
def test_mixed_per_sample_t_equals_each_alone(pred, eta):
    s = make_schedule("cosine")
    sched = DDIMScheduler(s)
    B = 5
    x = torch.randn(B, 3, 4, 4)
    out = torch.randn(B, 3, 4, 4)
    z = torch.randn(B, 3, 4, 4)
    t = torch.tensor([999, 500, 20, 3, 700])
    t_prev = torch.tensor([949, 500, -1, 0, 10])  # includes a hold (t_prev == t) and a final step
    both = sched.step(out, t, x, t_prev, eta=eta, prediction_type=pred, variance_noise=z, clip_sample=True)
    for b in range(B):
        one = sched.step(out[b : b + 1], t[b : b + 1], x[b : b + 1], t_prev[b : b + 1], eta=eta, prediction_type=pred,
                         variance_noise=z[b : b + 1], clip_sample=True)
        torch.testing.assert_close(both.prev_sample[b : b + 1], one.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(both.pred_original_sample[b : b + 1], one.pred_original_sample, rtol=1e-6, atol=1e-6)


def test_hold_step_is_identity_and_final_step_is_x0():
    s = make_schedule("linear")
    sched = DDIMScheduler(s)
    x, out = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    r = sched.step(out, torch.tensor([400, 400]), x, torch.tensor([400, -1]), eta=0.5, variance_noise=torch.randn(2, 6, dtype=torch.float64))
    torch.testing.assert_close(r.prev_sample[0], x[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.prev_sample[1], r.pred_original_sample[1], rtol=1e-12, atol=1e-12)
    # set_alpha_to_one=False: the last step lands on ᾱ_0 instead of 1
    sched0 = DDIMScheduler(s, set_alpha_to_one=False)
    r0 = sched0.step(out, torch.tensor([400, 400]), x, torch.tensor([-1, -1]))
    a0 = s.alphas_cumprod[0]
    torch.testing.assert_close(r0.prev_sample, a0.sqrt() * r0.pred_original_sample + (1 - a0).sqrt() * out)


def test_exact_eps_recovers_x0_deterministically():
    """With the true noise as model output, DDIM (eta=0) maps x_t to the clean x0 in one pass of steps."""
    s = make_schedule("cosine")
    sched = DDIMScheduler(s)
    x0, eps = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    ts = sched.set_timesteps(25, "trailing")
    x = sched.add_noise(x0, eps, torch.full((4,), int(ts[0])))
    for t, tp in zip(ts.tolist(), sched.prev_timesteps.tolist()):
        x = sched.step(eps, torch.full((4,), t), x, torch.full((4,), tp)).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-9, atol=1e-9)


def test_previous_timesteps_2d():
    seq = torch.tensor([[9, 9], [5, 9], [0, 3]])
    assert previous_timesteps(seq).tolist() == [[5, 9], [0, 3], [-1, -1]]


def test_bad_inputs():
    sched = DDIMScheduler(make_schedule("linear", 100))
    x = torch.randn(2, 3)
    t, tp = torch.tensor([50, 40]), torch.tensor([40, 30])
    with pytest.raises(ValueError, match="spacing"):
        sched.set_timesteps(10, "cosine")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(101)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        sched.step(x, t, x, tp, prediction_type="eps")
    with pytest.raises(ValueError, match="t_prev must be <= t"):
        sched.step(x, tp, x, t)
    with pytest.raises(ValueError, match=r"t values must be in \[0, 99\]"):
        sched.step(x, torch.tensor([100, 5]), x, tp)
    with pytest.raises(ValueError, match=r"t_prev values must be in"):
        sched.step(x, t, x, torch.tensor([100, 5]))
    with pytest.raises(ValueError, match=r"t must have shape \[2\]"):
        sched.step(x, torch.tensor([50, 40, 30]), x, tp)
    with pytest.raises(TypeError, match="t must be an integer tensor"):
        sched.step(x, t.float(), x, tp)
    with pytest.raises(ValueError, match="model_output shape"):
        sched.step(torch.randn(2, 4), t, x, tp)
    with pytest.raises(ValueError, match="eta"):
        sched.step(x, t, x, tp, eta=-0.1)
    with pytest.raises(ValueError, match="at most one"):
        sched.step(x, t, x, tp, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="variance_noise"):
        sched.step(x, t, x, tp, eta=1.0, variance_noise=torch.randn(2, 2))
    with pytest.raises(TypeError, match="schedule"):
        DDIMScheduler("linear")
    with pytest.raises(ValueError, match="steps_offset"):
        ddim_timesteps(10, 100, "leading", steps_offset=10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """A CPU schedule used with CUDA tensors (tables follow x), CPU generator for the noise."""
    from dualdiff.diffusion import ddpm_step, q_sample

    s = make_schedule("cosine")
    sched = DDIMScheduler(s)
    x, out = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t, tp = torch.tensor([999, 500, 3]), torch.tensor([900, 500, -1])
    ref = sched.step(out, t, x, tp, eta=1.0, generator=torch.Generator().manual_seed(0))
    got = sched.step(out.cuda(), t.cuda(), x.cuda(), tp.cuda(), eta=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.prev_sample.cpu(), ref.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_sample(x.cuda(), t.cuda(), out.cuda(), s).cpu(), q_sample(x, t, out, s), rtol=1e-6, atol=1e-6)
    a = ddpm_step(out, t, x, s, generator=torch.Generator().manual_seed(1))[0]
    b = ddpm_step(out.cuda(), t.cuda(), x.cuda(), s.to("cuda"), generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
