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


def test_learnable_starts_at_lambda0_and_bins_timesteps():
    net = LearnableLambda(1000, lambda0=0.01, bins=4)
    assert torch.allclose(net.table(), torch.full((1000,), 0.01))
    t = torch.tensor([0, 249, 250, 499, 500, 999])
    assert net.bin(t).tolist() == [0, 0, 1, 1, 2, 3]
    with torch.no_grad():
        net.log_var.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    lam = lambda_weight("learnable", torch.rand(6), t=t, net=net)
    assert torch.allclose(lam, 0.01 * torch.exp(-torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 2.0])))
    assert torch.allclose(net.regulariser(t), 0.01 * torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 2.0]))


@pytest.mark.parametrize("lambda0", [1.0, 0.01])
def test_learnable_converges_to_log_of_a_constant_dice_loss(lambda0):
    """Kendall's optimum: minimising λ0·(exp(-s)·D + s) over s gives s = log D, per bin."""
    D = torch.tensor([0.05, 0.3, 0.9, 2.0])                      # a constant Dice loss per bin
    net = LearnableLambda(100, lambda0=lambda0, bins=4)
    t = torch.arange(100)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        loss = (net(t) * D[net.bin(t)] + net.regulariser(t)).mean()
        loss.backward()
        opt.step()
    assert torch.allclose(net.log_var.detach(), D.log(), atol=2e-3)
    assert torch.allclose(net.table()[[0, 25, 50, 99]], lambda0 / D, rtol=5e-3)


def _hand_dice(logits, label):
    """Soft Dice loss per (b, c), sigmoid, squared_pred, smooth_nr 0, smooth_dr 1e-5, by hand."""
    p = torch.sigmoid(logits.double())
    y = label.double()
    inter = (p * y).sum((-1, -2))
    return 1 - 2 * inter / ((p * p).sum((-1, -2)) + (y * y).sum((-1, -2)) + 1e-5)


class _Fixed(torch.nn.Module):
    def __init__(self, out, lam=None):
        super().__init__()
        self.out, self.lam = torch.nn.Parameter(out), lam

    def forward(self, *args):
        return self.out


def _tiny_loss(sessions, schedule="power", combine="per_sample", lam_net=None):
    """The loss of a 2-sample batch with fixed draws: targets (3, 1), t (0, 500), zero noise
    and ε̂ = 0 (noise term 0), λ0 = 0.5, k = 2."""
    from dualdiff.experiments.tadiff import TaDiffConfig, TaDiffLoss
    cfg = TaDiffConfig.tiny()
    cfg.noise_weight_map, cfg.schedule, cfg.lambda0, cfg.k = False, schedule, 0.5, 2.0
    cfg.lambda_sessions, cfg.lambda_combine = sessions, combine
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 4, 3, 4, 4, generator=g),
             "label": (torch.rand(2, 4, 4, 4, generator=g) > 0.5).float(),
             "days": torch.zeros(2, 4), "treatments": torch.zeros(2, 4)}
    out = torch.zeros(2, 7, 4, 4)
    out[:, :4] = torch.randn(2, 4, 4, 4, generator=g)
    loss_fn = TaDiffLoss(cfg)
    target, t = torch.tensor([3, 1]), torch.tensor([0, 500])
    loss_fn.draw = lambda B, device, shape: (target, t, torch.zeros(B, *shape))
    loss, m = loss_fn(_Fixed(out, lam_net), batch)
    return loss, m, _hand_dice(out[:, :4], batch["label"]), loss_fn.schedule.alphas_cumprod[t].double()


def test_lambda_sessions_target_and_all_by_hand():
    l0 = 0.5
    tgt, _, D, ab = _tiny_loss("target")
    al, _, D2, _ = _tiny_loss("all")
    assert torch.equal(D, D2)
    lam = l0 * ab ** 2
    # target: λ(t)·√ᾱ on the target session (sample 0: session 3, sample 1: session 1), λ0 elsewhere
    w_target = torch.tensor([[l0, l0, l0, lam[0] * ab[0].sqrt()],
                             [l0, lam[1] * ab[1].sqrt(), l0, l0]], dtype=torch.float64)
    # all (the seed's): λ(t) on every session, √ᾱ on the target
    w_all = torch.stack([lam[0].repeat(4), lam[1].repeat(4)])
    w_all[0, 3] *= ab[0].sqrt()
    w_all[1, 1] *= ab[1].sqrt()
    assert tgt.item() == pytest.approx((w_target * D).mean().item(), rel=1e-5)
    assert al.item() == pytest.approx((w_all * D).mean().item(), rel=1e-5)
    assert abs(tgt.item() - al.item()) > 0.05                  # ᾱ_500 ≈ 0.078: the options differ
    # the seed's batch-mean form with "all": mean_{b,c}(a·D)·mean_b λ
    sb, _, _, _ = _tiny_loss("all", combine="seed_batch_mean")
    a = torch.ones(2, 4, dtype=torch.float64)
    a[0, 3], a[1, 1] = ab[0].sqrt(), ab[1].sqrt()
    assert sb.item() == pytest.approx(((a * D).mean() * lam.mean()).item(), rel=1e-5)


@pytest.mark.parametrize("sessions", ["target", "all"])
def test_learnable_loss_by_hand(sessions):
    l0 = 0.5
    net = LearnableLambda(1000, lambda0=l0, bins=2)
    with torch.no_grad():
        net.log_var.copy_(torch.tensor([0.3, -0.7]))
    loss, m, D, ab = _tiny_loss(sessions, schedule="learnable", lam_net=net)
    s = torch.tensor([0.3, -0.7], dtype=torch.float64)              # t = 0 -> bin 0, t = 500 -> bin 1
    lam = l0 * torch.exp(-s)
    w = torch.stack([lam[0].repeat(4), lam[1].repeat(4)])
    if sessions == "target":
        w = torch.full((2, 4), l0, dtype=torch.float64)
        w[0, 3], w[1, 1] = lam[0], lam[1]
    w[0, 3] *= ab[0].sqrt()
    w[1, 1] *= ab[1].sqrt()
    n_lam = 1 if sessions == "target" else 4
    expected = (w * D).mean() + (l0 * s).mean() * n_lam / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert net.log_var.grad is not None and bool((net.log_var.grad != 0).all())


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
