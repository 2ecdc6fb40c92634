"""dualdiff.patch: a MONAI-using training step gives the same loss and gradients patched and
unpatched; unpatching restores MONAI's class everywhere it was replaced."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import dualdiff.patch as ddpatch
from dualdiff.compat import DiceLoss as FusedDice


def _script_module(monai) -> types.ModuleType:
    """A small 'user script' that imported DiceLoss by name before any patching, like TaDiff-Net."""
    mod = types.ModuleType("user_train_script")
    mod.DiceLoss = monai.losses.DiceLoss
    sys.modules[mod.__name__] = mod
    return mod


def _train_step(make_loss, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    x = torch.randn(4, 1, 12, 12)
    y = (torch.rand(4, 3, 12, 12) > 0.6).float()
    loss_fn = make_loss()
    loss = loss_fn(net(x), y).mean()  # reduction="none" as in TaDiff-Net, then a mean
    loss.backward()
    return loss_fn, loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.fixture
def clean_patch():
    yield
    ddpatch.unpatch()
    sys.modules.pop("user_train_script", None)


def test_patched_step_matches_unpatched(require, clean_patch):
    monai = require("monai")
    script = _script_module(monai)
    original = monai.losses.DiceLoss

    def make():
        return script.DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, reduction="none")

    fn0, loss0, grads0 = _train_step(make)
    assert type(fn0) is original
    assert ddpatch.patch_monai_dice() is original
    assert ddpatch.is_patched()
    fn1, loss1, grads1 = _train_step(make)
    assert type(fn1) is FusedDice and fn1.fallback_reason is None
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    for obj in (monai.losses, sys.modules["monai.losses.dice"], script):
        assert obj.DiceLoss is FusedDice
    assert monai.losses.Dice is FusedDice and sys.modules["monai.losses.dice"].Dice is FusedDice
    # MONAI's own composite losses build the fused Dice while patched
    assert type(monai.losses.DiceCELoss(sigmoid=True).dice) is FusedDice
    ddpatch.unpatch()
    assert not ddpatch.is_patched()
    for obj in (monai.losses, sys.modules["monai.losses.dice"], script):
        assert obj.DiceLoss is original
    assert monai.losses.Dice is original and sys.modules["monai.losses.dice"].Dice is original
    fn2, loss2, grads2 = _train_step(make)
    assert type(fn2) is original
    torch.testing.assert_close(loss2, loss0, rtol=0, atol=0)


def test_context_manager_and_idempotence(require, clean_patch):
    monai = require("monai")
    original = monai.losses.DiceLoss
    with ddpatch.monai_dice_patched() as orig:
        assert orig is original and monai.losses.DiceLoss is FusedDice
        with ddpatch.monai_dice_patched():  # nested: the outer patch stays
            assert monai.losses.DiceLoss is FusedDice
        assert monai.losses.DiceLoss is FusedDice
        ddpatch.patch_monai_dice()  # twice: a no-op
    assert monai.losses.DiceLoss is original and sys.modules["monai.losses.dice"].DiceLoss is original
    with pytest.raises(RuntimeError):
        with ddpatch.monai_dice_patched():
            raise RuntimeError("boom")
    assert monai.losses.DiceLoss is original


def test_scan_modules_off_leaves_other_modules(require, clean_patch):
    monai = require("monai")
    script = _script_module(monai)
    ddpatch.patch_monai_dice(scan_modules=False)
    assert monai.losses.DiceLoss is FusedDice and script.DiceLoss is not FusedDice
