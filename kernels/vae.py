"""Triton kernels of the fused VAE loss (reconstruction + Gaussian KL) and of gaussian_kl.

Forward: two launches.
  1. ``_vae_fwd_partials_kernel``: programs [0, P_r) reduce the reconstruction term over a
     grid-stride share of the N image elements, programs [P_r, P_r + P_k) reduce the KL term
     over a share of the M = B * latent latent elements; each writes one fp32 partial sum.
  2. ``_vae_fwd_finalize_kernel`` (one program): sums the partials in a fixed order
     (deterministic), scales them and writes total, recon and kl. No host synchronisation.
Backward: one launch, ``_vae_bwd_kernel``: programs [0, G_r) write d/d recon_logits
elementwise, programs [G_r, G_r + G_k) write d/d mu and d/d logvar. The upstream gradients
arrive as 0-d fp32 tensors and are read on the device.

All arithmetic is fp32 (inputs are loaded and upcast explicitly; the Triton interpreter
has no bf16 arithmetic).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

RECON_BLOCK = 2048   # image elements per program and loop step (forward and backward)
LATENT_BLOCK = 1024  # latent elements per program and loop step
MAX_PARTIALS = 1024  # cap on the number of forward programs per term (persistent grid-stride)
FINAL_BLOCK = 1024   # partials summed per step by the finalize program
NUM_WARPS = 8


MAX_GRID_X = 2**31 - 1  # CUDA limit of grid axis 0 (the only axis used)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain ints: Triton's host helpers cost microseconds per call


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: every program is a Python loop
    return min(MAX_PARTIALS, 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()))


def forward_grid(n: int, m: int, max_programs: int) -> tuple[int, int]:
    """(P_r, P_k): forward programs for the n image elements (0: KL only) and the m latent
    elements, each at most ``max_programs`` (grid-stride loops cover the rest)."""
    p_r = min(max_programs, _cdiv(n, RECON_BLOCK)) if n else 0
    return p_r, min(max_programs, _cdiv(m, LATENT_BLOCK))


def backward_grid(n: int, m: int) -> tuple[int, int]:
    """(G_r, G_k): backward programs, one per RECON_BLOCK image / LATENT_BLOCK latent elements;
    raises ValueError past the grid limit (n > ~4e12 elements)."""
    g_r, g_k = _cdiv(n, RECON_BLOCK), _cdiv(m, LATENT_BLOCK)
    if g_r + g_k > MAX_GRID_X:
        raise ValueError(f"vae_loss: {n} image and {m} latent elements need {g_r + g_k} programs, "
                         f"over the CUDA grid limit {MAX_GRID_X}")
    return g_r, g_k


@triton.jit
def _recon_terms(l, x, MSE: tl.constexpr):
    """Per-element reconstruction loss from fp32 logits l and targets x."""
    if MSE:
        s = 1.0 / (1.0 + tl.exp(-l))
        d = s - x
        return d * d
    # BCE(sigmoid(l), x) = max(l, 0) - l * x + log(1 + exp(-|l|))  (softplus form, stable)
    return tl.maximum(l, 0.0) - l * x + tl.log(1.0 + tl.exp(-tl.abs(l)))


@triton.jit
def _vae_fwd_partials_kernel(
    logits_ptr,   # [N] recon_logits, flattened (fp32 / fp16 / bf16)
    x_ptr,        # [N] targets x, flattened (same dtype as logits)
    mu_ptr,       # [M] mu, flattened [B, latent]
    logvar_ptr,   # [M] logvar, flattened [B, latent]
    partial_ptr,  # [P_r + P_k] fp32 out: recon partial sums, then KL partial sums
    N, M, P_r, P_k,
    recon_iters, latent_iters,
    MSE: tl.constexpr, BLOCK: tl.constexpr, LBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # (each branch uses its own names: Triton merges same-named values across the branches)
    if pid < P_r:
        r_offs0 = tl.arange(0, BLOCK).to(tl.int64)
        r_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, recon_iters):
            r_offs = (pid + i * P_r).to(tl.int64) * BLOCK + r_offs0
            r_mask = r_offs < N
            l = tl.load(logits_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
            r_acc += tl.where(r_mask, _recon_terms(l, x, MSE), 0.0)
        tl.store(partial_ptr + pid, tl.sum(r_acc, axis=0))
    else:
        k = pid - P_r
        k_offs0 = tl.arange(0, LBLOCK).to(tl.int64)
        k_acc = tl.zeros([LBLOCK], dtype=tl.float32)
        for j in range(0, latent_iters):
            k_offs = (k + j * P_k).to(tl.int64) * LBLOCK + k_offs0
            k_mask = k_offs < M
            mu = tl.load(mu_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
            lv = tl.load(logvar_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
            # -0.5 * (1 + logvar - mu^2 - exp(logvar)); zero at masked lanes (mu = lv = 0)
            k_acc += -0.5 * (1.0 + lv - mu * mu - tl.exp(lv))
        tl.store(partial_ptr + pid, tl.sum(k_acc, axis=0))


@triton.jit
def _vae_fwd_finalize_kernel(
    partial_ptr,  # [P_r + P_k] fp32 partial sums from _vae_fwd_partials_kernel
    total_ptr,    # [] fp32 out: recon + kl_weight * kl (unused when not HAS_RECON)
    recon_ptr,    # [] fp32 out: reconstruction loss (unused when not HAS_RECON)
    kl_ptr,       # [] fp32 out: KL term
    P_r, P_k, recon_scale, kl_scale, kl_weight,
    HAS_RECON: tl.constexpr, FBLOCK: tl.constexpr,
):
    offs0 = tl.arange(0, FBLOCK)
    acc_k = tl.zeros([FBLOCK], dtype=tl.float32)
    for start in range(0, P_k, FBLOCK):
        offs = start + offs0
        acc_k += tl.load(partial_ptr + P_r + offs, mask=offs < P_k, other=0.0)
    kl = tl.sum(acc_k, axis=0) * kl_scale
    tl.store(kl_ptr, kl)
    if HAS_RECON:
        acc_r = tl.zeros([FBLOCK], dtype=tl.float32)
        for start in range(0, P_r, FBLOCK):
            offs = start + offs0
            acc_r += tl.load(partial_ptr + offs, mask=offs < P_r, other=0.0)
        recon = tl.sum(acc_r, axis=0) * recon_scale
        tl.store(recon_ptr, recon)
        tl.store(total_ptr, recon + kl_weight * kl)


@triton.jit
def _vae_bwd_kernel(
    logits_ptr,    # [N] recon_logits, flattened
    x_ptr,         # [N] targets x, flattened
    glogits_ptr,   # [N] out: d loss / d recon_logits (dtype of logits)
    mu_ptr,        # [M] mu, flattened
    logvar_ptr,    # [M] logvar, flattened
    gmu_ptr,       # [M] out: d loss / d mu (dtype of mu)
    glogvar_ptr,   # [M] out: d loss / d logvar (dtype of logvar)
    gtotal_ptr,    # [] fp32 upstream gradient of total (unused when not HAS_RECON)
    grecon_ptr,    # [] fp32 upstream gradient of recon (unused when not HAS_RECON)
    gkl_ptr,       # [] fp32 upstream gradient of kl
    N, M, G_r, recon_scale, kl_scale, kl_weight,
    MSE: tl.constexpr, HAS_RECON: tl.constexpr, BLOCK: tl.constexpr, LBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    gkl = tl.load(gkl_ptr).to(tl.float32)
    gtotal = 0.0
    if HAS_RECON:
        gtotal = tl.load(gtotal_ptr).to(tl.float32)
        gkl = gkl + kl_weight * gtotal
    if pid < G_r:
        g_r = (tl.load(grecon_ptr).to(tl.float32) + gtotal) * recon_scale
        r_offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        r_mask = r_offs < N
        l = tl.load(logits_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r_offs, mask=r_mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-l))
        if MSE:
            d = 2.0 * (s - x) * s * (1.0 - s)
        else:
            d = s - x
        tl.store(glogits_ptr + r_offs, (d * g_r).to(glogits_ptr.dtype.element_ty), mask=r_mask)
    else:
        g_k = gkl * kl_scale
        k_offs = (pid - G_r).to(tl.int64) * LBLOCK + tl.arange(0, LBLOCK)
        k_mask = k_offs < M
        mu = tl.load(mu_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        lv = tl.load(logvar_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(gmu_ptr + k_offs, (mu * g_k).to(gmu_ptr.dtype.element_ty), mask=k_mask)
        tl.store(glogvar_ptr + k_offs, (0.5 * (tl.exp(lv) - 1.0) * g_k).to(glogvar_ptr.dtype.element_ty),
                 mask=k_mask)


def vae_loss_forward(recon_logits, x, mu, logvar, total, recon, kl, *,
                     recon_scale: float, kl_scale: float, kl_weight: float, mse: bool) -> None:
    """Write total, recon, kl ([] fp32). recon_logits / x may be None (KL only: gaussian_kl,
    then total and recon are ignored). All tensors contiguous on one device."""
    device = mu.device
    M = mu.numel()
    N = recon_logits.numel() if recon_logits is not None else 0
    p_r, p_k = forward_grid(N, M, _max_programs(device))
    partials = torch.empty(p_r + p_k, dtype=torch.float32, device=device)
    logits_arg = recon_logits if recon_logits is not None else mu
    x_arg = x if x is not None else mu
    _vae_fwd_partials_kernel[(p_r + p_k,)](
        logits_arg, x_arg, mu, logvar, partials, N, M, p_r, p_k,
        _cdiv(_cdiv(N, RECON_BLOCK), max(p_r, 1)),
        _cdiv(_cdiv(M, LATENT_BLOCK), p_k),
        MSE=mse, BLOCK=RECON_BLOCK, LBLOCK=LATENT_BLOCK, num_warps=NUM_WARPS,
    )
    has_recon = recon_logits is not None
    _vae_fwd_finalize_kernel[(1,)](
        partials, total if has_recon else kl, recon if has_recon else kl, kl,
        p_r, p_k, recon_scale, kl_scale, kl_weight,
        HAS_RECON=has_recon, FBLOCK=FINAL_BLOCK, num_warps=4,
    )


def vae_loss_backward(recon_logits, x, mu, logvar, g_total, g_recon, g_kl,
                      grad_logits, grad_mu, grad_logvar, *,
                      recon_scale: float, kl_scale: float, kl_weight: float, mse: bool) -> None:
    """Write grad_logits (unless recon_logits is None), grad_mu and grad_logvar.
    g_total / g_recon / g_kl are [] fp32 upstream gradients (g_total, g_recon None for KL only)."""
    M = mu.numel()
    has_recon = recon_logits is not None
    N = recon_logits.numel() if has_recon else 0
    g_r, g_k = backward_grid(N, M)
    _vae_bwd_kernel[(g_r + g_k,)](
        recon_logits if has_recon else mu, x if has_recon else mu,
        grad_logits if has_recon else grad_mu,
        mu, logvar, grad_mu, grad_logvar,
        g_total if has_recon else g_kl, g_recon if has_recon else g_kl, g_kl,
        N, M, g_r, recon_scale, kl_scale, kl_weight,
        MSE=mse, HAS_RECON=has_recon, BLOCK=RECON_BLOCK, LBLOCK=LATENT_BLOCK, num_warps=NUM_WARPS,
    )
