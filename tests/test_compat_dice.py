"""dualdiff.compat.DiceLoss against monai.losses.DiceLoss: MONAI's own DiceLoss test table
(Project-MONAI/MONAI tests/losses/test_dice_loss.py, its parameter values and published results
re-expressed here as data) on every CPU backend (torch, cpp, triton under TRITON_INTERPRET=1),
random cases with gradients, errors, warnings and the fallback reasons."""
from __future__ import annotations

import warnings

import pytest
import torch

import dualdiff.compat.monai as compat_monai
from dualdiff._backend import backend_status
from dualdiff.compat import DiceLoss, FallbackWarning
from dualdiff.testing import forced_backend

CPU_BACKENDS = ["torch", "cpp", "triton"]
T = torch.tensor

# logits / targets reused by MONAI's table
X4 = [[[[1.0, -1.0], [-1.0, 1.0]]]]
X4B = [[[[1.0, -1.0], [-1.0, 1.0]]], [[[1.0, -1.0], [-1.0, 1.0]]]]
X4Z = [[[[1.0, -0.0], [-1.0, 1.0]]], [[[1.0, -1.0], [-1.0, 1.0]]]]
G4B = [[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [1.0, 0.0]]]]
P4S = [[[[0.3, 0.4], [0.7, 0.9]]], [[[1.0, 0.1], [0.5, 0.3]]]]
X3 = [[[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
L3 = [[[1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]]]


def _log_softmax(x):
    return torch.log_softmax(x, dim=1)


# (name, kwargs, input, target, MONAI's published value, runs the fused op)
MONAI_CASES = [
    ("sigmoid_1e-6", dict(include_background=True, sigmoid=True, smooth_nr=1e-6, smooth_dr=1e-6),
     X4, [[[[1.0, 0.0], [1.0, 1.0]]]], 0.307576, True),
    ("sigmoid_b2", dict(include_background=True, sigmoid=True, smooth_nr=1e-4, smooth_dr=1e-4), X4B, G4B, 0.416657, True),
    ("soft_label", dict(include_background=True, smooth_nr=1e-4, smooth_dr=1e-4, soft_label=True), P4S, P4S, 0.0, False),
    ("hard_label_formula", dict(include_background=True, smooth_nr=1e-4, smooth_dr=1e-4, soft_label=False),
     P4S, P4S, 0.307773, True),
    ("onehot_nobg_smooth0", dict(include_background=False, to_onehot_y=True, smooth_nr=0, smooth_dr=0),
     [[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], [[[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]],
     0.0, True),
    ("onehot_sigmoid", dict(include_background=True, to_onehot_y=True, sigmoid=True, smooth_nr=1e-4, smooth_dr=1e-4),
     X3, L3, 0.435050, True),
    ("onehot_sigmoid_none", dict(include_background=True, to_onehot_y=True, sigmoid=True, reduction="none",
                                 smooth_nr=1e-4, smooth_dr=1e-4),
     X3, L3, [[[0.296529], [0.415136]], [[0.599976], [0.428559]]], True),
    ("onehot_softmax", dict(include_background=True, to_onehot_y=True, softmax=True, smooth_nr=1e-4, smooth_dr=1e-4),
     X3, L3, 0.383713, True),
    ("onehot_softmax_sum", dict(include_background=True, to_onehot_y=True, softmax=True, reduction="sum",
                                smooth_nr=1e-4, smooth_dr=1e-4), X3, L3, 1.534853, True),
    ("squared_pred", dict(include_background=True, sigmoid=True, squared_pred=True),
     X4, [[[[1.0, 0.0], [1.0, 1.0]]]], 0.178337, True),
    ("jaccard", dict(include_background=True, sigmoid=True, jaccard=True), X4, [[[[1.0, 0.0], [1.0, 1.0]]]], 0.470451, False),
    ("tanh", dict(include_background=True, other_act=torch.tanh, smooth_nr=1e-4, smooth_dr=1e-4), X4B, G4B, 0.999963, True),
    ("log_softmax", dict(include_background=True, to_onehot_y=True, other_act=_log_softmax, smooth_nr=1e-4,
                         smooth_dr=1e-4), X3, L3, -8.522593, True),
    ("tanh_batch", dict(include_background=True, other_act=torch.tanh, smooth_nr=1e-4, smooth_dr=1e-4, batch=True),
     X4Z, G4B, 0.774718, True),
    ("tanh_batch_nr0", dict(include_background=True, other_act=torch.tanh, smooth_nr=0, smooth_dr=1e-4, batch=True),
     X4Z, G4B, 0.774733, True),
    ("tanh_nobatch_nr0", dict(include_background=True, other_act=torch.tanh, smooth_nr=0, smooth_dr=1e-4, batch=False),
     X4Z, G4B, 0.840058, True),
    ("log_softmax_weight", dict(include_background=True, to_onehot_y=True, other_act=_log_softmax, smooth_nr=1e-4,
                                smooth_dr=1e-4, weight=(0, 1)), X3, L3, -8.268515, True),
]


def _usable(backend):
    ok, why = backend_status(backend, "cpu")
    if not ok:
        pytest.skip(why)


class _Spy:
    """Counts calls of the fused op made by dualdiff.compat.monai."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = compat_monai.weighted_dice_loss

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(compat_monai, "weighted_dice_loss", spy)


def _loss_and_grad(loss_fn, x, t):
    x = x.clone().requires_grad_(True)
    out = loss_fn(x, t)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", MONAI_CASES, ids=[c[0] for c in MONAI_CASES])
def test_monai_table(require, monkeypatch, backend, case):
    monai = require("monai")
    _usable(backend)
    _name, kwargs, x, t, expected, fused = case
    x, t = T(x), T(t)
    spy = _Spy(monkeypatch)
    with forced_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        ours, g_ours = _loss_and_grad(DiceLoss(**kwargs), x, t)
    theirs, g_theirs = _loss_and_grad(monai.losses.DiceLoss(**kwargs), x, t)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, T(expected), rtol=1e-5, atol=1e-6)  # MONAI's published value
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)
    assert (spy.calls > 0) == fused
    assert (DiceLoss(**kwargs).fallback_reason is None) == fused


RANDOM_CASES = [
    dict(sigmoid=True),
    dict(softmax=True, to_onehot_y=True, include_background=False, reduction="none"),
    dict(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, reduction="none"),  # TaDiff-Net's loss
    dict(softmax=True, to_onehot_y=True, weight=[0.5, 1.0, 2.0], reduction="sum"),
    dict(softmax=True, to_onehot_y=True, include_background=False, weight=[1.0, 3.0], batch=True, reduction="none"),
    dict(sigmoid=True, batch=True, squared_pred=True, soft_label=True),
    dict(softmax=True, to_onehot_y=True, ignore_index=1),
    dict(softmax=True, to_onehot_y=True, ignore_index=7, reduction="none"),
    dict(sigmoid=True, weight=2.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kwargs", RANDOM_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items())[:60])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 3, 3, 4, 5)])
def test_random_vs_monai(require, backend, kwargs, shape):
    monai = require("monai")
    _usable(backend)
    x = 2.0 * torch.randn(shape)
    if kwargs.get("to_onehot_y"):
        t = torch.randint(0, shape[1] - (0 if "ignore_index" not in kwargs else 0), (shape[0], 1, *shape[2:])).float()
    else:
        t = (torch.rand(shape) > 0.5).float() * (torch.rand(shape) if kwargs.get("soft_label") else 1.0)
    with forced_backend(backend):
        ours, g_ours = _loss_and_grad(DiceLoss(**kwargs), x, t)
    theirs, g_theirs = _loss_and_grad(monai.losses.DiceLoss(**kwargs), x, t)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-7)


def test_low_precision_dtype_and_accuracy(require):
    """fp16 logits: MONAI's output dtype (input x target promotion), and the fused fp32
    accumulation is at least as close to the fp32 result as MONAI in fp16."""
    monai = require("monai")
    x = torch.randn(2, 3, 16, 16)
    t = torch.randint(0, 3, (2, 1, 16, 16))
    for kwargs in (dict(softmax=True, to_onehot_y=True), dict(sigmoid=True)):
        tt = t.float() if kwargs.get("to_onehot_y") else (torch.rand(x.shape) > 0.5).half()
        exact = monai.losses.DiceLoss(**kwargs)(x, tt.float())
        theirs = monai.losses.DiceLoss(**kwargs)(x.half(), tt)
        ours = DiceLoss(**kwargs)(x.half(), tt)
        assert ours.dtype == theirs.dtype
        assert (ours.float() - exact).abs() <= (theirs.float() - exact).abs() + 1e-3


def test_target_requiring_grad_falls_back(require):
    monai = require("monai")
    x = torch.randn(2, 2, 4, 4)
    t = torch.rand(2, 2, 4, 4, requires_grad=True)
    ours = DiceLoss(sigmoid=True)
    with pytest.warns(FallbackWarning, match="target requires grad"):
        (g_ours,) = torch.autograd.grad(ours(x, t), t)
    (g_theirs,) = torch.autograd.grad(monai.losses.DiceLoss(sigmoid=True)(x, t), t)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(jaccard=True), "jaccard"),
    (dict(soft_label=True), "soft_label"),
])
def test_static_fallback_reason(kwargs, match):
    from dualdiff.compat._fallback import reset_notices

    reset_notices()
    with pytest.warns(FallbackWarning, match=match):
        loss = DiceLoss(**kwargs)
    assert match in loss.fallback_reason
    assert DiceLoss(sigmoid=True).fallback_reason is None
    assert "other_act" in DiceLoss(other_act=torch.tanh).unfused_parts[0]


def test_float64_falls_back_and_matches(require):
    monai = require("monai")
    x, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), (torch.rand(2, 3, 4, 4) > 0.5).double()
    with pytest.warns(FallbackWarning, match="float64"):
        ours = DiceLoss(sigmoid=True, reduction="none")(x, t)
    theirs = monai.losses.DiceLoss(sigmoid=True, reduction="none")(x, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs)


def test_state_dict_interchange(require):
    monai = require("monai")
    theirs = monai.losses.DiceLoss(weight=[1.0, 2.0, 3.0])
    ours = DiceLoss(weight=[0.0, 0.0, 0.0])
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.class_weight, theirs.class_weight)
    assert set(ours.state_dict()) == set(theirs.state_dict())


# ---- errors and warnings (MONAI's test_ill_shape / test_ill_opts / test_input_warnings) -------
def test_ill_shape():
    with pytest.raises(AssertionError):
        DiceLoss()(torch.ones((1, 2, 3)), torch.ones((4, 5, 6)))
    with pytest.raises(AssertionError, match="different shape"):
        DiceLoss(sigmoid=True)(torch.ones((2, 3, 4, 4)), torch.ones((2, 2, 4, 4)))


def test_ill_opts():
    with pytest.raises(ValueError, match="Incompatible"):
        DiceLoss(sigmoid=True, softmax=True)
    with pytest.raises(TypeError, match="other_act"):
        DiceLoss(other_act="tanh")
    x = torch.ones((1, 1, 3))
    for reduction in ("unknown", None):
        with pytest.raises(ValueError):
            DiceLoss(reduction=reduction)(x, x)


def test_weight_errors():
    x, t = torch.randn(2, 3, 4), torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="number of classes"):
        DiceLoss(weight=[1.0, 2.0])(x, t)
    with pytest.raises(ValueError, match="no less than 0"):
        DiceLoss(weight=[1.0, -2.0, 1.0])(x, t)
    with pytest.raises(ValueError, match="number of classes"):  # without background: C - 1 weights
        DiceLoss(include_background=False, weight=[1.0, 2.0, 3.0])(x, t)


@pytest.mark.parametrize("kwargs, match", [
    (dict(include_background=False), "include_background=False"),
    (dict(softmax=True), "softmax=True"),
    (dict(to_onehot_y=True), "to_onehot_y=True"),
])
def test_single_channel_warnings(require, kwargs, match):
    monai = require("monai")
    x, t = torch.ones((1, 1, 3)), torch.ones((1, 1, 3))
    with pytest.warns(UserWarning, match=match):
        ours = DiceLoss(**kwargs)(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = monai.losses.DiceLoss(**kwargs)(x, t)
    torch.testing.assert_close(ours, theirs)


def test_reduction_enum(require):
    monai = require("monai")
    from monai.utils import LossReduction

    x, t = torch.randn(2, 2, 5), (torch.rand(2, 2, 5) > 0.5).float()
    ours = DiceLoss(sigmoid=True, reduction=LossReduction.SUM)
    assert ours.reduction == "sum"
    torch.testing.assert_close(ours(x, t), monai.losses.DiceLoss(sigmoid=True, reduction="sum")(x, t))


def test_forced_unusable_backend_is_an_error():
    from dualdiff._backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError):
        DiceLoss(sigmoid=True, backend="cuda")(torch.randn(1, 2, 4), torch.ones(1, 2, 4))
