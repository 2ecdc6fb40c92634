"""Tests of dualdiff.ops.weighted_dice_loss: every backend vs the reference, MONAI, compile, bad input."""
import warnings

import pytest
import torch

from dualdiff._backend import BackendUnavailableError, backend_status
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
from dualdiff.testing import assert_close_lowp, forced_backend

SHAPES = [(1, 1, 7, 5), (2, 3, 5, 7), (3, 4, 9, 13), (2, 2, 3, 5, 4), (1, 3, 33, 65)]
CPU_BACKENDS = ["torch", "cpp", "triton"]


def _usable(backend, device="cpu"):
    ok, why = backend_status(backend, device)
    if not ok:
        pytest.skip(why)


def _inputs(shape, *, dtype=torch.float32, tdtype=torch.float32, device="cpu", weight=True):
    x = (2.0 * torch.randn(shape, device=device)).to(dtype).requires_grad_(True)
    g = torch.rand(shape, device=device) > 0.5
    if tdtype == torch.float32:
        g = g.float() * torch.rand(shape, device=device).clamp_min(0.5)  # soft labels too
    else:
        g = g.to(tdtype)
    w = torch.rand(shape[0], device=device) + 0.1 if weight else None
    return x, g, w


def _check(backend, shape, *, device="cpu", dtype=torch.float32, tdtype=torch.float32, weight=True, **kw):
    x, g, w = _inputs(shape, dtype=dtype, tdtype=tdtype, device=device, weight=weight)
    if kw.get("activation") == "softmax" and shape[1] == 1:
        return
    loss = weighted_dice_loss(x, g, w, backend=backend, **kw)
    go = torch.randn_like(loss)
    (gx,) = torch.autograd.grad(loss, x, go)
    xr = x.detach().float().requires_grad_(True)
    ref = weighted_dice_loss_reference(xr, g, w, **kw)
    (gr,) = torch.autograd.grad(ref, xr, go)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert gx.dtype == x.dtype and gx.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-7)
    else:
        xl = x.detach().clone().requires_grad_(True)
        naive = weighted_dice_loss_reference(xl, g, None if w is None else w.to(dtype), upcast=False, **kw)
        (gn,) = torch.autograd.grad(naive, xl, go.to(naive.dtype))
        assert_close_lowp(loss, ref, naive, name="loss", atol=1e-4)
        assert_close_lowp(gx, gr, gn, name="grad", atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_matches_reference_fp32(backend, shape, activation):
    _usable(backend)
    for reduction in ("mean", "sum", "none"):
        _check(backend, shape, activation=activation, reduction=reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_flags(backend, activation, squared_pred, include_background):
    _usable(backend)
    for reduction in ("mean", "none"):
        for weight in (True, False):
            _check(backend, (2, 3, 6, 11), activation=activation, squared_pred=squared_pred,
                   include_background=include_background, reduction=reduction, weight=weight,
                   smooth_nr=0.0 if weight else 1e-5, smooth_dr=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_low_precision(backend, dtype, activation):
    _usable(backend)
    _check(backend, (2, 3, 9, 13), dtype=dtype, activation=activation)
    _check(backend, (2, 2, 4, 5, 6), dtype=dtype, activation=activation, reduction="none")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16])
def test_target_dtypes(backend, tdtype):
    _usable(backend)
    _check(backend, (2, 3, 5, 7), tdtype=tdtype, activation="softmax")
    _check(backend, (2, 3, 5, 7), tdtype=tdtype, activation="sigmoid", squared_pred=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_large_spatial_many_chunks(backend):
    """Several spatial chunks per row (partials combined in the second stage), odd size."""
    _usable(backend)
    for act in ("sigmoid", "softmax"):
        _check(backend, (2, 3, 61, 77), activation=act)
        _check(backend, (1, 2, 11, 13, 37), activation=act, reduction="none")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_poisoned_outputs_are_overwritten(backend, monkeypatch):
    """Outputs allocated with torch.empty are NaN-filled first: an unwritten element would show."""
    _usable(backend)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    for act in ("sigmoid", "softmax"):
        for red in ("mean", "none"):
            _check(backend, (2, 3, 7, 9), activation=act, reduction=red, include_background=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("squared_pred", [False, True])
def test_matches_monai(backend, activation, squared_pred):
    monai = pytest.importorskip("monai.losses")
    _usable(backend)
    for shape in [(2, 3, 8, 9), (2, 4, 4, 5, 6)]:
        for include_background in (True, False):
            for reduction in ("mean", "sum", "none"):
                x = torch.randn(shape)
                if activation == "none":
                    x = torch.rand(shape)
                g = (torch.rand(shape) > 0.6).float()
                m = monai.DiceLoss(sigmoid=activation == "sigmoid", softmax=activation == "softmax",
                                   include_background=include_background, squared_pred=squared_pred,
                                   reduction=reduction)(x, g)
                ours = weighted_dice_loss(x, g, activation=activation, include_background=include_background,
                                          squared_pred=squared_pred, reduction=reduction, backend=backend)
                torch.testing.assert_close(ours, m.reshape(ours.shape), rtol=1e-5, atol=1e-6)


def test_single_channel_include_background_ignored_like_monai():
    monai = pytest.importorskip("monai.losses")
    x, g = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        m = monai.DiceLoss(sigmoid=True, include_background=False)(x, g)
    with pytest.warns(UserWarning, match="include_background"):
        ours = weighted_dice_loss(x, g, include_background=False)
    torch.testing.assert_close(ours, m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_gradient(backend):
    _usable(backend)
    x, g, _ = _inputs((3, 2, 5, 6))
    for reduction in ("mean", "sum", "none"):
        w = (torch.rand(3) + 0.5).requires_grad_(True)
        loss = weighted_dice_loss(x, g, w, reduction=reduction, backend=backend)
        go = torch.randn_like(loss)
        gx, gw = torch.autograd.grad(loss, (x, w), go)
        w2 = w.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        ref = weighted_dice_loss_reference(xr, g, w2, reduction=reduction)
        gxr, gwr = torch.autograd.grad(ref, (xr, w2), go)
        torch.testing.assert_close(gw, gwr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-7)


def test_weight_is_per_sample():
    """Scaling one sample's weight scales exactly that sample's dice term."""
    x, g, _ = _inputs((3, 2, 5, 6))
    per = weighted_dice_loss(x, g, reduction="none").detach()
    w = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="none").detach(), per * w[:, None])
    torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="sum").detach(), (per * w[:, None]).sum())


def test_non_contiguous_input_works():
    x, g, w = _inputs((2, 3, 6, 8))
    xt = x.detach().transpose(2, 3).requires_grad_(True)
    gt = g.transpose(2, 3)
    loss = weighted_dice_loss(xt, gt, w, backend="cpp")
    (gx,) = torch.autograd.grad(loss, xt)
    xr = xt.detach().clone().requires_grad_(True)
    ref = weighted_dice_loss_reference(xr, gt, w)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, gr)


def test_deterministic_cpp():
    x, g, w = _inputs((2, 3, 70, 70))
    a = weighted_dice_loss(x, g, w, backend="cpp", activation="softmax", reduction="none")
    b = weighted_dice_loss(x, g, w, backend="cpp", activation="softmax", reduction="none")
    assert torch.equal(a, b)


def test_env_backend_forcing():
    x, g, w = _inputs((2, 3, 5, 7))
    ref = weighted_dice_loss_reference(x, g, w)
    with forced_backend("torch"):
        torch.testing.assert_close(weighted_dice_loss(x, g, w), ref)
    with forced_backend("cuda"):
        with pytest.raises(BackendUnavailableError):
            weighted_dice_loss(x, g, w)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_compile_fullgraph_aot_eager(backend):
    _usable(backend)
    torch._dynamo.reset()
    x, g, w = _inputs((2, 3, 6, 7))

    def f(x, g, w):
        return weighted_dice_loss(x, g, w, activation="softmax", backend=backend) * 2.0

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(x, g, w)
    (gx,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_(True)
    ref = 2.0 * weighted_dice_loss_reference(xr, g, w, activation="softmax")
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-7)


def test_compile_inductor_cpp():
    torch._dynamo.reset()
    x, g, w = _inputs((2, 3, 6, 7))
    cf = torch.compile(lambda x, g, w: weighted_dice_loss(x, g, w, backend="cpp", reduction="none").sum(),
                       fullgraph=True)
    out = cf(x, g, w)
    (gx,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_(True)
    ref = weighted_dice_loss_reference(xr, g, w, reduction="none").sum()
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-7)


def test_opcheck():
    from dualdiff.ops import weighted_dice as mod

    x = torch.randn(2, 3, 20, requires_grad=True)
    g = (torch.rand(2, 3, 20) > 0.5).float()
    w = torch.rand(2)
    torch.library.opcheck(mod._weighted_dice_op, (x, g, w, "cpp", "softmax", 1, False, 1e-5, 1e-5, "mean"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    x, g, w = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5), torch.rand(2)
    cases = [
        (dict(input=x[:, :, :3]), ValueError, "target"),            # shape mismatch
        (dict(input=x.long()), TypeError, "input"),                  # non-floating input
        (dict(target=g.double()), TypeError, "target"),             # bad target dtype
        (dict(weight=torch.rand(3)), ValueError, "weight"),         # wrong length
        (dict(weight=torch.rand(2, 1)), ValueError, "weight"),      # wrong rank
        (dict(weight=torch.ones(2, dtype=torch.long)), TypeError, "weight"),
        (dict(input=torch.randn(0, 3, 4, 5), target=torch.rand(0, 3, 4, 5)), ValueError, "input"),  # empty
        (dict(input=torch.randn(2, 3), target=torch.rand(2, 3)), ValueError, "input"),  # no spatial dims
        (dict(activation="relu"), ValueError, "activation"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(smooth_dr=-1.0), ValueError, "smooth_dr"),
        (dict(smooth_nr=float("nan")), ValueError, "smooth_nr"),
        (dict(input=torch.randn(2, 1, 4, 5), target=torch.rand(2, 1, 4, 5), activation="softmax"),
         ValueError, "softmax"),
        (dict(input="x"), TypeError, "input"),
    ]
    for over, exc, word in cases:
        args = dict(input=x, target=g, weight=w)
        args.update(over)
        kw = {k: args.pop(k) for k in list(args) if k not in ("input", "target", "weight")}
        with pytest.raises(exc, match=word):
            weighted_dice_loss(args["input"], args["target"], args["weight"], **kw)


def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    x, g = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    with pytest.raises(ValueError, match="target"):
        weighted_dice_loss(x, g.cuda())
    with pytest.raises(ValueError, match="weight"):
        weighted_dice_loss(x, g, torch.rand(2, device="cuda"))


# ---------------------------------------------------------------- CUDA (device machine)
GPU_SHAPES = [(1, 1, 7, 5), (2, 3, 33, 65), (3, 4, 129, 67), (2, 5, 9, 17, 13), (4, 2, 256, 256)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_cuda_matches_reference(backend, shape, activation):
    _usable(backend, "cuda")
    for reduction in ("mean", "none"):
        for sq in (False, True):
            _check(backend, shape, device="cuda", activation=activation, reduction=reduction, squared_pred=sq,
                   include_background=sq)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.bool, torch.uint8, torch.bfloat16])
def test_cuda_low_precision_and_targets(backend, dtype, tdtype):
    _usable(backend, "cuda")
    for act in ("sigmoid", "softmax"):
        _check(backend, (3, 4, 65, 67), device="cuda", dtype=dtype, tdtype=tdtype, activation=act)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_poisoned_and_many_channels(backend, monkeypatch):
    _usable(backend, "cuda")
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    for C in (2, 7, 19, 32):
        _check(backend, (2, C, 37, 41), device="cuda", activation="softmax", reduction="none",
               include_background=False)
        _check(backend, (2, C, 37, 41), device="cuda", activation="sigmoid")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_compile(backend):
    _usable(backend, "cuda")
    torch._dynamo.reset()
    x, g, w = _inputs((2, 3, 16, 16), device="cuda")
    cf = torch.compile(lambda x, g, w: weighted_dice_loss(x, g, w, backend=backend), fullgraph=True)
    out = cf(x, g, w)
    (gx,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_(True)
    ref = weighted_dice_loss_reference(xr, g, w)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-7)


_ISA_CHECK = """
import torch
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
torch.manual_seed(0)
for channels in (2, 3, 5, 8, 9):
    x = torch.randn(2, channels, 19, 23, requires_grad=True)
    g = torch.randint(0, 2, x.shape).bool()
    w = torch.rand(2)
    for act in ("softmax", "sigmoid"):
        loss = weighted_dice_loss(x, g, w, activation=act, backend="cpp")
        (gx,) = torch.autograd.grad(loss, x)
        x_ref = x.detach().requires_grad_()
        ref = weighted_dice_loss_reference(x_ref, g, w, activation=act)
        (gref,) = torch.autograd.grad(ref, x_ref)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
def test_cpp_channel_variants_on_every_isa_path(tmp_path, isa):
    """The cpp kernels have fixed-C softmax kernels for C = 2..8 and a generic one above, built
    for AVX-512 / AVX2 / baseline and chosen once per process (DUALDIFF_CPU_ISA caps the choice),
    so each ISA path runs in a fresh process (cwd outside the checkout: the installed package)."""
    import os
    import subprocess
    import sys

    _usable("cpp")
    env = dict(os.environ)
    env.pop("DUALDIFF_CPU_ISA", None)
    if isa != "native":
        env["DUALDIFF_CPU_ISA"] = isa
    proc = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
