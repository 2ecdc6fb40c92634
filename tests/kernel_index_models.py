"""Python models of the CUDA kernels' launch geometry, index arithmetic and reduction order.

The CUDA kernels (csrc/*.cu) cannot run here. Their element math lives in shared headers
(csrc/*_math.h) that the cpp backend compiles too, so the cpp tests check the formulas; what only
the .cu files hold is *which element each block and thread touches* and *in what order partial
sums are combined*. Each model below restates one kernel's loops literally (numpy, vectorised over
the threads of a block or, for coverage at extreme sizes, over the blocks of a grid-stride loop)
with a comment naming the .cu lines it mirrors, so that tests can check on the CPU that

* every element is read / written exactly once (including grid-stride, vector/tail, capped axes);
* offsets stay in range and need int64 where the kernels use int64;
* the kernel's order of fp32 additions, run in fp32, still gives the reference's result.

``bugs`` arguments switch in deliberately wrong variants (a dropped grid-stride loop, an
unclamped chunk end, ...) so that the tests show their checks can fail.

Element math: the models call numpy float32 transcriptions of the header functions (named like
them); the header functions themselves are checked through the cpp backend and, for the timestep
embedding, through dualdiff._C.timestep_features_cpu / silu_cpu (the same header compiled by g++).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MAX_GRID_X = 2**31 - 1   # gridDim.x limit
MAX_GRID_YZ = 65535      # gridDim.y / gridDim.z limit
INT32_MAX = 2**31 - 1
f32 = np.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------- warp / block sums
def shfl_down_tree(v: np.ndarray) -> np.ndarray:
    """``for (off = 16; off > 0; off /= 2) v += __shfl_down_sync(full, v, off)`` over the last axis
    (32 lanes), fp32. A lane whose source lane + off >= 32 receives its own value (CUDA semantics).
    Returns all lanes (lane 0 holds the warp total)."""
    v = v.astype(f32, copy=True)
    lane = np.arange(32)
    for off in (16, 8, 4, 2, 1):
        src = np.where(lane + off < 32, lane + off, lane)
        v = (v + v[..., src]).astype(f32)
    return v


def block_sum_vae(v: np.ndarray, threads: int) -> f32:
    """csrc/vae_loss.cu block_sum<THREADS> (lines 56-68): shuffle tree per warp, warp totals to
    shared memory, then warp 0 reduces them (lanes >= THREADS/32 contribute 0) by the same tree."""
    assert v.shape == (threads,)
    warp_sums = shfl_down_tree(v.reshape(threads // 32, 32))[:, 0]
    second = np.zeros(32, f32)
    second[: threads // 32] = warp_sums
    return shfl_down_tree(second)[0]


# =============================================================================== weighted_dice
DICE_THREADS = 256  # csrc/weighted_dice_math.h CUDA_THREADS


def dice_unroll(nc: int) -> int:
    """weighted_dice_math.h cuda_unroll."""
    return 4 if nc == 1 else (2 if nc <= 4 else 1)


def dice_bucket(cp: int) -> int:
    """weighted_dice_math.h cuda_channel_bucket."""
    return 1 if cp == 1 else 4 if cp <= 4 else 8 if cp <= 8 else 32


@dataclass(frozen=True)
class DiceLaunch:
    """What csrc/weighted_dice.cu launch_fwd / launch_bwd (lines 241-289) launch."""
    B: int
    C: int
    S: int
    cp: int
    groups: int
    n_chunks: int
    chunk: int
    U: int
    fwd_x: int
    fwd_y: int
    bwd_x: int
    bwd_y: int
    tiles: int

    @property
    def R(self) -> int:
        return self.B * self.C


def dice_cuda_grid(groups: int, S: int, cp: int, n_chunks: int, max_x: int = MAX_GRID_X,
                   max_yz: int = MAX_GRID_YZ) -> tuple[int, int, int, int, int]:
    """weighted_dice_math.h cuda_grid (fwd_x, fwd_y, bwd_x, bwd_y, tiles); smaller caps than the
    hardware's let the tests reach the grid-stride loops at small sizes."""
    per_tile = DICE_THREADS * dice_unroll(dice_bucket(cp))
    tiles = _cdiv(S, per_tile)
    return min(groups, max_x), n_chunks, min(tiles, max_x), min(groups, max_yz), tiles


def dice_launch(B: int, C: int, S: int, softmax: bool, sms: int = 132, *, max_x: int = MAX_GRID_X,
                max_yz: int = MAX_GRID_YZ) -> DiceLaunch:
    from dualdiff.ops.weighted_dice import cuda_chunks  # the host chunking that feeds the kernel

    cp = C if softmax else 1                       # .cu line 245
    groups = B * C // cp                           # .cu line 246
    n_chunks, chunk = cuda_chunks(groups, S, sms)  # dualdiff/ops/weighted_dice.py _forward_cuda
    fx, fy, bx, by, tiles = dice_cuda_grid(groups, S, cp, n_chunks, max_x, max_yz)
    return DiceLaunch(B, C, S, cp, groups, n_chunks, chunk, dice_unroll(dice_bucket(cp)), fx, fy, bx, by, tiles)


# ---- coverage (factorised: element (row, s) = (grp * cp + c, s); rows and pixels come from
# independent loops, so "each element exactly once" <=> each factor exactly once) ---------------
def _stride_loop(starts: np.ndarray, stride: int, end: int) -> np.ndarray:
    """Every value of ``for (v = start; v < end; v += stride)`` over all ``starts``, vectorised."""
    if len(starts) == 0:
        return np.zeros(0, np.int64)
    k = np.arange(_cdiv(end - int(starts.min()), stride) if end > starts.min() else 0, dtype=np.int64)
    v = starts.astype(np.int64)[:, None] + stride * k[None, :]
    return v[v < end]


def dice_fwd_groups(L: DiceLaunch, bugs: frozenset = frozenset()) -> np.ndarray:
    """Row groups visited by the forward blocks: ``for (grp = blockIdx.x; grp < groups; grp +=
    gridDim.x)`` (.cu line 91); bug "no_group_stride": one group per block."""
    bx = np.arange(L.fwd_x, dtype=np.int64)
    if "no_group_stride" in bugs:
        return bx[bx < L.groups]
    return _stride_loop(bx, L.fwd_x, L.groups)


def dice_fwd_chunk_bounds(L: DiceLaunch, by: int, bugs: frozenset = frozenset()) -> tuple[int, int]:
    """lo = blockIdx.y * chunk, hi = min(S, lo + chunk) (.cu lines 88-89); bug "hi_unclamped"."""
    lo = by * L.chunk
    return lo, (lo + L.chunk if "hi_unclamped" in bugs else min(L.S, lo + L.chunk))


def dice_fwd_pixels(L: DiceLaunch, by: int, bugs: frozenset = frozenset()) -> np.ndarray:
    """[I, U, THREADS] pixel s of thread t at loop step i, unroll u, or -1 where the kernel skips
    it: s0 = lo + t; s0 < hi; s0 += THREADS * U (line 97), s = s0 + u * THREADS (line 101), used
    only while s < hi (lines 104, 111). Order (i, u) is each thread's accumulation order."""
    T, U = DICE_THREADS, L.U
    lo, hi = dice_fwd_chunk_bounds(L, by, bugs)
    steps = _cdiv(max(hi - lo, 0), T * U)
    t = np.arange(T, dtype=np.int64)
    i = np.arange(steps, dtype=np.int64)[:, None, None]
    u = np.arange(U, dtype=np.int64)[None, :, None]
    s = lo + t[None, None, :] + i * (T * U) + u * T
    return np.where(s < hi, s, -1)


def dice_bwd_groups(L: DiceLaunch, bugs: frozenset = frozenset()) -> np.ndarray:
    """``for (grp = blockIdx.y; grp < groups; grp += gridDim.y)`` (.cu line 185)."""
    by = np.arange(L.bwd_y, dtype=np.int64)
    if "no_group_stride" in bugs:
        return by[by < L.groups]
    return _stride_loop(by, L.bwd_y, L.groups)


def dice_bwd_tiles(L: DiceLaunch, bugs: frozenset = frozenset()) -> np.ndarray:
    """``for (tile = blockIdx.x; tile < tiles; tile += gridDim.x)`` (.cu line 197)."""
    bx = np.arange(L.bwd_x, dtype=np.int64)
    if "no_tile_stride" in bugs:
        return bx[bx < L.tiles]
    return _stride_loop(bx, L.bwd_x, L.tiles)


def dice_bwd_pixels(L: DiceLaunch, tiles: np.ndarray, bugs: frozenset = frozenset()) -> np.ndarray:
    """[len(tiles), U, THREADS] pixels written: s0 = tile * THREADS * U + t (line 198), s = s0 +
    u * THREADS (line 212), written while s < S (line 213); -1 where skipped. Bug "tile_no_unroll":
    s0 = tile * THREADS + t."""
    T, U = DICE_THREADS, L.U
    step = T if "tile_no_unroll" in bugs else T * U
    t = np.arange(T, dtype=np.int64)
    s = tiles.astype(np.int64)[:, None, None] * step + t[None, None, :] + np.arange(U)[None, :, None] * T
    return np.where(s < L.S, s, -1)


def dice_max_offset(L: DiceLaunch) -> int:
    """The largest element offset the kernels form: base + c * S + s with base = row0 * S
    (lines 93, 105, 187, 206, 234) for the last group, channel and pixel (exact integer)."""
    row0 = (L.groups - 1) * L.cp
    return row0 * L.S + (L.cp - 1) * L.S + (L.S - 1)


# ---- values: the kernels' loops and fp32 reduction order ----------------------------------------
ACT_SIGMOID, ACT_SOFTMAX, ACT_NONE = 0, 1, 2   # weighted_dice_math.h
RED_NONE, RED_MEAN, RED_SUM = 0, 1, 2


def _activate(v: np.ndarray, act: int) -> np.ndarray:
    """.cu activate<NC> (lines 57-77) on v [cp, T] (channels of one pixel per column)."""
    if v.shape[0] == 1 and act != ACT_SOFTMAX:
        return (f32(1.0) / (f32(1.0) + np.exp(-v))).astype(f32) if act == ACT_SIGMOID else v  # sigmoid_from_exp
    mx = v[0].copy()
    for c in range(1, v.shape[0]):
        mx = np.maximum(mx, v[c])
    e = np.exp((v - mx).astype(f32)).astype(f32)
    den = np.zeros_like(mx)
    for c in range(v.shape[0]):
        den = (den + e[c]).astype(f32)
    inv = (f32(1.0) / den).astype(f32)                                    # softmax_scale
    return (e * inv).astype(f32)


def dice_cuda_forward_model(x, g, w, *, act, squared, c0, nr, dr, red, sms=132, max_x=MAX_GRID_X,
                            max_yz=MAX_GRID_YZ, bugs=frozenset()):
    """fwd_partial_kernel + fwd_finalize_kernel on x, g [B, C, S] (fp32 numpy, what to_f / load_g
    read), w None / [B] / [B, C]. Returns (loss, sums [3, R], partials, forward coverage counts)."""
    B, C, S = x.shape
    L = dice_launch(B, C, S, act == ACT_SOFTMAX, sms, max_x=max_x, max_yz=max_yz)
    R, T, cp = L.R, DICE_THREADS, L.cp
    xr, gr = x.reshape(R, S).astype(f32), g.reshape(R, S).astype(f32)
    part = np.full((R, L.n_chunks, 3), np.nan, f32)                    # poisoned workspace
    count = np.zeros((R, S), np.int64)
    for by in range(L.fwd_y):
        pix = dice_fwd_pixels(L, by, bugs)                            # [I, U, T]
        for bx in range(L.fwd_x):
            # for (grp = blockIdx.x; grp < groups; grp += gridDim.x)   (line 91)
            for grp in ([bx] if "no_group_stride" in bugs else range(bx, L.groups, L.fwd_x)):
                row0 = int(grp) * cp                                  # line 92
                acc = np.zeros((cp, 3, T), f32)                       # line 94
                for i in range(pix.shape[0]):
                    for u in range(pix.shape[1]):
                        s = pix[i, u]
                        ok = s >= 0
                        if not ok.any():
                            break
                        if (s[ok] >= S).any():
                            raise IndexError("model read past the row end")
                        sc = np.where(ok, s, 0)
                        xv = np.where(ok, xr[row0:row0 + cp][:, sc], f32(0))   # lines 104-106
                        gv = np.where(ok, gr[row0:row0 + cp][:, sc], f32(0))
                        p = _activate(xv, act)                                   # line 112
                        pg = (p * gv).astype(f32)                                # add_terms
                        ps = (p * p).astype(f32) if squared else p
                        gs = (gv * gv).astype(f32) if squared else gv
                        for k, term in enumerate((pg, ps, gs)):
                            acc[:, k] = np.where(ok, acc[:, k] + term, acc[:, k]).astype(f32)
                        count[row0:row0 + cp, s[ok]] += 1  # distinct threads: distinct pixels within a step
                # lines 117-133: shuffle tree per warp, warps summed in order 0..7
                lane0 = shfl_down_tree(acc.reshape(cp, 3, T // 32, 32))[..., 0]   # [cp, 3, 8]
                tot = np.zeros((cp, 3), f32)
                for wi in range(T // 32):
                    tot = (tot + lane0[..., wi]).astype(f32)
                part[row0:row0 + cp, by, :] = tot                                 # line 132
    # fwd_finalize_kernel (lines 138-170), one block of THREADS threads
    sums = np.zeros((3, R), f32)
    d = np.zeros(R, f32)
    for r in range(R):
        s3 = np.zeros(3, f32)
        for ch in range(L.n_chunks):
            s3 = (s3 + part[r, ch]).astype(f32)                                   # line 150
        sums[:, r] = s3
        d[r] = f32(1.0) - (f32(2.0) * s3[0] + f32(nr)) / (s3[1] + s3[2] + f32(dr))   # dice_value
        if w is not None:
            d[r] = d[r] * f32(w.reshape(-1)[r] if w.ndim == 2 else w[r // C])       # row_weight
    keep = (np.arange(R) % C) >= c0
    if red == RED_NONE:
        return d[keep].reshape(B, C - c0), sums, part, count
    local = np.zeros(T, f32)
    for t in range(T):
        for r in range(t, R, T):                                                  # line 146
            if keep[r]:
                local[t] = f32(local[t] + d[r])
    off = T // 2
    while off > 0:                                                                # lines 165-168
        local[:off] = (local[:off] + local[off:2 * off]).astype(f32)
        off //= 2
    scale = f32(1.0 / (B * (C - c0))) if red == RED_MEAN else f32(1.0)            # launch_fwd line 261
    return f32(local[0] * scale), sums, part, count


def dice_cuda_backward_model(x, g, w, sums, go, *, act, squared, c0, nr, dr, red, sms=132,
                             max_x=MAX_GRID_X, max_yz=MAX_GRID_YZ, bugs=frozenset()):
    """bwd_kernel (lines 172-239): dx [B, C, S] fp32 (NaN where never written) and write counts."""
    B, C, S = x.shape
    L = dice_launch(B, C, S, act == ACT_SOFTMAX, sms, max_x=max_x, max_yz=max_yz)
    R, T, cp = L.R, DICE_THREADS, L.cp
    xr, gr = x.reshape(R, S).astype(f32), g.reshape(R, S).astype(f32)
    go = np.asarray(go, f32).reshape(-1)
    dx = np.full((R, S), np.nan, f32)
    count = np.zeros((R, S), np.int64)
    scale = f32(1.0 / (B * (C - c0))) if red == RED_MEAN else f32(1.0)           # launch_bwd line 275
    tiles = dice_bwd_tiles(L, bugs)
    pix = dice_bwd_pixels(L, tiles, bugs)                                         # [n_tiles, U, T]
    for grp in dice_bwd_groups(L, bugs):
        row0 = int(grp) * cp
        ca, cb = np.zeros(cp, f32), np.zeros(cp, f32)
        for c in range(cp):                                                       # lines 189-196
            r = row0 + c
            b, cc = divmod(r, C)
            if cc < c0:
                k = f32(0)                                                        # upstream_k
            else:
                k = go[b * (C - c0) + cc - c0] if red == RED_NONE else f32(go[0] * scale)
                if w is not None:
                    k = f32(k * (w.reshape(-1)[r] if w.ndim == 2 else w[b]))
            den = f32(sums[1, r] + sums[2, r] + f32(dr))                          # grad_coefficients
            ca[c] = f32(f32(-2.0) * k / den)
            cb[c] = f32(k * (f32(2.0) * sums[0, r] + f32(nr)) / (den * den))
        for ti in range(pix.shape[0]):
            for u in range(pix.shape[1]):
                s = pix[ti, u]
                ok = (s >= 0) & (s < S)
                if not ok.any():
                    continue
                sv = s[ok]
                xv, gv = xr[row0:row0 + cp][:, sv], gr[row0:row0 + cp][:, sv]
                p = _activate(xv, act)
                dp = (ca[:, None] * gv + ((f32(2.0) * cb[:, None]) * p if squared else cb[:, None])).astype(f32)
                if cp > 1 or act == ACT_SOFTMAX:
                    dot = np.zeros(p.shape[1], f32)
                    for c in range(cp):
                        dot = (dot + p[c] * dp[c]).astype(f32)
                    v = (p * (dp - dot)).astype(f32)                              # softmax_grad
                elif act == ACT_SIGMOID:
                    v = (dp * p * (f32(1.0) - p)).astype(f32)                     # sigmoid_grad
                else:
                    v = dp
                dx[row0:row0 + cp][:, sv] = v                                     # line 234
                count[row0:row0 + cp, sv] += 1
    return dx.reshape(B, C, S), count


# =============================================================================== vae_loss
VAE_THREADS = 256        # csrc/vae_loss.cu kThreads
VAE_FINAL_THREADS = 1024  # kFinalThreads


def vae_vec(element_size: int) -> int:
    """Pack<T>::kVec = 16 / sizeof(T) (.cu line 38)."""
    return 16 // element_size


def vae_fwd_recon_indices(b: int, n: int, p_r: int, aligned: bool, V: int, bugs=frozenset()) -> np.ndarray:
    """[T, steps] image element indices of recon block b < p_r in each thread's accumulation
    order, -1 where none (.cu lines 82-99): packs i = tid, tid + stride, .. < n / V, each read as V
    consecutive elements, then the scalar tail from nv * V (from 0 when not aligned). Bugs:
    "tail_from_zero" (the tail restarts at 0), "no_tail"."""
    T = VAE_THREADS
    stride = p_r * T
    tid = b * T + np.arange(T, dtype=np.int64)
    cols = []
    start = 0
    if aligned:
        nv = n // V
        steps = _cdiv(max(nv - b * T, 0), stride) if nv > b * T else 0
        for k in range(steps):
            i = tid + k * stride
            for j in range(V):
                cols.append(np.where(i < nv, i * V + j, -1))
        start = 0 if "tail_from_zero" in bugs else nv * V
        if "no_tail" in bugs:
            start = n
    first = start + b * T
    steps = _cdiv(n - first, stride) if n > first else 0
    for k in range(steps):
        i = start + tid + k * stride
        cols.append(np.where(i < n, i, -1))
    return np.stack(cols, 1) if cols else np.full((T, 0), -1, np.int64)


def vae_fwd_kl_indices(b: int, m: int, p_r: int, p_k: int) -> np.ndarray:
    """[T, steps] latent indices of KL block b >= p_r (.cu lines 101-106)."""
    T = VAE_THREADS
    stride = p_k * T
    first = (b - p_r) * T + np.arange(T, dtype=np.int64)
    steps = _cdiv(m - int(first[0]), stride) if m > first[0] else 0
    i = first[:, None] + stride * np.arange(steps, dtype=np.int64)[None, :]
    return np.where(i < m, i, -1)


def vae_bwd_recon_indices(n: int, g_r: int, aligned: bool, V: int, bugs=frozenset(), t=None) -> np.ndarray:
    """[threads, V] image elements written by each recon thread (.cu lines 153-167): thread
    t = blockIdx.x * kThreads + threadIdx.x (int64) of blocks [0, g_r) owns [t V, t V + V); the pack
    store when aligned and start + V <= n, else the scalar loop clipped at n; -1 where nothing.
    ``t``: only these global thread ids (default all). Bug "no_scalar_tail": no scalar fallback."""
    t = np.arange(g_r * VAE_THREADS, dtype=np.int64) if t is None else np.asarray(t, np.int64)
    idx = t[:, None] * V + np.arange(V)[None, :]
    full = aligned & (t * V + V <= n)
    if "no_scalar_tail" in bugs:
        return np.where(full[:, None], idx, -1)
    return np.where(full[:, None] | (idx < n), idx, -1)


def vae_bwd_latent_indices(g_r: int, g_k: int, m: int) -> np.ndarray:
    """Latent element of each thread of blocks [g_r, g_r + g_k) (.cu lines 169-175), -1 if none."""
    i = np.arange(g_k * VAE_THREADS, dtype=np.int64)
    return np.where(i < m, i, -1)


def _recon_term(l, x, mse):
    """vae_math.h bce_term / mse_term with the kernel's exp (fp32)."""
    if mse:
        s = (f32(1) / (f32(1) + np.exp(-l))).astype(f32)
        return ((s - x) * (s - x)).astype(f32)
    relu = np.where(l > 0, l, f32(0))
    neg_abs = np.where(l < -l, l, -l)
    return (relu - l * x + np.log1p(np.exp(neg_abs))).astype(f32)


def vae_cuda_forward_model(l, x, mu, lv, *, kl_weight, mse, reduction, sms=132, aligned=True,
                           element_size=4, bugs=frozenset()):
    """vae_fwd_partials + vae_fwd_finalize (lines 70-134): (total, recon, kl, partials, counts)."""
    from dualdiff.ops.vae import cuda_forward_blocks

    l, x = l.reshape(-1).astype(f32), x.reshape(-1).astype(f32)
    mu_f, lv_f = mu.reshape(-1).astype(f32), lv.reshape(-1).astype(f32)
    n, m = l.size, mu_f.size
    p_r, p_k = cuda_forward_blocks(n, m, sms)                # dualdiff/ops/vae.py host code
    V = vae_vec(element_size)
    partials = np.full(p_r + p_k, np.nan, f32)
    cnt_r, cnt_k = np.zeros(n, np.int64), np.zeros(m, np.int64)
    for b in range(p_r + p_k):
        acc = np.zeros(VAE_THREADS, f32)
        if b < p_r:
            idx = vae_fwd_recon_indices(b, n, p_r, aligned, V, bugs)
            for k in range(idx.shape[1]):
                ok = idx[:, k] >= 0
                i = np.where(ok, idx[:, k], 0)
                acc = np.where(ok, acc + _recon_term(l[i], x[i], mse), acc).astype(f32)
                np.add.at(cnt_r, idx[ok, k], 1)
        else:
            idx = vae_fwd_kl_indices(b, m, p_r, p_k)
            for k in range(idx.shape[1]):
                ok = idx[:, k] >= 0
                i = np.where(ok, idx[:, k], 0)
                term = (f32(-0.5) * (f32(1) + lv_f[i] - mu_f[i] * mu_f[i] - np.exp(lv_f[i]))).astype(f32)
                acc = np.where(ok, acc + term, acc).astype(f32)
                np.add.at(cnt_k, idx[ok, k], 1)
        partials[b] = block_sum_vae(acc, VAE_THREADS)                            # lines 108-109
    rs, ks = np.zeros(VAE_FINAL_THREADS, f32), np.zeros(VAE_FINAL_THREADS, f32)
    for t in range(VAE_FINAL_THREADS):                                             # lines 120-121
        for i in range(t, p_r, VAE_FINAL_THREADS):
            rs[t] = f32(rs[t] + partials[i])
        for i in range(t, p_k, VAE_FINAL_THREADS):
            ks[t] = f32(ks[t] + partials[p_r + i])
    r, k = block_sum_vae(rs, VAE_FINAL_THREADS), block_sum_vae(ks, VAE_FINAL_THREADS)
    recon_scale = f32(1.0 / n) if reduction == "mean" else f32(1.0)                # ops/vae.py _scales
    kl_scale = f32(1.0 / mu.shape[0]) if reduction == "mean" else f32(1.0)
    k = f32(k * kl_scale)
    r = f32(r * recon_scale)
    return f32(r + f32(kl_weight) * k), r, k, partials, (cnt_r, cnt_k)


# =============================================================================== timestep_embedding
TE_ROWS, TE_COLS, TE_THREADS = 8, 4, 256   # csrc/timestep_embedding.cu kRows, kCols, kThreads


def te_launch_grid_int32(B: int, bugs=frozenset()) -> int:
    """``grid = int((int64(B) + kRows - 1) / kRows)`` (.cu, launch()) for B the launcher accepts
    (0 < B < 2^31). Bug "int32_grid": the sum in 32-bit int (wraps for B > 2^31 - kRows), as the
    .cu had it before 2026-12-07."""
    s = np.int64(B) + TE_ROWS - 1
    if "int32_grid" in bugs:
        s = np.int64(np.array(s).astype(np.int32))
    return int(s // TE_ROWS) if s >= 0 else -int((-s) // TE_ROWS)


def transpose_reduce(acc: np.ndarray, bugs=frozenset()) -> np.ndarray:
    """.cu lines 101-113 on acc [32 lanes, 32]: 5 butterfly steps; returns acc[:, 0] per lane."""
    acc = acc.astype(f32, copy=True)
    lane = np.arange(32)
    for step in range(5):
        s = 16 >> step
        upper = (lane & s) != 0
        new = acc.copy()
        for i in range(s):
            send = np.where(upper, acc[:, i], acc[:, i + s])
            keep = np.where(upper, acc[:, i + s], acc[:, i])
            if "swap_send_keep" in bugs:
                send, keep = keep, send
            new[:, i] = (keep + send[lane ^ s]).astype(f32)                  # __shfl_xor_sync
        acc = new
    return acc[:, 0]


def _fma(a, b, c):
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(f32)


def te_linear_rows_model(x: np.ndarray, w: np.ndarray, b: np.ndarray, round_w, epilogue, bugs=frozenset()):
    """linear_rows (lines 71-126) for one block: x [kRows, K] (shared memory), w [N, K], b [N]
    (fp32 values of the weight dtype). Per warp step: lane l accumulates k = l, l + 32, .. with
    fmaf into 32 partials (c, r); the transpose-reduction leaves (c, r) = (l / 8, l % 8) on lane l;
    y = round_w(acc + b) then ``epilogue`` (round_w(silu(.)) or identity). Returns y [kRows, N]
    (NaN where unwritten) and write counts."""
    K, N = x.shape[1], w.shape[0]
    y = np.full((TE_ROWS, N), np.nan, f32)
    count = np.zeros((TE_ROWS, N), np.int64)
    lane = np.arange(32)
    nwarps = TE_THREADS // 32
    for warp in range(nwarps):
        for j0 in range(warp * TE_COLS, N, nwarps * TE_COLS):
            acc = np.zeros((32, TE_COLS * TE_ROWS), f32)
            cols = [j0 + c if j0 + c < N else j0 for c in range(TE_COLS)]
            for k0 in range(0, K, 32):                                    # line 90
                k = k0 + lane
                ok = k < K
                kk = np.where(ok, k, 0)
                xv = x[:, kk]                                             # [kRows, 32]
                for c in range(TE_COLS):
                    wv = np.where(ok & (j0 + c < N), w[cols[c], kk], f32(0))
                    for r in range(TE_ROWS):
                        acc[:, c * TE_ROWS + r] = np.where(ok, _fma(wv, xv[r], acc[:, c * TE_ROWS + r]),
                                                           acc[:, c * TE_ROWS + r])
            tot = transpose_reduce(acc, bugs)
            c, r = lane // TE_ROWS, lane % TE_ROWS
            j = j0 + c
            ok = j < N
            v = round_w((tot[ok] + b[j[ok]]).astype(f32))
            y[r[ok], j[ok]] = epilogue(v)
            np.add.at(count, (r[ok], j[ok]), 1)
    return y, count


def te_cuda_forward_model(t0: torch.Tensor, t1: torch.Tensor, ws, dtype: torch.dtype, features, silu):
    """dual_timestep_embedding_fwd_kernel (lines 128-170) for every block of the grid: out [B, H]
    (NaN where unwritten) and write counts. ``features(t fp32 [n], F) -> [n, F]`` and
    ``silu(x fp32) -> fp32`` are the header functions (dualdiff._C timestep_features_cpu / silu_cpu)."""
    def round_w(v):
        return torch.from_numpy(np.ascontiguousarray(v, f32)).to(dtype).float().numpy()

    w = [wi.detach().float().cpu().numpy() for wi in ws]
    H, F = w[0].shape
    B = t0.shape[0]
    grid = te_launch_grid_int32(B)
    out = np.full((B, H), np.nan, f32)
    count = np.zeros((B, H), np.int64)
    for blk in range(grid):
        row0 = blk * TE_ROWS                                              # line 148
        nrows = min(TE_ROWS, B - row0)                                    # line 149
        cat = np.zeros((TE_ROWS, 2 * H), f32)
        for br, t in enumerate((t0, t1)):
            feat = np.zeros((TE_ROWS, F), f32)                            # rows past B are 0 (line 157)
            tv = t[row0:row0 + nrows].to(torch.float32)                   # load_t: static_cast<float>
            feat[:nrows] = features(tv, F)
            feat = round_w(feat)                                          # line 159
            w0, b0, w2, b2 = w[4 * br: 4 * br + 4]
            hid, _ = te_linear_rows_model(feat, w0, b0, round_w, lambda v: round_w(silu(v)))
            cat[:, br * H:(br + 1) * H], _ = te_linear_rows_model(hid, w2, b2, round_w, lambda v: round_w(silu(v)))
        y, cnt = te_linear_rows_model(cat, w[8], w[9], round_w, lambda v: v)
        out[row0:row0 + nrows] = y[:nrows]                                # r < nrows (line 120)
        count[row0:row0 + nrows] += cnt[:nrows]
    return out, count


def te_scratch_slices(B: int, F: int, H: int, blocks=None) -> tuple[np.ndarray, int, int]:
    """(start offset of the given blocks' workspaces in the global scratch buffer (.cu lines
    142-144: blockIdx.x * kRows * (F + 3H), int64), floats per block, floats the host allocates
    (ops/timestep_embedding.py _cuda_scratch)). ``blocks`` default: the first two and the last."""
    from dualdiff.ops import timestep_embedding as te

    per = TE_ROWS * (F + 3 * H)
    grid = te_launch_grid_int32(B)
    blocks = np.unique([0, min(1, grid - 1), grid - 1]) if blocks is None else np.asarray(blocks)
    return blocks.astype(np.int64) * per, per, te.cuda_grid(B) * te.cuda_workspace_bytes(F, H) // 4
