"""ldm training through the shared Trainer: the loss against dualdiff.diffusion (and diffusers),
a tiny run lowers the loss, non-finite outputs trip the guard, resume is exact."""
import dataclasses

import pytest
import torch
from torch import nn

from dualdiff.data.latent_cache import LatentCache
from dualdiff.diffusion import loss_weight, make_schedule, predict_v, q_sample, training_target
from dualdiff.experiments.ldm import LDMConfig, LDMLoss, build_trainer, load_ldm
from dualdiff.models.cond_unet import ClassDistUNet, CondUNetConfig
from dualdiff.train import NonFiniteLossError

MICRO_MODEL = CondUNetConfig(dim=8, dim_mults=[1, 2], channels=4, num_classes=5, groups=2, attn_heads=1,
                             attn_dim_head=4)


def _cfg(**kw) -> LDMConfig:
    cfg = LDMConfig.from_name("tiny")
    cfg = dataclasses.replace(cfg, model=MICRO_MODEL, **kw)
    cfg.train = dataclasses.replace(cfg.train, steps=6, batch_size=8, log_every=1, checkpoint_every=3,
                                    ema_every=2, lr=2e-3)
    return cfg


def _cache(n=64) -> LatentCache:
    """Latents whose pattern depends on the class distribution (something to learn)."""
    g = torch.Generator().manual_seed(0)
    d = torch.softmax(torch.randn(n, 5, generator=g) * 2, 1)
    base = torch.randn(5, 4, 4, 4, generator=g)
    z = torch.einsum("nk,kchw->nchw", d, base) * 2 + 0.05 * torch.randn(n, 4, 4, 4, generator=g)
    has = torch.ones(n, dtype=torch.bool)
    has[::8] = False
    return LatentCache(z, d, has, 1.0 / float(z.std()))


class _Zero(nn.Module):
    """Predicts zeros (with a parameter so the loss has a graph); records its inputs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, dist, null):
        self.seen = (x, t, dist, null)
        return x * self.w


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("weighting", ["none", "p2", "min_snr"])
def test_loss_uses_the_shared_targets_and_weights(objective, weighting):
    cfg = _cfg(objective=objective, loss_weighting=weighting)
    loss_fn, model = LDMLoss(cfg), _Zero()
    z0, d, has = torch.randn(5, 4, 4, 4), torch.rand(5, 5), torch.tensor([True, True, False, True, True])
    torch.manual_seed(3)
    loss, parts = loss_fn(model, (z0, d, has), 0)
    torch.manual_seed(3)  # the same draws, by hand
    sched = make_schedule(cfg.beta_schedule, cfg.timesteps)
    t = torch.randint(0, cfg.timesteps, (5,))
    noise = torch.randn_like(z0)
    null = ~has | (torch.rand(5) < cfg.cond_drop_prob)
    torch.testing.assert_close(model.seen[0], q_sample(z0, t, noise, sched))
    assert torch.equal(model.seen[1], t) and torch.equal(model.seen[3], null) and model.seen[3][2]
    target = training_target(objective, z0, t, noise, sched)
    w = loss_weight(t, sched, objective, weighting, p2_gamma=cfg.p2_gamma, p2_k=cfg.p2_k,
                    min_snr_gamma=cfg.min_snr_gamma)
    torch.testing.assert_close(loss, (target.pow(2).flatten(1).mean(1) * w).mean())
    torch.testing.assert_close(parts["mse"], target.pow(2).flatten(1).mean(1).mean())


def test_targets_coincide_with_diffusers(require):
    diffusers = require("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched = make_schedule("linear", 1000)
    z0, noise, t = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(q_sample(z0, t, noise, sched), ref.add_noise(z0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(training_target("pred_v", z0, t, noise, sched), ref.get_velocity(z0, noise, t),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict_v(z0, t, noise, sched), ref.get_velocity(z0, noise, t), rtol=1e-5, atol=1e-5)


def test_tiny_run_lowers_the_loss(tmp_path):
    cfg = _cfg(objective="pred_x0", loss_weighting="none")
    cfg.train = dataclasses.replace(cfg.train, steps=120, batch_size=16, checkpoint_every=0, lr=3e-3)
    tr = build_trainer(cfg, tmp_path, cache=_cache())
    tr.fit()
    tr.close()
    losses = [r["loss"] for r in tr.history]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    assert all("lr" in r for r in tr.history) and tr.history[0]["lr"] < max(r["lr"] for r in tr.history)  # OneCycle


class _NaN(ClassDistUNet):
    def forward(self, x, t, dist, null_mask=None):
        return super().forward(x, t, dist, null_mask) * float("nan")


def test_nonfinite_outputs_trip_the_guard_instead_of_being_zeroed(tmp_path):
    cfg = _cfg()
    cfg.train = dataclasses.replace(cfg.train, steps=10, max_consecutive_nonfinite=3, checkpoint_every=0)
    model = _NaN(MICRO_MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = build_trainer(cfg, tmp_path, cache=_cache(), model=model)
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 consecutive steps"):
        tr.fit()
    tr.close()
    assert tr.nonfinite_total == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped, not trained on zeros


def test_resume_is_exact(tmp_path):
    cfg = _cfg()
    full = build_trainer(cfg, tmp_path / "a", cache=_cache())
    full.fit()
    full.close()
    part = build_trainer(cfg, tmp_path / "b", cache=_cache())
    part.fit(until=3)
    part.close()
    resumed = build_trainer(cfg, tmp_path / "b", cache=_cache(), resume="auto")
    assert resumed.step == 3
    resumed.fit()
    resumed.close()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full.ema_model.state_dict().values(), resumed.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    model, cfg2 = load_ldm(tmp_path / "b")  # weights_only load of the EMA weights and the config
    assert cfg2.model == cfg.model
    for a, b in zip(model.state_dict().values(), full.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_tiny_preset_ema_forgets_the_initial_weights(tmp_path):
    """The EMA that samples after the tiny run holds (almost) none of the random initial weights
    or of the first tenth of the run; the old schedule (0.99 every 10 steps from step 0) kept
    about 55 % of the initial weights. Shares computed by running the EMA, not written down."""
    from dualdiff.experiments.ldm import LUCIDRAINS_EMA, ema_step_shares

    cfg = LDMConfig.from_name("tiny")
    t = cfg.train
    assert (t.ema_decay, t.ema_every, t.ema_inv_gamma, t.ema_power) == (0.995, 10, 1.0, 2 / 3)
    assert t.ema_update_after_step == t.steps // 10 and t.ema_warmup == 0
    assert LDMConfig().train.ema_update_after_step == LUCIDRAINS_EMA["ema_update_after_step"] == 100
    shares = ema_step_shares(t)
    assert shares.shape == (t.steps + 1,) and abs(float(shares.sum()) - 1) < 1e-9
    assert float(shares[0]) < 0.01
    assert float(shares[: t.steps // 10 + 1].sum()) < 0.01
    old = ema_step_shares(dataclasses.replace(t, ema_decay=0.99, ema_update_after_step=None, ema_power=None))
    assert float(old[0]) > 0.5  # the defect the new schedule fixes
    # the Trainer's EMA is built from the same keys: one-hot weights through its own EMA object
    tr = build_trainer(_cfg(), tmp_path, cache=_cache())
    tr.close()
    e = tr.ema
    assert (e.update_after_step, e.power, e.decay, e.update_every) == (
        t.ema_update_after_step, t.ema_power, t.ema_decay, 2)


def test_default_loss_is_the_plain_v_mse():
    """The default is pred_v with the seed's weighting (p2 γ = 0): the unweighted v-MSE, i.e.
    (1 + snr)·x0-MSE, not the x0-MSE the former γ = 1 gave (pred_noise diverges: LDMConfig)."""
    from dualdiff.diffusion.objectives import x0_loss_weight

    cfg = LDMConfig()
    assert (cfg.objective, cfg.loss_weighting, cfg.p2_gamma, cfg.cond_scale) == ("pred_v", "p2", 0.0, 6.0)
    small = _cfg(objective=cfg.objective, loss_weighting=cfg.loss_weighting, p2_gamma=cfg.p2_gamma)
    model, z0 = _Zero(), torch.randn(6, 4, 4, 4)
    torch.manual_seed(1)
    loss, parts = LDMLoss(small)(model, (z0, torch.rand(6, 5), torch.ones(6, dtype=torch.bool)), 0)
    torch.testing.assert_close(loss, parts["mse"])  # weight 1 on the v error
    sched = make_schedule(small.beta_schedule, small.timesteps)
    snr = sched.snr[torch.tensor([10, 500, 990])]
    lam = x0_loss_weight(snr, cfg.objective, cfg.loss_weighting, p2_gamma=cfg.p2_gamma, p2_k=cfg.p2_k)
    torch.testing.assert_close(lam, 1 + snr.double())
