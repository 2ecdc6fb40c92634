"""Tests of dualdiff.ops.weighted_dice_loss: every backend vs the reference, MONAI, compile, bad
input, launch geometry and device placement. Weights: ``"b"`` is a [B] weight, ``"bc"`` [B, C]."""
import warnings

import pytest
import torch

from dualdiff._backend import BackendUnavailableError
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
from dualdiff.testing import assert_close_lowp, forced_backend
from tests.conftest import require, require_backend

SHAPES = [(1, 1, 7, 5), (2, 3, 5, 7), (3, 4, 9, 13), (2, 2, 3, 5, 4), (1, 3, 33, 65)]
CPU_BACKENDS = ["torch", "cpp", "triton"]


def _usable(backend, device="cpu"):
    """Fails, not skips, a backend that is built but broken or that this machine must have
    (tests/conftest.py: require_backend)."""
    require_backend(backend, device)


def _inputs(shape, *, dtype=torch.float32, tdtype=torch.float32, device="cpu", weight="b"):
    """weight: "b" ([B]), "bc" ([B, C]) or None."""
    x = (2.0 * torch.randn(shape, device=device)).to(dtype).requires_grad_(True)
    g = torch.rand(shape, device=device) > 0.5
    if tdtype == torch.float32:
        g = g.float() * torch.rand(shape, device=device).clamp_min(0.5)  # soft labels too
    else:
        g = g.to(tdtype)
    w = None if weight is None else torch.rand(shape[: len(weight)], device=device) + 0.1
    return x, g, w


def _assert_fp32_close(actual, ref32, ref64, *, rtol, atol, name):
    """An fp32 result against the float64 reference, elementwise within atol + rtol |ref|, plus
    twice the plain fp32 reference's own error: raw logits with activation "none" can make
    P + G nearly cancel, and then fp32 summation order alone moves the ratio by more than rtol."""
    err = (actual.double() - ref64).abs()
    allowed = atol + rtol * ref64.abs() + 2.0 * (ref32.double() - ref64).abs()
    assert torch.isfinite(actual).all() and bool((err <= allowed).all()), (
        f"{name}: max error {err.max().item():.3e}, worst excess {(err - allowed).max().item():.3e}")


def _check(backend, shape, *, device="cpu", dtype=torch.float32, tdtype=torch.float32, weight="b", **kw):
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
        x64 = x.detach().double().requires_grad_(True)
        ref64 = weighted_dice_loss_reference(x64, g.double(), None if w is None else w.double(), upcast=False, **kw)
        (gr64,) = torch.autograd.grad(ref64, x64, go.double())
        _assert_fp32_close(loss, ref, ref64, rtol=2e-5, atol=2e-6, name="loss")
        _assert_fp32_close(gx, gr, gr64, rtol=1e-4, atol=1e-7, name="grad")
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
    for reduction, weight in (("mean", "b"), ("sum", "bc"), ("none", "b"), ("none", "bc")):
        _check(backend, shape, activation=activation, reduction=reduction, weight=weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("squared_pred", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
def test_flags(backend, activation, squared_pred, include_background):
    _usable(backend)
    for reduction in ("mean", "none"):
        for weight in ("b", "bc", None):
            _check(backend, (2, 3, 6, 11), activation=activation, squared_pred=squared_pred,
                   include_background=include_background, reduction=reduction, weight=weight,
                   smooth_nr=0.0 if weight else 1e-5, smooth_dr=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_low_precision(backend, dtype, activation):
    _usable(backend)
    _check(backend, (2, 3, 9, 13), dtype=dtype, activation=activation)
    _check(backend, (2, 3, 9, 13), dtype=dtype, activation=activation, weight="bc", include_background=False)
    _check(backend, (2, 2, 4, 5, 6), dtype=dtype, activation=activation, reduction="none", weight="bc")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16])
def test_target_dtypes(backend, tdtype):
    _usable(backend)
    _check(backend, (2, 3, 5, 7), tdtype=tdtype, activation="softmax")
    _check(backend, (2, 3, 5, 7), tdtype=tdtype, activation="sigmoid", squared_pred=True, weight="bc")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_large_spatial_many_chunks(backend):
    """Several spatial chunks per row (partials combined in the second stage), odd size."""
    _usable(backend)
    for act in ("sigmoid", "softmax"):
        _check(backend, (2, 3, 61, 77), activation=act)
        _check(backend, (1, 2, 11, 13, 37), activation=act, reduction="none", weight="bc")


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
            for weight in ("b", "bc"):
                _check(backend, (2, 3, 7, 9), activation=act, reduction=red, include_background=False,
                       weight=weight)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("squared_pred", [False, True])
def test_matches_monai(backend, activation, squared_pred, require):
    monai = require("monai.losses")
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


def test_single_channel_include_background_ignored_like_monai(require):
    monai = require("monai.losses")
    x, g = torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        m = monai.DiceLoss(sigmoid=True, include_background=False)(x, g)
    with pytest.warns(UserWarning, match="include_background"):
        ours = weighted_dice_loss(x, g, include_background=False)
    torch.testing.assert_close(ours, m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_gradient(backend):
    """dL/dweight (autograd of the reference) for both weight shapes, with and without background."""
    _usable(backend)
    x, g, _ = _inputs((3, 3, 5, 6))
    for wshape in ((3,), (3, 3)):
        for reduction, include_background in (("mean", True), ("sum", False), ("none", False)):
            w = (torch.rand(wshape) + 0.5).requires_grad_(True)
            kw = dict(reduction=reduction, include_background=include_background, activation="softmax")
            loss = weighted_dice_loss(x, g, w, backend=backend, **kw)
            go = torch.randn_like(loss)
            gx, gw = torch.autograd.grad(loss, (x, w), go)
            w2 = w.detach().clone().requires_grad_(True)
            xr = x.detach().clone().requires_grad_(True)
            ref = weighted_dice_loss_reference(xr, g, w2, **kw)
            gxr, gwr = torch.autograd.grad(ref, (xr, w2), go)
            torch.testing.assert_close(gw, gwr, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-7)
            if len(wshape) == 2 and not include_background:
                assert torch.all(gw[:, 0] == 0)  # the dropped background column


def test_weight_is_per_sample():
    """Scaling one sample's weight scales exactly that sample's dice term."""
    x, g, _ = _inputs((3, 2, 5, 6))
    per = weighted_dice_loss(x, g, reduction="none").detach()
    w = torch.tensor([0.0, 1.0, 3.0])
    torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="none").detach(), per * w[:, None])
    torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="sum").detach(), (per * w[:, None]).sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_per_channel_indexes_all_channels(backend):
    """A [B, C] weight scales dice[b, c] alone; without background its column 0 is unused."""
    _usable(backend)
    x, g, _ = _inputs((2, 3, 5, 6))
    w = torch.tensor([[5.0, 0.0, 2.0], [7.0, 1.0, 0.5]])
    for include_background in (True, False):
        kw = dict(activation="softmax", include_background=include_background, backend=backend)
        per = weighted_dice_loss(x, g, reduction="none", **kw).detach()
        c0 = 0 if include_background else 1
        expect = per * w[:, c0:]
        torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="none", **kw).detach(), expect)
        torch.testing.assert_close(weighted_dice_loss(x, g, w, reduction="mean", **kw).detach(), expect.mean())
    w_bg = w.clone()
    w_bg[:, 0] = 123.0  # changes nothing without background
    for w_ in (w, w_bg):
        torch.testing.assert_close(weighted_dice_loss(x, g, w_, include_background=False, backend=backend),
                                   weighted_dice_loss(x, g, w, include_background=False, backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_weights_match_monai_times_hand_weights(backend, activation, require):
    """MONAI DiceLoss(reduction="none") times the weights computed by hand, then reduced, equals
    the fused weighted loss, for [B] and [B, C] weights, with and without background."""
    monai = require("monai.losses")
    _usable(backend)
    shape = (3, 4, 7, 9)
    x, g = torch.randn(shape), (torch.rand(shape) > 0.6).float()
    for wshape in ((3,), (3, 4)):
        w = torch.rand(wshape) + 0.1
        for include_background in (True, False):
            m = monai.DiceLoss(sigmoid=activation == "sigmoid", softmax=activation == "softmax",
                               include_background=include_background, reduction="none")(x, g)
            per = m.reshape(m.shape[:2])  # [B, C', 1, 1] -> [B, C']
            c0 = 0 if include_background else 1
            hand = torch.stack([torch.stack([per[b, c - c0] * (w[b] if w.dim() == 1 else w[b, c])
                                             for c in range(c0, 4)]) for b in range(3)])
            for reduction, expect in (("none", hand), ("mean", hand.mean()), ("sum", hand.sum())):
                ours = weighted_dice_loss(x, g, w, activation=activation, include_background=include_background,
                                          reduction=reduction, backend=backend)
                torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-6)


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
    x, g, w = _inputs((2, 3, 6, 7), weight="bc")
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
    for w in (torch.rand(2), torch.rand(2, 3)):
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
        (dict(weight=torch.rand(2, 1)), ValueError, "weight"),      # [B, 1] is not [B, C]
        (dict(weight=torch.rand(2, 4)), ValueError, "weight"),      # [B, C + 1]
        (dict(weight=torch.rand(3, 3)), ValueError, "weight"),      # [B + 1, C]
        (dict(weight=torch.rand(2, 3, 1)), ValueError, "weight"),   # 3-D
        (dict(weight=torch.rand(2, 3, 4, 5)), ValueError, "weight"),  # input-shaped
        (dict(weight=torch.tensor(1.0)), ValueError, "weight"),     # scalar
        (dict(weight=torch.ones(2, dtype=torch.long)), TypeError, "weight"),
        (dict(weight=torch.ones(2, 3, dtype=torch.float64)), TypeError, "weight"),
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
    with pytest.raises(ValueError, match="weight"):
        weighted_dice_loss(x, g, torch.rand(2, 3, device="cuda"))


def test_triton_softmax_channel_limit():
    """Forced triton with softmax over more channels than its tile holds: a clear error."""
    from dualdiff.ops.weighted_dice import TRITON_SOFTMAX_MAX_C

    _usable("triton")
    C = TRITON_SOFTMAX_MAX_C + 1
    x, g = torch.randn(1, C, 2, 2), torch.rand(1, C, 2, 2)
    with pytest.raises(ValueError, match="input.*at most"):
        weighted_dice_loss(x, g, activation="softmax", backend="triton")


# ---------------------------------------------------------------- launch geometry (no GPU needed)
MAX_AXIS0, MAX_AXIS12 = 2**31 - 1, 65535  # CUDA grid limits: x, and y / z
# (B, C, S) up to B*C = 10^6 rows and S = 512³ pixels (and one S > 2^31); B*C*S passes 2^31 in three.
# The kernels' int64 offsets are checked on the compiled code in test_triton_compile.py.
EXTREME = [(1, 1, 1), (1, 2, 512**3), (1, 5, 256**3), (2, 32, 512**3), (8, 256, 512**3), (10**6, 1, 1),
           (1, 10**6, 3), (1000, 1000, 7), (70000, 2, 3), (65536, 1, 512), (4, 250000, 40), (1, 3, 2**31 + 5)]
SMS = [1, 4, 132, 1024]


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_triton_launch_plan_stays_within_grid_limits(activation):
    """Every axis within its limit; the forward chunks and the backward tiles cover S exactly
    once; capped axes are covered by the kernels' grid-stride loops (>= 1 program each)."""
    require("triton")
    from dualdiff.kernels.weighted_dice import ACT_SIGMOID, ACT_SOFTMAX, MAX_SOFTMAX_C, launch_plan

    act = ACT_SOFTMAX if activation == "softmax" else ACT_SIGMOID
    for B, C, S in EXTREME:
        if act == ACT_SOFTMAX and C > MAX_SOFTMAX_C:
            with pytest.raises(ValueError, match="at most"):
                launch_plan(B, C, S, act, 132)
            continue
        for sms in SMS:
            p = launch_plan(B, C, S, act, sms)
            assert p.groups * p.cp == B * C and p.cp == (C if act == ACT_SOFTMAX else 1)
            for axis0, axis1 in (p.fwd_grid, p.bwd_grid):
                assert 1 <= axis0 <= MAX_AXIS0 and 1 <= axis1 <= MAX_AXIS12, (B, C, S, sms, p)
            assert p.fwd_grid[0] == min(p.groups, MAX_AXIS0) and p.fwd_grid[1] == p.n_chunks
            assert p.bwd_grid == (min(p.bwd_tiles, MAX_AXIS0), min(p.groups, MAX_AXIS12))
            assert p.chunk % p.block == 0 and (p.n_chunks - 1) * p.chunk < S <= p.n_chunks * p.chunk
            assert (p.bwd_tiles - 1) * p.block < S <= p.bwd_tiles * p.block
            assert p.c_pad >= p.cp and p.block >= 16


def test_triton_grid_regressions():
    """The shapes of issue 10: B*C > 65 535 rows used to land on grid axis 1."""
    require("triton")
    from dualdiff.kernels.weighted_dice import ACT_SIGMOID, launch_plan

    p = launch_plan(1, 70000, 5, ACT_SIGMOID, 132)
    assert p.fwd_grid[0] == 70000 and p.bwd_grid[1] == MAX_AXIS12


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_cuda_grid_stays_within_limits(activation):
    """dualdiff._C.weighted_dice_cuda_grid is the C++ grid function the CUDA launchers call (built
    with or without CUDA), and cuda_chunks the Python chunking that feeds it."""
    _usable("cpp")  # the extension is built
    from dualdiff._backend import extension
    from dualdiff.ops.weighted_dice import CUDA_CHUNK_TILE, CUDA_SOFTMAX_MAX_C, cuda_chunks

    grid = extension().weighted_dice_cuda_grid
    for B, C, S in EXTREME:
        if activation == "softmax" and C > CUDA_SOFTMAX_MAX_C:
            continue
        cp = C if activation == "softmax" else 1
        groups = B * C // cp
        per_tile = 256 * (4 if cp == 1 else 2 if cp <= 4 else 1)  # threads x unroll of the channel bucket
        for sms in SMS:
            n_chunks, chunk = cuda_chunks(groups, S, sms)
            assert 1 <= n_chunks <= min(4 * sms, MAX_AXIS12) and chunk % CUDA_CHUNK_TILE == 0
            assert (n_chunks - 1) * chunk < S <= n_chunks * chunk
            fwd_x, fwd_y, bwd_x, bwd_y, tiles = grid(groups, S, cp, n_chunks)
            assert 1 <= fwd_x <= MAX_AXIS0 and 1 <= fwd_y <= MAX_AXIS12 and fwd_y == n_chunks
            assert 1 <= bwd_x <= MAX_AXIS0 and 1 <= bwd_y <= MAX_AXIS12, (B, C, S)
            assert fwd_x == min(groups, MAX_AXIS0) and bwd_y == min(groups, MAX_AXIS12)
            assert bwd_x == min(tiles, MAX_AXIS0) and (tiles - 1) * per_tile < S <= tiles * per_tile
    # issue 10: 256³ with 5 softmax classes needs 65 536 spatial tiles (the old gridDim.y)
    fwd_x, fwd_y, bwd_x, bwd_y, tiles = grid(1, 256**3, 5, 1)
    assert tiles == 65536 and bwd_x == 65536 and bwd_y == 1


def test_gpu_launches_run_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: every triton and cuda launch runs with cuda:1
    current, the cuda kernels get cuda:1's current stream, and cuda:0 is current again after.
    No GPU needed: torch.cuda.device / current_stream / get_device_properties and the kernels are
    stand-ins that record what they see; the tensors are fake tensors on cuda:1."""
    require("triton")
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    import dualdiff.kernels.weighted_dice as kernels
    from dualdiff.ops import weighted_dice as mod

    current = [torch.device("cuda", 0)]

    class DeviceGuard:  # torch.cuda.device
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()

    def current_stream(device=None):
        device = current[-1] if device is None else torch.device(device)
        return SimpleNamespace(cuda_stream=1000 + device.index)

    seen = []

    class Extension:
        def weighted_dice_fwd_cuda(self, *args):
            seen.append(("cuda fwd", current[-1], args[-1]))

        def weighted_dice_bwd_cuda(self, *args):
            seen.append(("cuda bwd", current[-1], args[-1]))

    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1].index)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(mod, "extension", lambda: Extension())
    monkeypatch.setattr(kernels, "weighted_dice_forward", lambda *a: seen.append(("triton fwd", current[-1], None)))
    monkeypatch.setattr(kernels, "weighted_dice_backward", lambda *a: seen.append(("triton bwd", current[-1], None)))
    cfg = ("sigmoid", 0, False, 1e-5, 1e-5, "mean")
    with warnings.catch_warnings(), FakeTensorMode():
        warnings.simplefilter("ignore")  # data_ptr() of a fake tensor
        x, g = torch.empty(2, 3, 10, device="cuda:1"), torch.empty(2, 3, 10, device="cuda:1")
        w = torch.empty(2, 3, device="cuda:1")
        for backend in ("cuda", "triton"):
            _, sums = mod._forward(backend, x, g, w, *cfg)
            mod._backward_input(backend, torch.empty((), device="cuda:1"), x, g, w, sums, *cfg)
    assert [s[0] for s in seen] == ["cuda fwd", "cuda bwd", "triton fwd", "triton bwd"]
    assert all(dev == torch.device("cuda", 1) for _, dev, _ in seen)
    assert [s[2] for s in seen[:2]] == [1001, 1001]  # cuda:1's current stream
    assert current == [torch.device("cuda", 0)]


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
                   include_background=sq, weight="bc" if sq == (reduction == "mean") else "b")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tdtype", [torch.float32, torch.bool, torch.uint8, torch.bfloat16])
def test_cuda_low_precision_and_targets(backend, dtype, tdtype):
    _usable(backend, "cuda")
    for act, weight in (("sigmoid", "b"), ("softmax", "bc")):
        _check(backend, (3, 4, 65, 67), device="cuda", dtype=dtype, tdtype=tdtype, activation=act, weight=weight)


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
               include_background=False, weight="bc")
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_shapes_past_the_old_grid_limits(backend):
    """A 256³ volume with 5 softmax classes (the old cuda backward put 65 536 spatial blocks on
    gridDim.y) and 70 000 rows (the old triton kernels put B*C rows on grid axis 1)."""
    _usable(backend, "cuda")
    cases = [((1, 5, 256, 256, 256), "softmax", "bc"), ((1, 70000, 5), "sigmoid", "bc"),
             ((70000, 2, 3), "softmax", "b")]
    for shape, act, wkind in cases:
        x, g, w = _inputs(shape, device="cuda", weight=wkind, tdtype=torch.bool)
        loss = weighted_dice_loss(x, g, w, activation=act, reduction="sum", backend=backend)
        (gx,) = torch.autograd.grad(loss, x)
        xr = x.detach().clone().requires_grad_(True)
        ref = weighted_dice_loss_reference(xr, g, w, activation=act, reduction="sum")
        (gr,) = torch.autograd.grad(ref, xr)
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
        scale = gr.abs().max().item()
        torch.testing.assert_close(gx, gr, rtol=1e-3, atol=1e-3 * scale)
        del x, g, w, gx, xr, gr
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_tensors_on_the_second_device(backend):
    """cuda:0 current, tensors on cuda:1 and a side stream current there: the launches follow
    the tensors (a launch on the wrong device fails or reads foreign memory)."""
    _usable(backend, "cuda")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    side = torch.cuda.Stream(device=dev)
    for act, wkind in (("sigmoid", "b"), ("softmax", "bc")):
        x, g, w = _inputs((2, 3, 33, 17), device=dev, weight=wkind)
        side.wait_stream(torch.cuda.current_stream(dev))  # the inputs were made on cuda:1's default stream
        with torch.cuda.stream(side):
            loss = weighted_dice_loss(x, g, w, activation=act, reduction="none", backend=backend)
            go = torch.randn_like(loss)
            (gx,) = torch.autograd.grad(loss, x, go)
        side.synchronize()
        assert torch.cuda.current_device() == 0 and loss.device == dev and gx.device == dev
        xr = x.detach().clone().requires_grad_(True)
        ref = weighted_dice_loss_reference(xr, g, w, activation=act, reduction="none")
        (gr,) = torch.autograd.grad(ref, xr, go)
        torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
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
