"""tadiff loss: per-sample λ(t) weighting against MONAI, the seed's batch-mean option, the
public noise weight map, input checks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.experiments.tadiff import (TaDiffConfig, TaDiffLoss, build_inputs, lambda_weight,
                                         noise_weight_map)
from dualdiff.models.tadiff import TaDiffModelConfig, TaDiffNet

B, S, M, H = 5, 4, 3, 12


class FixedOutput(nn.Module):
    """Returns a fixed [B, 7, H, W] output (a parameter), whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = nn.Parameter(out.clone())
        self.calls = []

    def forward(self, x, t, days, treatments, target):
        self.calls.append((x, t, target))
        return self.out


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(B, S, M, H, H, generator=g),
            "label": (torch.rand(B, S, H, H, generator=g) > 0.7).float(),
            "days": torch.arange(S).float().repeat(B, 1) * 50,
            "treatments": torch.randint(0, 3, (B, S), generator=g).float()}


def _cfg(**kw):
    cfg = TaDiffConfig.tiny()
    cfg.noise_weight_map = False
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _monai_dice(logits, label):
    from monai.losses import DiceLoss
    return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5,
                    reduction="none")(logits, label).reshape(B, S)


def _hand(cfg, out, batch, seed):
    """Loss terms by hand from the same draws (target, t, noise)."""
    loss_fn = TaDiffLoss(cfg)
    torch.manual_seed(seed)
    target, t, noise = loss_fn.draw(B, torch.device("cpu"), (M, H, H))
    ab = loss_fn.schedule.alphas_cumprod[t].float()
    lam = lambda_weight(cfg.schedule, ab, lambda0=cfg.lambda0, k=cfg.k)
    a = torch.ones(B, S)
    a[torch.arange(B), target] = ab.sqrt()
    dice = _monai_dice(out[:, :S].detach(), batch["label"])
    noise_term = ((out[:, S:].detach() - noise) ** 2).mean()
    return noise_term, dice, lam, a, target, t


@pytest.mark.parametrize("schedule", ["power", "cosine", "step"])
def test_per_sample_weighting_matches_monai_times_hand_weights(require, schedule):
    require("monai")
    cfg = _cfg(schedule=schedule, lambda0=0.3, p_random_target=0.5, lambda_sessions="all")
    out = torch.randn(B, M + S, H, H)
    batch = _batch()
    model = FixedOutput(out)
    torch.manual_seed(7)
    loss, metrics = TaDiffLoss(cfg)(model, batch)
    noise_term, dice, lam, a, target, t = _hand(cfg, out, batch, 7)
    expected = noise_term + (lam[:, None] * a * dice).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["dice_loss"].item() == pytest.approx(dice.mean().item(), rel=1e-5)
    # the per-sample form is not the batch-mean form (λ differs across samples here)
    assert lam.std() > 0
    seedform = noise_term + (a * dice).mean() * lam.mean()
    assert abs(expected - seedform) > 1e-4
    # the model saw the noised target in the target slot
    x_in, t_seen, tgt_seen = model.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(tgt_seen, target)
    # gradient flows into the mask logits and the noise prediction
    loss.backward()
    assert model.out.grad[:, :S].abs().sum() > 0 and model.out.grad[:, S:].abs().sum() > 0


def test_seed_batch_mean_option_reproduces_mean_dice_times_mean_lambda(require):
    require("monai")
    cfg = _cfg(schedule="power", lambda0=0.5, lambda_combine="seed_batch_mean", lambda_sessions="all")
    out = torch.randn(B, M + S, H, H)
    batch = _batch(1)
    torch.manual_seed(3)
    loss, _ = TaDiffLoss(cfg)(FixedOutput(out), batch)
    noise_term, dice, lam, a, _, _ = _hand(cfg, out, batch, 3)
    assert loss.item() == pytest.approx((noise_term + (a * dice).mean() * lam.mean()).item(), rel=1e-5)


def test_noise_weight_map_is_the_public_map():
    lab = torch.zeros(1, S, 15, 15)
    lab[0, :2, 7, 7] = 1.0                           # s = 2 at the centre
    w = noise_weight_map(lab)
    c = 2 * torch.exp(torch.tensor(-2.0)).item()
    assert w.shape == (1, 1, 15, 15)
    assert w[0, 0, 7, 7].item() == pytest.approx(1 + 0.1 * c)
    assert w[0, 0, 2, 12].item() == pytest.approx(1 + 0.1 * c)   # 5 px away: inside the 11x11 box
    assert w[0, 0, 1, 7].item() == 1.0                           # 6 px away: outside
    ref = 1 + F.conv2d(lab.sum(1, keepdim=True) * torch.exp(-lab.sum(1, keepdim=True)),
                       torch.ones(1, 1, 11, 11) / 10, padding="same")
    assert torch.allclose(w, ref)
    # with the map on, the noise term is the weighted mean
    cfg = _cfg()
    cfg.noise_weight_map = True
    out = torch.randn(B, M + S, H, H)
    batch = _batch(2)
    torch.manual_seed(0)
    _, m = TaDiffLoss(cfg)(FixedOutput(out), batch)
    torch.manual_seed(0)
    _, _, noise = TaDiffLoss(cfg).draw(B, torch.device("cpu"), (M, H, H))
    expect = (noise_weight_map(batch["label"]) * (out[:, S:] - noise) ** 2).mean()
    assert m["noise_loss"].item() == pytest.approx(expect.item(), rel=1e-5)


def test_build_inputs_replaces_only_the_target_slot():
    img = torch.randn(2, S, M, 4, 4)
    xt = torch.randn(2, M, 4, 4)
    x = build_inputs(img, xt, torch.tensor([1, -1])).reshape(2, S, M, 4, 4)
    assert torch.equal(x[0, 1], xt[0]) and torch.equal(x[1, 3], xt[1])
    assert torch.equal(x[0, [0, 2, 3]], img[0, [0, 2, 3]]) and torch.equal(x[1, :3], img[1, :3])


def test_bad_channel_counts_are_clear_errors():
    cfg = _cfg()
    batch = _batch()
    bad = dict(batch, image=batch["image"][:, :, :2])
    with pytest.raises(ValueError, match=r"batch\['image'\].*3 modalities"):
        TaDiffLoss(cfg)(FixedOutput(torch.zeros(B, 7, H, H)), bad)
    bad = dict(batch, label=batch["label"][:, :3])
    with pytest.raises(ValueError, match=r"batch\['label'\]"):
        TaDiffLoss(cfg)(FixedOutput(torch.zeros(B, 7, H, H)), bad)
    net = TaDiffNet(TaDiffModelConfig(image_size=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                                      attention_ds=[], num_heads=1, norm_groups=4))
    args = (torch.zeros(2), torch.zeros(2, S), torch.zeros(2, S), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \[B, 12, H, W\]"):
        net(torch.zeros(2, 9, 16, 16), *args)
    with pytest.raises(ValueError, match="days must be"):
        net(torch.zeros(2, 12, 16, 16), args[0], torch.zeros(2, 3), *args[2:])
    assert net(torch.zeros(2, 12, 16, 16), *args).shape == (2, 7, 16, 16)


def test_default_model_has_the_public_size():
    from dualdiff.models.tadiff import count_parameters
    with torch.device("meta"):
        net = TaDiffNet(TaDiffModelConfig.default())
    assert 5.3e6 < count_parameters(net) < 5.7e6
    assert net.config.in_channels == 12 and net.config.out_channels == 7
