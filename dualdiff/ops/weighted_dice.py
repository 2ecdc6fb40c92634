"""Per-sample weighted soft Dice loss, fused.

For logits ``x`` of shape ``[B, C, *spatial]`` and a target ``g`` of the same shape::

    p        = sigmoid(x) | softmax(x, dim=1) | x          (activation)
    I[b, c]  = sum_s p * g
    P[b, c]  = sum_s p        (squared_pred: sum_s p**2)
    G[b, c]  = sum_s g        (squared_pred: sum_s g**2)
    dice     = 1 - (2 * I + smooth_nr) / (P + G + smooth_dr)
    w[b, c]  = weight[b] ([B] weight) | weight[b, c] ([B, C] weight) | 1 (no weight)
    loss     = reduce_{b, c >= c0} w[b, c] * dice[b, c]     (c0 = 0, or 1 without background)

reduction "mean" | "sum" | "none" (-> ``[B, C - c0]``). A ``[B, C]`` weight indexes all C
channels, also without background (its column 0 is then unused). With ``weight=None`` this is
MONAI's ``DiceLoss(sigmoid=..., softmax=..., include_background=..., squared_pred=...,
smooth_nr=..., smooth_dr=..., reduction=...)``. The gradient flows to ``input`` and, when it
requires grad, to ``weight`` (``dL/dw[b, c] = dL/dloss[b, c] * dice[b, c]``, summed over c for
a ``[B]`` weight; zero in the unused background column).

Fused plan (triton / cuda / cpp): the forward is one pass over logits and target that
accumulates per-(b, c) partial sums of p*g, p (or p²), g (or g²) over spatial chunks, then a
tiny deterministic second stage that adds the partials in a fixed order and computes the loss
on the device (no host sync). The backward is one elementwise pass that recomputes p from the
logits and uses the saved per-(b, c) sums; p is never stored. The cpp and cuda kernels share
their element math (csrc/weighted_dice_math.h). GPU launches run on the tensors' device and its
current stream, whatever the current device.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from dualdiff._backend import (
    DTYPE_CODES,
    cuda_stream,
    device_guard,
    extension,
    forced_backend,
    select_backend,
    select_by_size,
)
from dualdiff.ops._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_same_device,
    check_same_shape,
    check_tensor,
)

__all__ = ["weighted_dice_loss", "weighted_dice_loss_reference", "auto_backend"]

ACTIVATIONS = ("sigmoid", "softmax", "none")
REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
SUPPORTED = ("triton", "cuda", "cpp", "torch")
PREFER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

# Integer codes shared with kernels/weighted_dice.py and csrc/weighted_dice.{cpp,cu}.
ACT_CODES = {"sigmoid": 0, "softmax": 1, "none": 2}
RED_CODES = {"none": 0, "mean": 1, "sum": 2}
CUDA_SOFTMAX_MAX_C = 32     # the cuda kernels' largest softmax channel bucket
TRITON_SOFTMAX_MAX_C = 256  # kernels/weighted_dice.py MAX_SOFTMAX_C (one C-wide tile per program)
CUDA_CHUNK_TILE = 1024      # pixels per cuda forward block iteration (256 threads x 4)
_SOFTMAX_MAX_C = {"cuda": CUDA_SOFTMAX_MAX_C, "triton": TRITON_SOFTMAX_MAX_C}

# auto's size rule (dualdiff._backend.select_by_size): below AUTO_MIN_NUMEL[device][backend]
# input elements (B * C * spatial) auto runs the torch reference instead; 0 = always fused.
# Forced backends are never overridden.
# CPU: no crossover found, so always cpp. Measured 2026-12-07 on the 2-core AMD EPYC (Zen 5),
# 1 torch thread, sigmoid + squared_pred with a [B, C] weight, forward + backward plus the
# no-grad forward of the tadiff loss, cpp vs torch alternating, median of 15-25 rounds
# (t_torch / t_cpp): 16 el. 8.4x, 512 el. 2.65x / 3.5x, 4096 el. 2.64x, 8192 el. 2.6x,
# 32768 el. (the tadiff tiny step's [8, 4, 32, 32]) 2.74x / 2.56x, 262144 el. 3.5x,
# 2359296 el. (tadiff default [16, 4, 192, 192]) 6.2x. With 2 threads on the loaded machine the
# small sizes scattered from 0.2x to 2.5x between repeats (the kernels' OpenMP region waits for
# a descheduled thread; ATen's small ops stay single-threaded): not a stable crossover.
AUTO_MIN_NUMEL_CPU = 0
AUTO_MIN_NUMEL_CUDA = 0  # unmeasured on a GPU: always fused (measure with benchmarks/bench_weighted_dice.py)
AUTO_MIN_NUMEL = {"cpu": {"cpp": AUTO_MIN_NUMEL_CPU},
                  "cuda": {"triton": AUTO_MIN_NUMEL_CUDA, "cuda": AUTO_MIN_NUMEL_CUDA}}


# ----------------------------------------------------------------------------- reference
def weighted_dice_loss_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    activation: str = "sigmoid",
    include_background: bool = True,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    reduction: str = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """The specification in plain PyTorch. ``upcast=False`` computes in the input's dtype
    (the "plain PyTorch in low precision" baseline of the tests); the default computes in fp32
    and returns an fp32 loss, like the fused backends."""
    x = input.float() if upcast else input
    if activation == "sigmoid":
        p = torch.sigmoid(x)
    elif activation == "softmax":
        p = torch.softmax(x, dim=1)
    else:
        p = x
    g = target.to(p.dtype)
    c0 = _c0(p.shape[1], include_background)
    p, g = p[:, c0:], g[:, c0:]
    dims = tuple(range(2, p.dim()))
    inter = (p * g).sum(dims)
    psum = (p * p).sum(dims) if squared_pred else p.sum(dims)
    gsum = (g * g).sum(dims) if squared_pred else g.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth_nr) / (psum + gsum + smooth_dr)
    if weight is not None:
        dice = dice * _weight_for_dice(weight.to(dice.dtype), c0)
    if reduction == "mean":
        return dice.mean()
    if reduction == "sum":
        return dice.sum()
    return dice


# ----------------------------------------------------------------------------- backends
def _c0(C: int, include_background: bool) -> int:
    return 0 if include_background or C == 1 else 1


def _weight_for_dice(weight: torch.Tensor, c0: int) -> torch.Tensor:
    """A [B] or [B, C] weight as a factor of the [B, C - c0] dice: [B, 1] or [B, C - c0]."""
    return weight[:, None] if weight.dim() == 1 else weight[:, c0:]


def _loss_shape(B: int, C: int, c0: int, reduction: str) -> tuple[int, ...]:
    return (B, C - c0) if reduction == "none" else ()


def _torch_sums(x, g, activation, squared_pred):
    """[3, B, C] fp32 sums of p*g, p (or p²), g (or g²) over the spatial axis of [B, C, S]."""
    x = x.float()
    p = torch.sigmoid(x) if activation == "sigmoid" else torch.softmax(x, 1) if activation == "softmax" else x
    g = g.float()
    return torch.stack(
        [(p * g).sum(2), (p * p).sum(2) if squared_pred else p.sum(2), (g * g).sum(2) if squared_pred else g.sum(2)]
    )


def _dice_from_sums(sums, weight, c0, smooth_nr, smooth_dr):
    """[B, C - c0] weighted dice (fp32) from [3, B, C] sums."""
    inter, psum, gsum = sums[0, :, c0:], sums[1, :, c0:], sums[2, :, c0:]
    dice = 1.0 - (2.0 * inter + smooth_nr) / (psum + gsum + smooth_dr)
    return dice if weight is None else dice * _weight_for_dice(weight.float(), c0)


def _forward_torch(x, g, weight, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    sums = _torch_sums(x, g, activation, squared_pred)
    d = _dice_from_sums(sums, weight, c0, smooth_nr, smooth_dr)
    loss = d.mean() if reduction == "mean" else d.sum() if reduction == "sum" else d
    return loss.contiguous(), sums


def _backward_torch(grad, x, g, weight, sums, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, S = x.shape
    xf = x.float()
    p = torch.sigmoid(xf) if activation == "sigmoid" else torch.softmax(xf, 1) if activation == "softmax" else xf
    coef_a, coef_b = _coefficients(grad, weight, sums, c0, smooth_nr, smooth_dr, reduction)
    dp = coef_a[:, :, None] * g.float() + coef_b[:, :, None] * (2.0 * p if squared_pred else 1.0)
    if activation == "sigmoid":
        dx = dp * p * (1.0 - p)
    elif activation == "softmax":
        dx = p * (dp - (p * dp).sum(1, keepdim=True))
    else:
        dx = dp
    return dx.to(x.dtype)


def _coefficients(grad, weight, sums, c0, smooth_nr, smooth_dr, reduction):
    """dL/dp = A[b, c] * g + Bq[b, c] * dP/dp, with A = -2K/D, Bq = K*N/D², K = dL/d dice."""
    _, B, C = sums.shape
    k = torch.zeros(B, C, dtype=torch.float32, device=sums.device)
    if reduction == "none":
        k[:, c0:] = grad.float()
    else:
        k[:, c0:] = grad.float() / (B * (C - c0) if reduction == "mean" else 1.0)
    if weight is not None:
        k = k * (weight.float()[:, None] if weight.dim() == 1 else weight.float())
    num = 2.0 * sums[0] + smooth_nr
    den = sums[1] + sums[2] + smooth_dr
    return -2.0 * k / den, k * num / (den * den)


def _target_for_kernel(g: torch.Tensor) -> torch.Tensor:
    return g.view(torch.uint8) if g.dtype == torch.bool else g


def _weight_args(weight: Optional[torch.Tensor]) -> tuple[int, bool]:
    """(data pointer or 0, per-channel flag) of a [B] / [B, C] fp32 weight for dualdiff._C."""
    return (0, False) if weight is None else (weight.data_ptr(), weight.dim() == 2)


def _forward_triton(x, g, weight, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    from dualdiff.kernels.weighted_dice import weighted_dice_forward

    B, C, _ = x.shape
    loss = torch.empty(_loss_shape(B, C, c0, reduction), dtype=torch.float32, device=x.device)
    sums = torch.empty(3, B, C, dtype=torch.float32, device=x.device)
    weighted_dice_forward(x, _target_for_kernel(g), weight, sums, loss, ACT_CODES[activation], c0,
                          squared_pred, smooth_nr, smooth_dr, RED_CODES[reduction])
    return loss, sums


def _backward_triton(grad, x, g, weight, sums, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    from dualdiff.kernels.weighted_dice import weighted_dice_backward

    dx = torch.empty_like(x)
    weighted_dice_backward(grad.float().contiguous(), x, _target_for_kernel(g), weight, sums, dx, ACT_CODES[activation],
                           c0, squared_pred, smooth_nr, smooth_dr, RED_CODES[reduction])
    return dx


def _cpp_inputs(x, g):
    """The cpp kernels take fp32 logits and fp32 or uint8 targets: upcast the rest."""
    xf = x.float() if x.dtype != torch.float32 else x
    gk = _target_for_kernel(g)
    if gk.dtype not in (torch.float32, torch.uint8):
        gk = gk.float()
    return xf, gk


def _forward_cpp(x, g, weight, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, S = x.shape
    xf, gk = _cpp_inputs(x, g)
    loss = torch.empty(_loss_shape(B, C, c0, reduction), dtype=torch.float32)
    sums = torch.empty(3, B, C, dtype=torch.float32)
    extension().weighted_dice_fwd_cpu(
        xf.data_ptr(), gk.data_ptr(), DTYPE_CODES[gk.dtype], *_weight_args(weight),
        sums.data_ptr(), loss.data_ptr(), B, C, S, ACT_CODES[activation], squared_pred, c0,
        float(smooth_nr), float(smooth_dr), RED_CODES[reduction])
    return loss, sums


def _backward_cpp(grad, x, g, weight, sums, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, S = x.shape
    xf, gk = _cpp_inputs(x, g)
    grad = grad.float().contiguous()
    dx = torch.empty_like(xf)
    extension().weighted_dice_bwd_cpu(
        xf.data_ptr(), gk.data_ptr(), DTYPE_CODES[gk.dtype], *_weight_args(weight),
        sums.data_ptr(), grad.data_ptr(), dx.data_ptr(), B, C, S, ACT_CODES[activation], squared_pred, c0,
        float(smooth_nr), float(smooth_dr), RED_CODES[reduction])
    return dx.to(x.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cuda_chunks(groups: int, S: int, sms: int) -> tuple[int, int]:
    """(n_chunks, chunk) of the cuda forward for ``groups`` row groups of S pixels on ``sms``
    SMs: about 4 blocks per SM; n_chunks <= 4 * sms (it is gridDim.y: <= 65535 for any GPU),
    chunk a multiple of CUDA_CHUNK_TILE, n_chunks * chunk >= S. The grids themselves are
    dualdiff._C.weighted_dice_cuda_grid (csrc/weighted_dice_math.h)."""
    n = max(1, min(_cdiv(4 * sms, groups), _cdiv(S, CUDA_CHUNK_TILE)))
    chunk = _cdiv(_cdiv(S, n), CUDA_CHUNK_TILE) * CUDA_CHUNK_TILE
    return _cdiv(S, chunk), chunk


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_cuda(x, g, weight, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, S = x.shape
    gk = _target_for_kernel(g)
    groups = B if activation == "softmax" else B * C
    n_chunks, chunk = cuda_chunks(groups, S, _num_sms(x.device))
    partials = torch.empty(B * C, n_chunks, 3, dtype=torch.float32, device=x.device)
    loss = torch.empty(_loss_shape(B, C, c0, reduction), dtype=torch.float32, device=x.device)
    sums = torch.empty(3, B, C, dtype=torch.float32, device=x.device)
    extension().weighted_dice_fwd_cuda(
        x.data_ptr(), DTYPE_CODES[x.dtype], gk.data_ptr(), DTYPE_CODES[gk.dtype],
        *_weight_args(weight), partials.data_ptr(), n_chunks, chunk,
        sums.data_ptr(), loss.data_ptr(), B, C, S, ACT_CODES[activation], squared_pred, c0,
        float(smooth_nr), float(smooth_dr), RED_CODES[reduction], cuda_stream(x.device))
    return loss, sums


def _backward_cuda(grad, x, g, weight, sums, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, S = x.shape
    gk = _target_for_kernel(g)
    grad = grad.float().contiguous()
    dx = torch.empty_like(x)
    extension().weighted_dice_bwd_cuda(
        x.data_ptr(), DTYPE_CODES[x.dtype], gk.data_ptr(), DTYPE_CODES[gk.dtype],
        *_weight_args(weight), sums.data_ptr(), grad.data_ptr(), dx.data_ptr(),
        B, C, S, ACT_CODES[activation], squared_pred, c0, float(smooth_nr), float(smooth_dr),
        RED_CODES[reduction], cuda_stream(x.device))
    return dx


_FORWARD = {"torch": _forward_torch, "triton": _forward_triton, "cpp": _forward_cpp, "cuda": _forward_cuda}
_BACKWARD = {"torch": _backward_torch, "triton": _backward_triton, "cpp": _backward_cpp, "cuda": _backward_cuda}


# Triton and dualdiff._C launch on the current device (Triton with that device's current stream),
# so every launch runs under device_guard(x.device): tensors on cuda:1 need cuda:1 current.
def _forward(backend, x, g, weight, *cfg):
    """(loss, sums) on ``backend``, launched on x's device."""
    with device_guard(x.device):
        return _FORWARD[backend](x, g, weight, *cfg)


def _backward_input(backend, grad, x, g, weight, sums, *cfg):
    """dL/dx on ``backend``, launched on x's device."""
    with device_guard(x.device):
        return _BACKWARD[backend](grad, x, g, weight, sums, *cfg)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dualdiff::weighted_dice_loss", mutates_args=())
def _weighted_dice_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    backend: str,
    activation: str,
    c0: int,
    squared_pred: bool,
    smooth_nr: float,
    smooth_dr: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input, target: [B, C, S] contiguous; weight: [B] or [B, C] fp32 or None. Returns (loss, sums [3, B, C])."""
    return _forward(backend, input, target, weight, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction)


@_weighted_dice_op.register_fake
def _(input, target, weight, backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    B, C, _ = input.shape
    loss = input.new_empty(_loss_shape(B, C, c0, reduction), dtype=torch.float32)
    return loss, input.new_empty((3, B, C), dtype=torch.float32)


@torch.library.custom_op("dualdiff::weighted_dice_loss_backward", mutates_args=())
def _weighted_dice_backward_op(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    sums: torch.Tensor,
    backend: str,
    activation: str,
    c0: int,
    squared_pred: bool,
    smooth_nr: float,
    smooth_dr: float,
    reduction: str,
) -> torch.Tensor:
    """dL/d input ([B, C, S], input's dtype) from the upstream grad of the loss and the saved sums."""
    return _backward_input(backend, grad, input, target, weight, sums, activation, c0, squared_pred,
                           smooth_nr, smooth_dr, reduction)


@_weighted_dice_backward_op.register_fake
def _(grad, input, target, weight, sums, backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
    return torch.empty_like(input)


def _weight_grad(grad_loss, sums, weight, c0, smooth_nr, smooth_dr, reduction):
    """dL/dw: dL/dloss[b, c] * dice[b, c] (a [B, C] computation on the saved sums), summed over c
    for a [B] weight; for a [B, C] weight the dropped background column gets 0."""
    dice = _dice_from_sums(sums, None, c0, smooth_nr, smooth_dr)
    gd = grad_loss * dice
    if reduction == "mean":
        gd = gd / dice.numel()
    if weight.dim() == 1:
        return gd.sum(1).to(weight.dtype)
    return torch.nn.functional.pad(gd, (c0, 0)).to(weight.dtype)


def _setup_context(ctx, inputs, output):
    input, target, weight, backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction = inputs
    _, sums = output
    ctx.save_for_backward(input, target, weight, sums)
    ctx.cfg = (backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction)


def _backward(ctx, grad_loss, grad_sums):
    input, target, weight, sums = ctx.saved_tensors
    backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction = ctx.cfg
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = _weighted_dice_backward_op(grad_loss, input, target, weight, sums, backend, activation,
                                                c0, squared_pred, smooth_nr, smooth_dr, reduction)
    if weight is not None and ctx.needs_input_grad[2]:
        grad_weight = _weight_grad(grad_loss, sums, weight, c0, smooth_nr, smooth_dr, reduction)
    return grad_input, None, grad_weight, None, None, None, None, None, None, None


_weighted_dice_op.register_autograd(_backward, setup_context=_setup_context)


class _WeightedDiceEager(torch.autograd.Function):
    """Eager fast path: the same launchers and the same backward as the custom op, without the
    custom-op dispatch layers (about 30-60 µs per forward+backward on the CPU, which is a third
    of this op's time at small sizes). Under torch.compile the custom op is used instead."""

    @staticmethod
    def forward(ctx, input, target, weight, backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction):
        loss, sums = _forward(backend, input, target, weight, activation, c0, squared_pred, smooth_nr,
                              smooth_dr, reduction)
        ctx.save_for_backward(input, target, weight, sums)
        ctx.cfg = (backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, weight, sums = ctx.saved_tensors
        backend, activation, c0, squared_pred, smooth_nr, smooth_dr, reduction = ctx.cfg
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = _backward_input(backend, grad_loss, input, target, weight, sums, activation, c0,
                                         squared_pred, smooth_nr, smooth_dr, reduction)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_weight = _weight_grad(grad_loss, sums, weight, c0, smooth_nr, smooth_dr, reduction)
        return grad_input, None, grad_weight, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def auto_backend(numel: int, device: torch.device | str, activation: str = "sigmoid", channels: int = 1) -> str:
    """The backend :func:`weighted_dice_loss` runs (``DUALDIFF_BACKEND`` honoured, else auto's
    choice) for an input of ``numel`` elements and ``channels`` channels on ``device``."""
    device = torch.device(device)
    chosen = select_by_size(select_backend("weighted_dice_loss", device, SUPPORTED, PREFER, None),
                            device, None, numel, AUTO_MIN_NUMEL)
    if activation == "softmax" and channels > _SOFTMAX_MAX_C.get(chosen, channels) and forced_backend() is None:
        chosen = "torch"
    return chosen


def weighted_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    activation: str = "sigmoid",
    include_background: bool = True,
    squared_pred: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-sample weighted soft Dice loss (fused; see the module docstring for the formula).

    Args:
        input: logits ``[B, C, *spatial]`` (2-D or 3-D spatial, or any number >= 1 of spatial
            dims), float32, bfloat16 or float16. Non-contiguous input is copied.
        target: same shape; float32/float16/bfloat16, bool or uint8 (values used as numbers).
        weight: ``[B]`` per-sample weights (e.g. λ(t_b)), ``[B, C]`` per sample and channel
            (``weight[b, c]`` scales ``dice[b, c]``; it indexes all C channels, also with
            ``include_background=False``, whose column 0 is then unused), or None (all ones).
            Floating (fp32/bf16/fp16; used in fp32), on input's device. If it requires grad,
            it gets ``dL/dweight``.
        activation: "sigmoid" | "softmax" (over C; needs C >= 2) | "none".
        include_background: False drops channel 0 from the loss (ignored when C == 1, as MONAI
            does, with a warning).
        squared_pred: use sums of p² and g² in the denominator.
        smooth_nr, smooth_dr: added to numerator and denominator.
        reduction: "mean" | "sum" over (b, c), or "none" -> ``[B, C']`` (C' = C - 1 without
            background).
        backend: force "triton" | "cuda" | "cpp" | "torch" (default: ``DUALDIFF_BACKEND`` or
            the fastest for the device).

    Returns:
        The loss in float32 (for every input dtype; the kernels accumulate in fp32). The
        gradient w.r.t. ``input`` has the input's dtype. The cpp backend upcasts bf16/fp16
        logits (and bf16/fp16 targets) to fp32 before its kernels.

    With ``weight=None`` this equals ``monai.losses.DiceLoss`` with the same flags (MONAI
    returns ``[B, C', 1, ...]`` for reduction "none"; here ``[B, C']``).
    """
    check_tensor("input", input, dtypes=FLOAT_DTYPES, min_ndim=3)
    check_tensor("target", target, dtypes=TARGET_DTYPES)
    check_same_shape("input", input, "target", target)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    B, C = input.shape[0], input.shape[1]
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES)
        if tuple(weight.shape) not in ((B,), (B, C)):
            raise ValueError(f"weight must have shape [B] = ({B},) (per sample) or [B, C] = ({B}, {C}) (per sample "
                             f"and channel, all C channels even without background), got {tuple(weight.shape)}")
    device = check_same_device({"input": input, "target": target, "weight": weight})
    for name, v in (("smooth_nr", smooth_nr), ("smooth_dr", smooth_dr)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if activation == "softmax" and C == 1:
        raise ValueError("activation='softmax' needs input with C >= 2 channels (softmax over one channel "
                         "is constant 1); use activation='sigmoid'")
    if not include_background and C == 1:
        warnings.warn("single channel prediction, include_background=False ignored (as in MONAI)", stacklevel=2)
    c0 = _c0(C, include_background)
    chosen = select_by_size(select_backend("weighted_dice_loss", device, SUPPORTED, PREFER, backend),
                            device, backend, input.numel(), AUTO_MIN_NUMEL)
    if activation == "softmax" and C > _SOFTMAX_MAX_C.get(chosen, C):
        if backend not in (None, "auto") or forced_backend() is not None:
            raise ValueError(f"input: the {chosen} backend supports softmax over at most "
                             f"{_SOFTMAX_MAX_C[chosen]} channels, got C={C}; use the torch backend")
        chosen = "torch"  # auto: the reference handles any channel count
    x = input.contiguous().view(B, C, -1)
    g = target.contiguous().view(B, C, -1)
    w = None if weight is None else weight.float().contiguous()
    args = (x, g, w, chosen, activation, c0, bool(squared_pred), float(smooth_nr), float(smooth_dr), reduction)
    if torch.compiler.is_compiling():
        return _weighted_dice_op(*args)[0]
    return _WeightedDiceEager.apply(*args)
