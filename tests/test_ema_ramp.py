"""EMA: ema-pytorch's update_after_step and decay ramp as options (issue 20), against
hand-computed decays, and exact checkpoint/resume with the ramp on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dualdiff.config import ConfigError
from dualdiff.train import EMA, TrainConfig, Trainer


def _scalar_model():
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    return m


# ema-pytorch counts calls from 0 (c = t - 1 for training step t), acts when c % every == 0,
# copies while c <= update_after_step, then averages with
# d(s) = min(beta, max(min_value, 1 - (1 + s / inv_gamma) ** -power)), s = c - update_after_step.
# With power=1, inv_gamma=1: d(s) = s / (s + 1): 1/2, 2/3, 3/4, 4/5, ...
@pytest.mark.parametrize("kw, expected", [
    (dict(decay=0.9, update_after_step=2, power=1.0),
     ["copy", "copy", "copy", 1 / 2, 2 / 3, 3 / 4, 4 / 5, 5 / 6, 6 / 7, 7 / 8, 8 / 9, 0.9, 0.9]),
    (dict(decay=0.75, update_after_step=0, power=1.0, min_decay=0.6),
     ["copy", 0.6, 2 / 3, 0.75, 0.75]),
    (dict(decay=0.9, update_after_step=2, power=1.0, update_every=2),
     ["copy", "skip", "copy", "skip", 2 / 3, "skip", 4 / 5, "skip", 6 / 7]),
    (dict(decay=0.9, update_after_step=1, power=0.5, inv_gamma=3.0),  # 1 - (1 + s/3)^-1/2
     ["copy", "copy", 1 - (3 / 4) ** 0.5, 1 - (3 / 5) ** 0.5, 1 - (3 / 6) ** 0.5]),
    # dualdiff's own schedule (the default): copy while t <= warmup, act when t % every == 0,
    # constant decay unless power is set (then s = t - warmup)
    (dict(decay=0.9, warmup_steps=2), ["copy", "copy", 0.9, 0.9]),
    (dict(decay=0.9, warmup_steps=1, update_every=2, power=1.0),
     ["copy", 1 / 2, "skip", 3 / 4, "skip", 5 / 6]),
])
def test_decay_sequence_matches_hand_computed(kw, expected):
    decay = kw.pop("decay")
    ema = EMA(_scalar_model(), decay, **kw)
    got = []
    for t in range(1, len(expected) + 1):
        action, d = ema.plan(t)
        got.append(d if action == "average" else action)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, str):
            assert g == e
        else:
            assert g == pytest.approx(e, rel=1e-12, abs=0)


def test_update_applies_the_planned_decay_to_the_weights():
    model = _scalar_model()
    ema = EMA(model, 0.9, update_after_step=2, power=1.0)
    expected = 0.0
    for t in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(t))  # the "trained" weights after step t
        ema.update(model, t)
        # by hand: copy for t <= 3 (c <= 2), then ema <- d*ema + (1-d)*t with d = s/(s+1)
        if t <= 3:
            expected = float(t)
        else:
            s = t - 3
            d = s / (s + 1)
            expected = d * expected + (1 - d) * t
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-6), t
    assert ema.num_updates == 5


def test_ramp_is_off_by_default_and_config_keys_validate():
    cfg = TrainConfig(ema_decay=0.99)
    assert cfg.ema_update_after_step is None and cfg.ema_power is None
    ema = EMA(_scalar_model(), 0.99)
    assert [ema.plan(t) for t in (1, 2, 100)] == [("average", 0.99)] * 3
    for bad in (dict(ema_update_after_step=-1), dict(ema_power=0.0), dict(ema_inv_gamma=0.0),
                dict(ema_min_decay=1.5), dict(ema_update_after_step=3, ema_warmup=2)):
        with pytest.raises(ConfigError, match="ema_"):
            TrainConfig(ema_decay=0.99, **bad)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 1))


def _mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _cfg(out, **kw):
    base = dict(steps=8, batch_size=8, lr=1e-2, out_dir=str(out), progress=False,
                checkpoint_every=4, ema_decay=0.999, ema_update_after_step=2, ema_power=2 / 3,
                ema_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_ramp_checkpoints_and_resumes_bitwise(tmp_path):
    straight = Trainer(_mlp(), _mse, _data(), _cfg(tmp_path / "a"))
    straight.fit()
    first = Trainer(_mlp(), _mse, _data(), _cfg(tmp_path / "b"))
    first.fit(until=4)
    resumed = Trainer(_mlp(), _mse, _data(), _cfg(tmp_path / "b", resume="auto"))
    assert resumed.step == 4
    resumed.fit()
    for a, b in zip(straight.ema.model.state_dict().values(),
                    resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    ckpt = torch.load(tmp_path / "b/checkpoints/step_00000008.pt", weights_only=True)
    assert ckpt["ema"]["power"] == pytest.approx(2 / 3) and ckpt["ema"]["update_after_step"] == 2
    # the ramp matters: a constant 0.999 decay gives other EMA weights
    const = Trainer(_mlp(), _mse, _data(), _cfg(tmp_path / "c", ema_power=None))
    const.fit()
    assert not torch.equal(const.ema.model[0].weight, straight.ema.model[0].weight)
