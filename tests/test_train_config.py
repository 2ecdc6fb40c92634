"""dualdiff.train: TrainConfig checks (absolute min_lr, no silent override, validate never
mutates), the optimizer it builds, and loss functions that take the step."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dualdiff.config import ConfigError
from dualdiff.train import TrainConfig, Trainer, build_optimizer


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(index, g):
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(1, keepdim=True)


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _cfg(tmp_path, **kw):
    base = dict(steps=6, batch_size=8, lr=1e-2, out_dir=str(tmp_path), progress=False,
                save_final=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw, match", [
    (dict(min_lr=-1e-5), r"min_lr must be in \[0, lr=0.001\]"),
    (dict(min_lr=2e-3), r"min_lr must be in \[0, lr=0.001\], got 0.002"),
    (dict(optimizer_kwargs={"lr": 1e-2}), r"optimizer_kwargs\.lr conflicts with lr"),
    (dict(optimizer_kwargs={"weight_decay": 0.1}),
     r"optimizer_kwargs\.weight_decay conflicts with weight_decay"),
    (dict(scheduler="onecycle", scheduler_kwargs={"max_lr": 1.0}),
     r"scheduler_kwargs\.max_lr conflicts with lr"),
    (dict(scheduler="onecycle", scheduler_kwargs={"total_steps": 9}),
     r"scheduler_kwargs\.total_steps conflicts with steps"),
    (dict(steps=0), r"steps must be > 0"),
    (dict(warmup_steps=-1), r"warmup_steps must be >= 0"),
])
def test_bad_config_is_a_config_error_naming_the_keys(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(lr=1e-3, **kw)


def test_validate_and_trainer_never_mutate_the_config(tmp_path):
    cfg = _cfg(tmp_path, optimizer_kwargs={"betas": [0.9, 0.99]}, weight_decay=0.01,
               scheduler="cosine", scheduler_kwargs={}, min_lr=1e-4)
    snapshot = copy.deepcopy(dataclasses.asdict(cfg))
    cfg.validate()
    tr = Trainer(_mlp(), mse, _batch, cfg)
    tr.fit()
    assert dataclasses.asdict(cfg) == snapshot
    assert tr.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert tr.optimizer.param_groups[0]["weight_decay"] == 0.01


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_lr_decays_to_absolute_min_lr(tmp_path, kind):
    tr = Trainer(_mlp(), mse, _batch, _cfg(tmp_path, steps=10, lr=0.2, min_lr=0.03,
                                           scheduler=kind, warmup_steps=2))
    tr.fit()
    lrs = [r["lr"] for r in tr.history]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.2])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0.03
    assert tr.lr == pytest.approx(0.03, rel=1e-12)  # after the last step: exactly min_lr


def test_adam_is_fused_unless_told_otherwise():
    params = [nn.Parameter(torch.zeros(3))]
    assert build_optimizer(params, TrainConfig(optimizer="adamw")).defaults["fused"] is True
    off = build_optimizer(params, TrainConfig(optimizer="adam", optimizer_kwargs={"fused": False}))
    assert not off.defaults["fused"]
    fe = build_optimizer(params, TrainConfig(optimizer="adam", optimizer_kwargs={"foreach": True}))
    assert not fe.defaults["fused"] and fe.defaults["foreach"]
    sgd = build_optimizer(params, TrainConfig(optimizer="sgd"))
    assert not sgd.defaults["fused"]


class _StepLoss:
    def __init__(self):
        self.steps = []

    def __call__(self, model, batch, step):
        self.steps.append(step)
        return mse(model, batch)


def test_loss_fn_gets_the_step_when_it_takes_three_arguments(tmp_path):
    loss = _StepLoss()
    cfg = _cfg(tmp_path, steps=4, grad_accum=2, checkpoint_every=2, keep_last=0)
    tr = Trainer(_mlp(), loss, _batch, cfg)
    tr.fit(until=3)
    assert loss.steps == [0, 0, 1, 1, 2, 2]  # steps completed before each micro-batch's step
    resumed_loss = _StepLoss()
    resumed = Trainer(_mlp(), resumed_loss, _batch, dataclasses.replace(cfg, resume="latest"))
    assert resumed.step == 2
    resumed.fit()
    assert resumed_loss.steps == [2, 2, 3, 3]

    seen = []

    def varargs_loss(model, batch, *rest):
        seen.append(rest)
        return mse(model, batch)

    tr.loss_fn = varargs_loss  # re-inspected when replaced
    tr.train_step()
    assert seen == [(3,), (3,)]


def test_two_argument_loss_fn_and_step_scheduled_loss_train_alike(tmp_path):
    """A loss that ignores its step trains exactly like the two-argument one; one that
    anneals a weight with the step sees it change."""
    two = Trainer(_mlp(), mse, _batch, _cfg(tmp_path / "a"))
    two.fit()
    three = Trainer(_mlp(), lambda m, b, step: mse(m, b), _batch, _cfg(tmp_path / "b"))
    three.fit()
    assert [r["loss"] for r in two.history] == [r["loss"] for r in three.history]

    def annealed(model, batch, step):
        beta = min(1.0, step / 3)
        return mse(model, batch) * beta + 1e-3, {"beta": beta}

    tr = Trainer(_mlp(), annealed, _batch, _cfg(tmp_path / "c"))
    tr.fit()
    assert [r["beta"] for r in tr.history] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])
