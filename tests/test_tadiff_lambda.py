"""tadiff λ(t): closed forms, the seed's numeric claims on the real schedule, the learnable λ."""
import math

import pytest
import torch

from dualdiff.diffusion import make_schedule
from dualdiff.experiments.tadiff import LAMBDA_SCHEDULES, LearnableLambda, lambda_weight

AB = torch.tensor([0.0, 0.079, 0.3, 0.5, 0.5001, 0.9, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("lambda0,k", [(0.01, 2.0), (0.5, 1.0), (0.02, 0.0)])
def test_closed_forms(lambda0, k):
    lw = lambda s: lambda_weight(s, AB, lambda0=lambda0, k=k)
    assert torch.equal(lw("fixed"), torch.full_like(AB, lambda0))
    assert torch.allclose(lw("power"), lambda0 * AB ** k)
    assert torch.allclose(lw("cosine"), lambda0 * torch.sin(math.pi * AB / 2) ** 2)
    assert torch.allclose(lw("cosine_seed"), lambda0 * torch.cos(math.pi * AB / 2) ** 2)
    step = lw("step")
    assert step[3].item() == pytest.approx(lambda0 / 10) and step[4].item() == pytest.approx(lambda0)
    assert torch.allclose(step, torch.where(AB > 0.5, lambda0, lambda0 / 10).double())
    # spot values by hand
    assert lw("power")[2].item() == pytest.approx(lambda0 * 0.3 ** k)
    assert lw("cosine")[3].item() == pytest.approx(lambda0 * 0.5)


def test_seed_claims_on_the_real_linear_schedule():
    sched = make_schedule("linear", 1000, beta_start=1e-4, beta_end=0.02)
    ab = sched.alphas_cumprod
    # ᾱ at t = T/2 is about 0.079, not 0.5 (t = 500 in the public 1-based indexing: index 499)
    assert ab[499].item() == pytest.approx(0.079, abs=1e-3)
    assert ab[500].item() == pytest.approx(0.079, abs=2e-3)
    # λ(T) = 0.01·ᾱ_T² ≈ 1.6e-11, not 1e-4
    lam_T = lambda_weight("power", ab[-1:], lambda0=0.01, k=2.0).item()
    assert lam_T == pytest.approx(1.6e-11, rel=0.05)
    assert lam_T < 1e-10
    # cosine falls with noise (as intended), cosine_seed rises (the seed's inverted formula)
    cos, seed = lambda_weight("cosine", ab), lambda_weight("cosine_seed", ab)
    assert bool((cos[1:] <= cos[:-1]).all()) and bool((seed[1:] >= seed[:-1]).all())
    assert cos[0] > 0.99 * 0.01 and seed[0] < 1e-8


def test_learnable_mean_is_lambda0_positive_and_trains():
    ab = make_schedule("linear", 1000).alphas_cumprod
    net = LearnableLambda(ab, lambda0=0.01, hidden=8)
    tab = net.table()
    assert torch.allclose(tab, torch.full_like(tab, 0.01))          # starts at λ0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    tab = net.table()
    assert tab.std() > 1e-4 and bool((tab > 0).all())
    assert tab.mean().item() == pytest.approx(0.01, rel=1e-5)
    t = torch.tensor([0, 10, 999])
    lam = lambda_weight("learnable", ab[t].float(), t=t, net=net)
    assert torch.allclose(lam, tab[t])
    lam.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of"):
        lambda_weight("linear_seed", AB)
    with pytest.raises(ValueError, match="k must be >= 0"):
        lambda_weight("power", AB, k=-1.0)
    with pytest.raises(ValueError, match="needs net"):
        lambda_weight("learnable", AB)
    with pytest.raises(TypeError, match="alphabar"):
        lambda_weight("fixed", torch.tensor([1, 2]))
    assert set(LAMBDA_SCHEDULES) == {"fixed", "power", "cosine", "cosine_seed", "step", "learnable"}
