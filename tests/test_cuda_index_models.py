"""CPU twins of the CUDA kernels: their block / thread index arithmetic and fp32 reduction order
(Python models in tests/kernel_index_models.py, read off csrc/*.cu) at extreme shapes, and the
shared element math through the backends that compile the same headers (cpp; dualdiff._C's
timestep test entries). So the first GPU run has to check speed and races, not formulas.

Every coverage check is also run on a deliberately wrong variant of the model and must fail."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import kernel_index_models as M  # noqa: E402

from dualdiff._backend import backend_status, extension  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _need_ext():
    ok, why = backend_status("cpp", "cpu")
    if not ok:
        pytest.skip(why)
    return extension()


def _exactly_once(idx: np.ndarray, size: int, what: str) -> list[str]:
    """Errors (empty if none) unless the valid (>= 0) entries of idx hit each of [0, size) once."""
    idx = np.asarray(idx).reshape(-1)
    idx = idx[idx >= 0]
    errs = []
    if idx.size and idx.max() >= size:
        errs.append(f"{what}: index {int(idx.max())} >= {size}")
        idx = idx[idx < size]
    cnt = np.bincount(idx, minlength=size)
    if (cnt == 0).any():
        errs.append(f"{what}: {int((cnt == 0).sum())} never visited (first {int(np.argmax(cnt == 0))})")
    if (cnt > 1).any():
        errs.append(f"{what}: {int((cnt > 1).sum())} visited more than once")
    return errs


# =============================================================================== weighted_dice
EXTREME = [(1, 1, 1), (1, 2, 512**3), (1, 5, 256**3), (2, 32, 512**3), (10**6, 1, 1), (1, 10**6, 3),
           (1000, 1000, 7), (70000, 2, 3), (65536, 1, 512), (4, 250000, 40), (1, 3, 2**31 + 5)]


def test_dice_model_grid_is_the_compiled_grid():
    """The model's grid function equals dualdiff._C.weighted_dice_cuda_grid (the C++ function the
    launchers call) wherever the launcher would run."""
    grid = _need_ext().weighted_dice_cuda_grid
    for B, C, S in EXTREME:
        for softmax in (False, True):
            if softmax and C > 32:
                continue
            for sms in (1, 132, 1024):
                L = M.dice_launch(B, C, S, softmax, sms)
                assert grid(L.groups, S, L.cp, L.n_chunks) == (L.fwd_x, L.fwd_y, L.bwd_x, L.bwd_y, L.tiles)


def _dice_coverage_errors(L: M.DiceLaunch, bugs=frozenset()) -> list[str]:
    errs = []
    errs += _exactly_once(M.dice_fwd_groups(L, bugs), L.groups, "forward row groups")
    pix = np.concatenate([M.dice_fwd_pixels(L, by, bugs).reshape(-1) for by in range(L.fwd_y)])
    errs += _exactly_once(pix, L.S, "forward pixels")
    errs += _exactly_once(M.dice_bwd_groups(L, bugs), L.groups, "backward row groups")
    errs += _exactly_once(M.dice_bwd_pixels(L, M.dice_bwd_tiles(L, bugs), bugs), L.S, "backward pixels")
    for name, axis, cap in (("fwd_x", L.fwd_x, M.MAX_GRID_X), ("fwd_y", L.fwd_y, M.MAX_GRID_YZ),
                            ("bwd_x", L.bwd_x, M.MAX_GRID_X), ("bwd_y", L.bwd_y, M.MAX_GRID_YZ)):
        if not 1 <= axis <= cap:
            errs.append(f"{name} = {axis} outside [1, {cap}]")
    if M.dice_max_offset(L) != L.B * L.C * L.S - 1:
        errs.append("largest offset is not the last element")
    return errs


# (B, C, S, softmax, sms, grid caps or None): batch 1, S below / not a multiple of the tile,
# > 65 535 row groups (bwd gridDim.y capped: grid-stride), many chunks, every channel bucket, and
# small caps that force every grid-stride loop at small sizes.
DICE_COVERAGE = [
    (1, 1, 1, False, 132, None), (1, 2, 1025, True, 132, None), (1, 1, 5000, False, 1, None),
    (70000, 1, 3, False, 132, None), (70000, 2, 3, True, 132, None), (65536, 1, 512, False, 4, None),
    (1, 5, 2**20 + 7, True, 1, None), (1, 3, 2**19 + 1, False, 1024, None), (2, 32, 1031, True, 132, None),
    (3, 4, 4099, False, 132, (2, 3)), (2, 19, 3333, True, 1, (1, 1)), (5, 8, 777, True, 132, (2, 2)),
]


@pytest.mark.parametrize("B,C,S,softmax,sms,caps", DICE_COVERAGE)
def test_dice_every_element_exactly_once(B, C, S, softmax, sms, caps):
    kw = {} if caps is None else dict(max_x=caps[0], max_yz=caps[1])
    L = M.dice_launch(B, C, S, softmax, sms, **kw)
    assert _dice_coverage_errors(L) == []
    if L.groups > M.MAX_GRID_YZ:
        assert L.bwd_y == M.MAX_GRID_YZ  # the 65 535 cap is really hit: the stride loop matters


@pytest.mark.parametrize("bug,case", [
    ("no_group_stride", (70000, 1, 3, False, 132, None)),      # bwd gridDim.y = 65 535 < groups
    ("no_group_stride", (3, 4, 4099, False, 132, (2, 3))),
    ("no_tile_stride", (2, 19, 3333, True, 1, (1, 1))),
    ("hi_unclamped", (1, 1, 5000, False, 1, None)),             # S not a multiple of the chunk
    ("tile_no_unroll", (1, 1, 5000, False, 1, None)),
])
def test_dice_coverage_check_catches_wrong_variants(bug, case):
    B, C, S, softmax, sms, caps = case
    kw = {} if caps is None else dict(max_x=caps[0], max_yz=caps[1])
    assert _dice_coverage_errors(M.dice_launch(B, C, S, softmax, sms, **kw), frozenset({bug}))


@pytest.mark.parametrize("B,C,S,softmax", [(1, 3, 2**31 + 5, True), (1, 2, 2**31 - 1, False),
                                           (4, 250000, 40 * 2**10 + 3, False), (2, 32, 2**26 + 9, True)])
def test_dice_int64_offsets_at_the_edges(B, C, S, softmax):
    """Shapes whose offsets pass 2^31: the last forward chunk and the last backward tiles end
    exactly at S - 1, and the offsets there need the kernels' int64 (an int32 variant wraps)."""
    L = M.dice_launch(B, C, S, softmax, sms=1024)
    last = M.dice_fwd_pixels(L, L.n_chunks - 1).reshape(-1)
    lo, hi = M.dice_fwd_chunk_bounds(L, L.n_chunks - 1)
    assert hi == S and _exactly_once(last - lo, hi - lo, "last chunk") == []
    tiles = np.arange(max(L.tiles - 3, 0), L.tiles)
    pix = M.dice_bwd_pixels(L, tiles).reshape(-1)
    pix = pix[pix >= 0]
    assert pix.max() == S - 1 and _exactly_once(pix - tiles[0] * L.U * 256, S - tiles[0] * L.U * 256,
                                                "last tiles") == []
    top = M.dice_max_offset(L)
    assert top == B * C * S - 1 and top > M.INT32_MAX
    assert np.int64(top).astype(np.int32) != top  # what a 32-bit offset would have been


# ---- values: the kernels' loops and reduction order vs the reference; the cpp twin ----------
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference  # noqa: E402

GPU_SHAPES = [(1, 1, 7, 5), (2, 3, 33, 65), (3, 4, 129, 67), (2, 5, 9, 17, 13), (4, 2, 256, 256)]
ACTS = {"sigmoid": M.ACT_SIGMOID, "softmax": M.ACT_SOFTMAX, "none": M.ACT_NONE}
REDS = {"none": M.RED_NONE, "mean": M.RED_MEAN, "sum": M.RED_SUM}


def _dice_inputs(shape, weight):
    x = 2.0 * torch.randn(shape)
    g = (torch.rand(shape) > 0.5).float() * torch.rand(shape).clamp_min(0.5)
    w = None if weight is None else torch.rand(shape[: len(weight)]) + 0.1
    return x, g, w


def _dice_ref64(x, g, w, go, **kw):
    x64 = x.double().requires_grad_(True)
    ref = weighted_dice_loss_reference(x64, g.double(), None if w is None else w.double(), upcast=False, **kw)
    (gx,) = torch.autograd.grad(ref, x64, go.double())
    return ref.detach(), gx


def _dice_configs(shape):
    """The (reduction, squared, include_background, weight) combinations of the CUDA test
    test_cuda_matches_reference (all four for the small shapes, one for the 256x256 one)."""
    combos = [(red, sq, sq, "bc" if sq == (red == "mean") else "b") for red in ("mean", "none") for sq in (False, True)]
    n = 1
    for d in shape[2:]:
        n *= d
    return combos[:1] if n >= 2**16 else combos[::3] if n > 4096 else combos


@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
def test_dice_cuda_model_and_cpp_twin_match_reference(shape, activation):
    """CPU twin of test_weighted_dice.py::test_cuda_matches_reference: the same shapes and flags
    through (a) the model of the CUDA kernels' loops and fp32 reduction order and (b) the cpp
    backend (the same weighted_dice_math.h element functions), both against float64."""
    if activation == "softmax" and shape[1] == 1:
        pytest.skip("softmax needs C >= 2 (the op rejects it)")
    if activation != "sigmoid" and shape[-1] >= 256:
        pytest.skip("the 256x256 shape runs with sigmoid only here (model time)")
    for red, sq, bg, wk in _dice_configs(shape):
        x, g, w = _dice_inputs(shape, wk)
        kw = dict(activation=activation, reduction=red, squared_pred=sq, include_background=bg)
        B, C = shape[:2]
        c0 = 0 if bg or C == 1 else 1
        go = torch.randn(() if red != "none" else (B, C - c0))
        ref, gref = _dice_ref64(x, g, w, go, **kw)
        # (a) the model
        x3, g3 = x.reshape(B, C, -1).numpy(), g.reshape(B, C, -1).numpy()
        mk = dict(act=ACTS[activation], squared=sq, c0=c0, nr=1e-5, dr=1e-5, red=REDS[red])
        loss, sums, _, cnt_f = M.dice_cuda_forward_model(x3, g3, None if w is None else w.numpy(), **mk)
        dx, cnt_b = M.dice_cuda_backward_model(x3, g3, None if w is None else w.numpy(), sums, go.numpy(), **mk)
        assert (cnt_f == 1).all() and (cnt_b == 1).all()
        tol = dict(rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(torch.as_tensor(loss).double(), ref, **tol)
        torch.testing.assert_close(torch.from_numpy(dx).reshape(shape).double(), gref, rtol=1e-4,
                                   atol=1e-7 + 1e-5 * gref.abs().max().item())
        # (b) the cpp backend
        _need_ext()
        xr = x.clone().requires_grad_(True)
        out = weighted_dice_loss(xr, g, w, backend="cpp", **kw)
        (gx,) = torch.autograd.grad(out, xr, go)
        torch.testing.assert_close(out.double(), ref, **tol)
        torch.testing.assert_close(gx.double(), gref, rtol=1e-4, atol=1e-7 + 1e-5 * gref.abs().max().item())


@pytest.mark.parametrize("activation,caps", [("sigmoid", (2, 3)), ("softmax", (1, 1)), ("none", (3, 2))])
def test_dice_cuda_model_grid_stride_paths_match_reference(activation, caps):
    """Grids capped far below the data (as 2^31 - 1 / 65 535 would be at real scale): every
    grid-stride loop runs several times and the result is still the reference's; the same model
    without the group grid-stride loop leaves rows unwritten (NaN) and fails."""
    shape = (3, 4, 37, 41)
    x, g, w = _dice_inputs(shape, "bc")
    go = torch.randn(3, 4)
    ref, gref = _dice_ref64(x, g, w, go, activation=activation, reduction="none")
    x3, g3 = x.reshape(3, 4, -1).numpy(), g.reshape(3, 4, -1).numpy()
    mk = dict(act=ACTS[activation], squared=False, c0=0, nr=1e-5, dr=1e-5, red=M.RED_NONE, sms=1,
              max_x=caps[0], max_yz=caps[1])
    loss, sums, _, cnt_f = M.dice_cuda_forward_model(x3, g3, w.numpy(), **mk)
    dx, cnt_b = M.dice_cuda_backward_model(x3, g3, w.numpy(), sums, go.numpy(), **mk)
    assert (cnt_f == 1).all() and (cnt_b == 1).all()
    torch.testing.assert_close(torch.from_numpy(loss).double(), ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(torch.from_numpy(dx).reshape(shape).double(), gref, rtol=1e-4,
                               atol=1e-5 * gref.abs().max().item())
    bad, _, _, _ = M.dice_cuda_forward_model(x3, g3, w.numpy(), bugs=frozenset({"no_group_stride"}), **mk)
    assert not np.isfinite(bad).all()


# =============================================================================== vae_loss
import dualdiff.ops.vae as V  # noqa: E402


def _vae_coverage_errors(n, m, sms, aligned, es, bugs=frozenset()) -> list[str]:
    p_r, p_k = V.cuda_forward_blocks(n, m, sms)
    Vv = M.vae_vec(es)
    errs = []
    if n:
        fwd = [M.vae_fwd_recon_indices(b, n, p_r, aligned, Vv, bugs) for b in range(p_r)]
        errs += _exactly_once(np.concatenate([f.reshape(-1) for f in fwd]), n, "forward image")
    errs += _exactly_once(np.concatenate([M.vae_fwd_kl_indices(b, m, p_r, p_k).reshape(-1)
                                          for b in range(p_r, p_r + p_k)]), m, "forward latent")
    g_r, g_k = V.cuda_backward_blocks(n, m, es)
    if n:
        errs += _exactly_once(M.vae_bwd_recon_indices(n, g_r, aligned, Vv, bugs), n, "backward image")
    elif g_r:
        errs.append("KL only: image blocks launched (they would dereference the null grecon)")
    errs += _exactly_once(M.vae_bwd_latent_indices(g_r, g_k, m), m, "backward latent")
    if p_r + p_k > 2**31 - 1 or g_r + g_k > 2**31 - 1:
        errs.append("grid over the limit")
    return errs


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 4095, 4097, 3 * 17 * 9 * 3, 602112, 2**20 + 3])
@pytest.mark.parametrize("es", [4, 2])
def test_vae_every_element_exactly_once(n, es):
    """Image and latent elements: vector packs + scalar tail (aligned) or scalar only
    (unaligned), n below / not a multiple of the pack, one block (grid-stride) or many."""
    for m in ((1, 257, 5000) if n < 10**5 else (5000,)):
        for sms in (1, 132):
            for aligned in (True, False):
                assert _vae_coverage_errors(n, m, sms, aligned, es) == [], (n, m, sms, aligned)


@pytest.mark.parametrize("bug,n", [("tail_from_zero", 4097), ("no_tail", 4099), ("no_scalar_tail", 4099)])
def test_vae_coverage_check_catches_wrong_variants(bug, n):
    assert _vae_coverage_errors(n, 3, 1, True, 4, frozenset({bug}))


def test_vae_int64_offsets_at_the_edges():
    """n past 2^31: the last backward threads write exactly up to n - 1 (their start t * V passes
    int32) and every block index fits the int the kernel casts it to."""
    for es in (4, 2):
        n = 2**31 + 7 if es == 4 else 2**32 + 5
        Vv = M.vae_vec(es)
        g_r, g_k = V.cuda_backward_blocks(n, 10, es)
        assert g_r + g_k <= 2**31 - 1
        last = np.arange(g_r * 256 - 300, g_r * 256)
        idx = M.vae_bwd_recon_indices(n, g_r, True, Vv, t=last)
        idx = idx[idx >= 0]
        assert idx.max() == n - 1 and idx.min() == last[0] * Vv
        assert np.unique(idx).size == idx.size and idx.max() > M.INT32_MAX
        p_r, p_k = V.cuda_forward_blocks(n, 10, 132)
        # forward: the thread that owns the last pack (grid-stride) reaches it; its elements and
        # the scalar tail's sit past int32
        nv, stride = n // Vv, p_r * 256
        tid = (nv - 1) % stride
        steps = (nv - 1 - tid) // stride
        assert tid + steps * stride == nv - 1 and (nv - 1) * Vv > M.INT32_MAX
        assert n - nv * Vv < stride  # the tail needs one step of the threads


def _vae_ref64(l, x, mu, lv, kl_weight, recon, reduction):
    """The reference formulas (ops/vae.py docstring) in float64."""
    l, x, mu, lv = l.double(), x.double(), mu.double(), lv.double()
    terms = torch.nn.functional.softplus(l) - l * x if recon == "bce" else (torch.sigmoid(l) - x) ** 2
    per = -0.5 * (1 + lv - mu**2 - lv.exp()).sum(1)
    r = terms.mean() if reduction == "mean" else terms.sum()
    k = per.mean() if reduction == "mean" else per.sum()
    return r + kl_weight * k, r, k


VAE_SHAPES = [((1, 5), 3), ((3, 3, 17, 9), 7), ((2, 1, 5, 6, 7), 33), ((5, 3, 29, 31), 1000)]


@pytest.mark.parametrize("shape,latent", VAE_SHAPES)
@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_vae_cuda_model_and_cpp_twin_match_reference(shape, latent, recon):
    """CPU twin of test_vae_loss.py::test_matches_reference_fp32_gpu: the CUDA kernels' loops
    (aligned and unaligned, 1 and 132 SMs) and fp32 reduction order, and the cpp backend (the
    same vae_math.h), against the reference."""
    _need_ext()
    l = 3.0 * torch.randn(shape)
    x = torch.rand(shape)
    mu = torch.randn(shape[0], latent)
    lv = 0.5 * torch.randn(shape[0], latent)
    for reduction in ("mean", "sum"):
        ref = _vae_ref64(l, x, mu, lv, 0.37, recon, reduction)
        for sms, aligned in ((132, True), (1, False), (1, True)):
            total, r, k, parts, (cr, ck) = M.vae_cuda_forward_model(
                l.numpy(), x.numpy(), mu.numpy(), lv.numpy(), kl_weight=0.37, mse=recon == "mse",
                reduction=reduction, sms=sms, aligned=aligned)
            assert (cr == 1).all() and (ck == 1).all() and np.isfinite(parts).all()
            for got, want in zip((total, r, k), ref):
                torch.testing.assert_close(torch.tensor(float(got), dtype=torch.float64), want,
                                           rtol=2e-5, atol=1e-5)
        got = V.vae_loss(l, x, mu, lv, kl_weight=0.37, recon=recon, reduction=reduction, backend="cpp")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-5)


# =============================================================================== timestep_embedding
import dualdiff.ops.timestep_embedding as te  # noqa: E402


def test_te_transpose_reduction_gives_each_lane_its_total():
    """lane l ends with sum over all 32 lanes of partial l (= (column l / 8, row l % 8)); the
    variant with send and keep swapped does not."""
    rng = np.random.default_rng(0)
    acc = rng.standard_normal((32, 32)).astype(np.float32)
    want = acc.astype(np.float64).sum(0)
    np.testing.assert_allclose(M.transpose_reduce(acc), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(M.transpose_reduce(acc, frozenset({"swap_send_keep"})), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("N", [1, 3, 4, 5, 31, 32, 33, 96, 257])
@pytest.mark.parametrize("K", [2, 33, 64])
def test_te_linear_rows_writes_every_output_once(N, K):
    rng = np.random.default_rng(N * 100 + K)
    x = rng.standard_normal((8, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    y, cnt = M.te_linear_rows_model(x, w, b, lambda v: v, lambda v: v)
    assert (cnt == 1).all()
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B,fd,hd", [(1, 2, 1), (7, 33, 20), (9, 16, 36), (17, 9, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_te_cuda_model_matches_reference(B, fd, hd, dtype):
    """CPU twin of test_timestep_embedding.py::test_gpu_forward_fp32_poisoned / _low_precision:
    the CUDA kernel's blocks (8 rows, B not a multiple), warps (4 columns each, N not a multiple),
    lane split of K, transpose-reduction and the rounding points of the weight dtype, with the
    header's sinusoid and SiLU compiled by g++ (dualdiff._C test entries)."""
    C = _need_ext()

    def features(t, F):
        out = torch.empty(t.shape[0], F)
        tt = t.contiguous()
        freqs = te.timestep_frequencies(F)
        C.timestep_features_cpu(tt.data_ptr(), tt.shape[0], freqs.data_ptr(), F, out.data_ptr())
        return out.numpy()

    def silu(v):
        xv = torch.from_numpy(np.ascontiguousarray(v, np.float32))
        out = torch.empty_like(xv)
        C.silu_cpu(xv.data_ptr(), xv.numel(), out.data_ptr())
        return out.numpy()

    m = te.DualTimestepEmbedding(fd, hd, backend="torch")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    t0 = torch.randint(0, 1000, (B,))
    t1 = torch.rand(B) * 1000
    ref32 = m.reference_forward(t0, t1).detach()
    m = m.to(dtype)
    out, cnt = M.te_cuda_forward_model(t0, t1, m.weights(), dtype, features, silu)
    assert (cnt == 1).all()
    got = torch.from_numpy(out)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref32, rtol=1e-5, atol=1e-5)
    else:
        from dualdiff.testing import assert_close_lowp

        naive = m.reference_forward(t0, t1).detach()
        assert_close_lowp(got, ref32, naive, atol=1e-3, name=str(dtype))


@pytest.mark.parametrize("B", [1, 7, 8, 9, 1000, 2**31 - 9])
@pytest.mark.parametrize("fd,hd", [(64, 256), (33, 3000)])
def test_te_grid_rows_and_scratch_slices(B, fd, hd):
    """Blocks cover rows [8 blk, 8 blk + nrows) exactly once; the per-block scratch slices are
    disjoint and inside the buffer the host allocates (the global-workspace path)."""
    grid = M.te_launch_grid_int32(B)
    assert grid == te.cuda_grid(B) and (grid - 1) * 8 < B <= grid * 8
    starts, per, floats = M.te_scratch_slices(B, fd, hd)
    assert per == 8 * (fd + 3 * hd) and starts[0] == 0 and starts[-1] == (grid - 1) * per
    assert starts[-1] + per <= floats  # consecutive slices of `per` floats: disjoint, in the buffer
    if B < 10**4:
        rows = np.concatenate([np.arange(8 * b, 8 * b + min(8, B - 8 * b)) for b in range(grid)])
        assert _exactly_once(rows, B, "rows") == []


def test_te_grid_at_the_int32_edge():
    """csrc/timestep_embedding.cu computed (B + kRows - 1) / kRows in int, which wrapped for
    2^31 - 8 < B < 2^31 (accepted by the launcher); it now sums in int64."""
    for B in (2**31 - 1, 2**31 - 8, 2**31 - 7, 1):
        assert M.te_launch_grid_int32(B) == te.cuda_grid(B)
    assert M.te_launch_grid_int32(2**31 - 1, frozenset({"int32_grid"})) != te.cuda_grid(2**31 - 1)
