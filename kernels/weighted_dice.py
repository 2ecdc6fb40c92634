"""Triton kernels of the fused weighted Dice loss (see dualdiff/ops/weighted_dice.py).

Layout: logits and target are [B, C, S] contiguous; rows are the B*C (b, c) pairs. A program
covers ``CP`` consecutive rows -- a row group; CP = C for softmax, which needs all channels of a
pixel, CP = 1 otherwise -- and a part of the spatial axis. ``launch_plan`` (pure Python) gives
the grids: every axis stays within its limit (axis 0 < 2^31, axes 1-2 <= 65535) for any sizes,
the kernels loop (grid-stride) over what a capped axis leaves, and offsets are int64.

forward  = _dice_fwd_partial_kernel (grid (row groups, chunks): partial sums per row and chunk)
         + _dice_fwd_finalize_kernel (one program: adds partials in a fixed order -> sums, loss)
backward = _dice_bwd_kernel (grid (spatial tiles, row groups): elementwise, recomputes p)

Weight modes (constexpr WEIGHT): 0 none, 1 per sample ``w[b]``, 2 per sample and channel
``w[b, c]`` ([B, C] row-major over all C channels, so ``w[row]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACT_SIGMOID, ACT_SOFTMAX, ACT_NONE = 0, 1, 2
RED_NONE, RED_MEAN, RED_SUM = 0, 1, 2
TILE = 2048            # elements (channels x pixels) per program iteration
PROGRAMS_PER_SM = 8    # forward grid target
FINAL_ROWS = 64        # rows per finalize iteration
FINAL_CHUNKS = 32      # chunks per finalize iteration
MAX_SOFTMAX_C = 256    # softmax channels per program tile (C_PAD x 16 pixels in registers)
MAX_GRID_0 = 2**31 - 1  # CUDA grid limits: axis 0, and axes 1 and 2
MAX_GRID_12 = 65535


@dataclass(frozen=True)
class LaunchPlan:
    """Launch geometry of the three kernels for [B, C, S] input (see ``launch_plan``)."""

    cp: int                    # rows per program: C for softmax, else 1
    groups: int                # row groups, B*C // cp
    c_pad: int                 # next power of two >= cp
    block: int                 # pixels per tile
    n_chunks: int              # forward spatial chunks per row group
    chunk: int                 # pixels per forward chunk (a multiple of block)
    fwd_grid: tuple[int, int]  # (row groups [grid-stride], chunks)
    bwd_tiles: int             # spatial tiles of `block` pixels per row
    bwd_grid: tuple[int, int]  # (spatial tiles [grid-stride], row groups [grid-stride])


def launch_plan(B: int, C: int, S: int, act: int, sms: int) -> LaunchPlan:
    """Grids for B samples, C channels, S pixels, activation code ``act``, on ``sms`` SMs.

    The forward aims at PROGRAMS_PER_SM programs per SM; its chunk count is at most that
    target (<= 65535 for any GPU). Softmax needs C <= MAX_SOFTMAX_C (ValueError otherwise)."""
    if act == ACT_SOFTMAX and C > MAX_SOFTMAX_C:
        raise ValueError(f"input: the triton backend supports softmax over at most {MAX_SOFTMAX_C} channels, "
                         f"got C={C}; use the cpp or torch backend")
    cp = C if act == ACT_SOFTMAX else 1
    c_pad = triton.next_power_of_2(cp)
    block = max(16, TILE // c_pad)
    groups = B * C // cp
    target = max(1, PROGRAMS_PER_SM * sms // groups)
    n_chunks = max(1, min(target, triton.cdiv(S, block)))
    chunk = triton.cdiv(triton.cdiv(S, n_chunks), block) * block
    n_chunks = triton.cdiv(S, chunk)
    tiles = triton.cdiv(S, block)
    return LaunchPlan(cp=cp, groups=groups, c_pad=c_pad, block=block, n_chunks=n_chunks, chunk=chunk,
                      fwd_grid=(min(groups, MAX_GRID_0), n_chunks), bwd_tiles=tiles,
                      bwd_grid=(min(tiles, MAX_GRID_0), min(groups, MAX_GRID_12)))


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
    GROUPS, S, CP, NCHUNK, CHUNK,
    ACT: tl.constexpr, SQUARED: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(1)
    cs = tl.arange(0, C_PAD)
    cmask = cs < CP
    lo = chunk.to(tl.int64) * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    for grp in range(tl.program_id(0).to(tl.int64), GROUPS, tl.num_programs(0)):
        row0 = grp * CP
        base = (row0 + cs[:, None]) * S
        acc_pg = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
        acc_p = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
        acc_g = tl.zeros([C_PAD, BLOCK], dtype=tl.float32)
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
    w_ptr,     # [B] (WEIGHT 1) or [B, C] (WEIGHT 2) fp32 weight; never read if WEIGHT 0
    sums_ptr,  # [3, B*C] fp32 out: sums of p*g, p (p²), g (g²)
    loss_ptr,  # [B, C - C0] fp32 out (REDUCTION none) or [] fp32 out
    ROWS, C, C0, NCHUNK, smooth_nr, smooth_dr, scale,
    WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
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
        tl.store(sums_ptr + ROWS + ROWS + rows, s_g, mask=rmask)
        dice = 1.0 - (2.0 * s_pg + smooth_nr) / (s_p + s_g + smooth_dr)
        b = rows // C
        c = rows % C
        if WEIGHT == 1:
            dice = dice * tl.load(w_ptr + b, mask=rmask, other=0.0)
        elif WEIGHT == 2:
            dice = dice * tl.load(w_ptr + rows, mask=rmask, other=0.0)
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
    w_ptr,     # [B] (WEIGHT 1) or [B, C] (WEIGHT 2) fp32 weight; never read if WEIGHT 0
    sums_ptr,  # [3, B*C] fp32 sums saved by the forward
    go_ptr,    # [B, C - C0] fp32 upstream grad (REDUCTION none) or [] fp32
    dx_ptr,    # [B, C, S] out: dL/dx in the logits' dtype
    GROUPS, TILES, ROWS, S, CP, C, C0, smooth_nr, smooth_dr, scale,
    ACT: tl.constexpr, SQUARED: tl.constexpr, WEIGHT: tl.constexpr, REDUCTION: tl.constexpr,
    C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    cs = tl.arange(0, C_PAD)
    cmask = cs < CP
    for grp in range(tl.program_id(1).to(tl.int64), GROUPS, tl.num_programs(1)):
        rows = grp * CP + cs
        b = rows // C
        c = rows % C
        keep = cmask & (c >= C0)
        # Per-row coefficients: dL/dp = A * g + Bq * dP/dp with K = dL/d dice, N, D of the dice ratio.
        if REDUCTION == 0:
            k = tl.load(go_ptr + b * (C - C0) + (c - C0), mask=keep, other=0.0)
        else:
            k = tl.where(keep, tl.load(go_ptr) * scale, 0.0)
        if WEIGHT == 1:
            k = k * tl.load(w_ptr + b, mask=cmask, other=0.0)
        elif WEIGHT == 2:
            k = k * tl.load(w_ptr + rows, mask=cmask, other=0.0)
        s_pg = tl.load(sums_ptr + rows, mask=cmask, other=0.0)
        s_p = tl.load(sums_ptr + ROWS + rows, mask=cmask, other=0.0)
        s_g = tl.load(sums_ptr + ROWS + ROWS + rows, mask=cmask, other=0.0)
        den = s_p + s_g + smooth_dr
        coef_a = -2.0 * k / den
        coef_b = k * (2.0 * s_pg + smooth_nr) / (den * den)
        for tile in range(tl.program_id(0).to(tl.int64), TILES, tl.num_programs(0)):
            offs = tile * BLOCK + tl.arange(0, BLOCK)
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


def _weight_mode(weight: torch.Tensor | None) -> int:
    return 0 if weight is None else weight.dim()


def weighted_dice_forward(x, g, weight, sums, loss, act, c0, squared, smooth_nr, smooth_dr, reduction):
    """x, g: [B, C, S] contiguous; weight: [B] or [B, C] fp32 contiguous, or None; writes sums
    [3, B, C] and loss. Launches on the current device (the caller makes x's device current)."""
    B, C, S = x.shape
    plan = launch_plan(B, C, S, act, _num_sms(x.device))
    partials = torch.empty(B * C, plan.n_chunks, 3, dtype=torch.float32, device=x.device)
    _dice_fwd_partial_kernel[plan.fwd_grid](
        x, g, partials, plan.groups, S, plan.cp, plan.n_chunks, plan.chunk,
        ACT=act, SQUARED=bool(squared), C_PAD=plan.c_pad, BLOCK=plan.block, num_warps=4,
    )
    kept = B * (C - c0)
    scale = 1.0 / kept if reduction == RED_MEAN else 1.0
    w = weight if weight is not None else sums  # dummy pointer, never read
    _dice_fwd_finalize_kernel[(1,)](
        partials, w, sums, loss, B * C, C, c0, plan.n_chunks, float(smooth_nr), float(smooth_dr), scale,
        WEIGHT=_weight_mode(weight), REDUCTION=reduction, BLOCK_R=FINAL_ROWS, BLOCK_K=FINAL_CHUNKS,
        num_warps=4,
    )


def weighted_dice_backward(grad, x, g, weight, sums, dx, act, c0, squared, smooth_nr, smooth_dr, reduction):
    """grad: upstream grad of the loss (fp32); writes dx [B, C, S] (x's dtype). Launches on the
    current device (the caller makes x's device current)."""
    B, C, S = x.shape
    plan = launch_plan(B, C, S, act, _num_sms(x.device))
    scale = 1.0 / (B * (C - c0)) if reduction == RED_MEAN else 1.0
    w = weight if weight is not None else sums  # dummy pointer, never read
    _dice_bwd_kernel[plan.bwd_grid](
        x, g, w, sums, grad, dx, plan.groups, plan.bwd_tiles, B * C, S, plan.cp, C, c0,
        float(smooth_nr), float(smooth_dr), scale,
        ACT=act, SQUARED=bool(squared), WEIGHT=_weight_mode(weight), REDUCTION=reduction,
        C_PAD=plan.c_pad, BLOCK=plan.block, num_warps=4,
    )
