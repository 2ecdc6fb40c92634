"""Triton kernels of the fused weighted Dice loss (see dualdiff/ops/weighted_dice.py).

Layout: logits and target are [B, C, S] contiguous. A program covers ``CP`` consecutive
(b, c) rows (CP = C for softmax, which needs all channels of a pixel; CP = 1 otherwise, the
tensor then being seen as [B*C, 1, S]) and one chunk of the spatial axis.

forward  = _dice_fwd_partial_kernel (partial sums per row and chunk)
         + _dice_fwd_finalize_kernel (one program: adds partials in a fixed order -> sums, loss)
backward = _dice_bwd_kernel (elementwise; recomputes p, uses the saved sums)
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

ACT_SIGMOID, ACT_SOFTMAX, ACT_NONE = 0, 1, 2
RED_NONE, RED_MEAN, RED_SUM = 0, 1, 2
TILE = 2048            # elements (channels x pixels) per program iteration
PROGRAMS_PER_SM = 8    # forward grid target
FINAL_ROWS = 64        # rows per finalize iteration
FINAL_CHUNKS = 32      # chunks per finalize iteration


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs


@triton.jit
def _activation(x, valid, ACT: tl.constexpr):
    # x: [C_PAD, BLOCK] fp32 logits, valid: [C_PAD, BLOCK] mask. Returns p (0 where not valid).
    if ACT == 0:
        p = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == 1:
        xm = tl.where(valid, x, float("-inf"))
        mx = tl.max(xm, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(xm - mx[None, :])
        p = e / tl.maximum(tl.sum(e, axis=0), 1e-30)[None, :]
    else:
        p = x
    return tl.where(valid, p, 0.0)


@triton.jit
def _dice_fwd_partial_kernel(
    x_ptr,     # [B, C, S] logits (fp32 / fp16 / bf16)
    g_ptr,     # [B, C, S] target (fp32 / fp16 / bf16 / uint8)
    part_ptr,  # [B*C, NCHUNK, 3] fp32 out: partial sums of p*g, p (p²), g (g²)
    S, CP, NCHUNK, CHUNK,
    ACT: tl.constexpr, SQUARED: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row0 = tl.program_id(1).to(tl.int64) * CP
    cs = tl.arange(0, C_PAD)
    cmask = cs < CP
    base = (row0 + cs[:, None]) * S
    acc_pg = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = cmask[:, None] & (offs < hi)[None, :]
        x = tl.load(x_ptr + base + offs[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + base + offs[None, :], mask=m, other=0).to(tl.float32)
        p = _activation(x, m, ACT)
        acc_pg += p * g
        if SQUARED:
            acc_p += p * p
            acc_g += g * g
        else:
            acc_p += p
            acc_g += g
    out = part_ptr + ((row0 + cs) * NCHUNK + chunk) * 3
    tl.store(out, tl.sum(acc_pg, axis=1), mask=cmask)
    tl.store(out + 1, tl.sum(acc_p, axis=1), mask=cmask)
    tl.store(out + 2, tl.sum(acc_g, axis=1), mask=cmask)


@triton.jit
def _dice_fwd_finalize_kernel(
    part_ptr,  # [B*C, NCHUNK, 3] fp32 partial sums
    w_ptr,     # [B] fp32 per-sample weight (read only if HAS_WEIGHT)
    sums_ptr,  # [3, B*C] fp32 out: sums of p*g, p (p²), g (g²)
    loss_ptr,  # [B, C - C0] fp32 out (REDUCTION none) or [] fp32 out
    ROWS, C, C0, NCHUNK, smooth_nr, smooth_dr, scale,
    HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < ROWS
        s_pg = tl.zeros([BLOCK_R], dtype=tl.float32)
        s_p = tl.zeros([BLOCK_R], dtype=tl.float32)
        s_g = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, NCHUNK, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = rmask[:, None] & (ks < NCHUNK)[None, :]
            ptrs = part_ptr + (rows[:, None] * NCHUNK + ks[None, :]) * 3
            s_pg += tl.sum(tl.load(ptrs, mask=m, other=0.0), axis=1)
            s_p += tl.sum(tl.load(ptrs + 1, mask=m, other=0.0), axis=1)
            s_g += tl.sum(tl.load(ptrs + 2, mask=m, other=0.0), axis=1)
        tl.store(sums_ptr + rows, s_pg, mask=rmask)
        tl.store(sums_ptr + ROWS + rows, s_p, mask=rmask)
        tl.store(sums_ptr + 2 * ROWS + rows, s_g, mask=rmask)
        dice = 1.0 - (2.0 * s_pg + smooth_nr) / (s_p + s_g + smooth_dr)
        b = rows // C
        c = rows % C
        if HAS_WEIGHT:
            dice = dice * tl.load(w_ptr + b, mask=rmask, other=0.0)
        keep = rmask & (c >= C0)
        if REDUCTION == 0:
            tl.store(loss_ptr + b * (C - C0) + (c - C0), dice, mask=keep)
        else:
            total += tl.where(keep, dice, 0.0)
    if REDUCTION != 0:
        tl.store(loss_ptr, tl.sum(total, axis=0) * scale)


@triton.jit
def _dice_bwd_kernel(
    x_ptr,     # [B, C, S] logits (fp32 / fp16 / bf16)
    g_ptr,     # [B, C, S] target (fp32 / fp16 / bf16 / uint8)
    w_ptr,     # [B] fp32 per-sample weight (read only if HAS_WEIGHT)
    sums_ptr,  # [3, B*C] fp32 sums saved by the forward
    go_ptr,    # [B, C - C0] fp32 upstream grad (REDUCTION none) or [] fp32
    dx_ptr,    # [B, C, S] out: dL/dx in the logits' dtype
    S, CP, C, C0, smooth_nr, smooth_dr, scale,
    ACT: tl.constexpr, SQUARED: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    ROWS = tl.num_programs(1) * CP
    row0 = tl.program_id(1).to(tl.int64) * CP
    cs = tl.arange(0, C_PAD)
    cmask = cs < CP
    rows = row0 + cs
    b = rows // C
    c = rows % C
    keep = cmask & (c >= C0)
    # Per-row coefficients: dL/dp = A * g + Bq * dP/dp with K = dL/d dice, N, D of the dice ratio.
    if REDUCTION == 0:
        k = tl.load(go_ptr + b * (C - C0) + (c - C0), mask=keep, other=0.0)
    else:
        k = tl.where(keep, tl.load(go_ptr) * scale, 0.0)
    if HAS_WEIGHT:
        k = k * tl.load(w_ptr + b, mask=cmask, other=0.0)
    s_pg = tl.load(sums_ptr + rows, mask=cmask, other=0.0)
    s_p = tl.load(sums_ptr + ROWS + rows, mask=cmask, other=0.0)
    s_g = tl.load(sums_ptr + 2 * ROWS + rows, mask=cmask, other=0.0)
    den = s_p + s_g + smooth_dr
    coef_a = -2.0 * k / den
    coef_b = k * (2.0 * s_pg + smooth_nr) / (den * den)

    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cmask[:, None] & (offs < S)[None, :]
    ptrs = rows[:, None] * S + offs[None, :]
    x = tl.load(x_ptr + ptrs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + ptrs, mask=m, other=0).to(tl.float32)
    p = _activation(x, m, ACT)
    if SQUARED:
        dp = coef_a[:, None] * g + coef_b[:, None] * (2.0 * p)
    else:
        dp = coef_a[:, None] * g + coef_b[:, None]
    if ACT == 0:
        dx = dp * p * (1.0 - p)
    elif ACT == 1:
        dpm = tl.where(m, dp, 0.0)
        dx = p * (dpm - tl.sum(p * dpm, axis=0)[None, :])
    else:
        dx = dp
    tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _layout(x: torch.Tensor, act: int) -> tuple[int, int, int, int]:
    """(rows per program CP, number of row groups, C_PAD, BLOCK pixels)."""
    B, C, _ = x.shape
    cp = C if act == ACT_SOFTMAX else 1
    c_pad = triton.next_power_of_2(cp)
    block = max(16, TILE // c_pad)
    return cp, (B * C) // cp, c_pad, block


def weighted_dice_forward(x, g, weight, sums, loss, act, c0, squared, smooth_nr, smooth_dr, reduction):
    """x, g: [B, C, S] contiguous; weight: [B] fp32 or None; writes sums [3, B, C] and loss."""
    B, C, S = x.shape
    cp, groups, c_pad, block = _layout(x, act)
    target = max(1, PROGRAMS_PER_SM * _num_sms(x.device) // groups)
    n_chunks = max(1, min(target, triton.cdiv(S, block)))
    chunk = triton.cdiv(triton.cdiv(S, n_chunks), block) * block
    n_chunks = triton.cdiv(S, chunk)
    partials = torch.empty(B * C, n_chunks, 3, dtype=torch.float32, device=x.device)
    _dice_fwd_partial_kernel[(n_chunks, groups)](
        x, g, partials, S, cp, n_chunks, chunk,
        ACT=act, SQUARED=bool(squared), C_PAD=c_pad, BLOCK=block, num_warps=4,
    )
    kept = B * (C - c0)
    scale = 1.0 / kept if reduction == RED_MEAN else 1.0
    w = weight if weight is not None else sums  # dummy pointer, never read
    _dice_fwd_finalize_kernel[(1,)](
        partials, w, sums, loss, B * C, C, c0, n_chunks, float(smooth_nr), float(smooth_dr), scale,
        HAS_WEIGHT=weight is not None, REDUCTION=reduction, BLOCK_R=FINAL_ROWS, BLOCK_K=FINAL_CHUNKS,
        num_warps=4,
    )


def weighted_dice_backward(grad, x, g, weight, sums, dx, act, c0, squared, smooth_nr, smooth_dr, reduction):
    """grad: upstream grad of the loss (fp32); writes dx [B, C, S] (x's dtype)."""
    B, C, S = x.shape
    cp, groups, c_pad, block = _layout(x, act)
    scale = 1.0 / (B * (C - c0)) if reduction == RED_MEAN else 1.0
    w = weight if weight is not None else sums  # dummy pointer, never read
    _dice_bwd_kernel[(triton.cdiv(S, block), groups)](
        x, g, w, sums, grad, dx, S, cp, C, c0, float(smooth_nr), float(smooth_dr), scale,
        ACT=act, SQUARED=bool(squared), HAS_WEIGHT=weight is not None, REDUCTION=reduction,
        C_PAD=c_pad, BLOCK=block, num_warps=4,
    )
