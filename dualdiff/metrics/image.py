"""Batched image and mask metrics on tensors: PSNR, SSIM, MAE, RAVD, Dice at a threshold.

Every function takes ``[B, ...]`` tensors and returns one value per sample (a float64
``Tensor[B]`` on the inputs' device), so callers average, plot or tabulate as they need.

* ``psnr``: ``10 log10(data_range² / mean((pred - target)²))`` per sample (``inf`` when equal),
  as ``skimage.metrics.peak_signal_noise_ratio``.
* ``ssim``: scikit-image's default SSIM (Wang et al. 2004) — a uniform 7x7 window, sample
  covariances (N / (N - 1)), K1 = 0.01, K2 = 0.03, the mean over the pixels whose window lies
  inside the image, averaged over channels — i.e. ``skimage.metrics.structural_similarity(
  p, t, data_range=..., channel_axis=0)`` for each ``[C, H, W]`` sample, computed in float64.
* ``mae``: mean absolute error per sample.
* ``ravd``: relative absolute volume difference ``|V_pred - V_true| / V_true`` of binary masks
  (0 when both are empty, ``inf`` when only the true mask is empty).
* ``dice_at_threshold``: Dice of ``prob > threshold`` against a binary target per sample
  (1 when both are empty).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "mae", "ravd", "dice_at_threshold", "image_metrics", "highpass_error", "active_units"]

_SSIM_WIN = 7
_K1, _K2 = 0.01, 0.03


def _check_pair(pred: torch.Tensor, target: torch.Tensor, *, ndim: int | None = None) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [B, ...] tensor, got shape {tuple(t.shape)}")
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D [B, C, H, W], got shape {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match pred shape {tuple(pred.shape)}")
    if pred.device != target.device:
        raise ValueError(f"pred is on {pred.device} but target is on {target.device}")


def _check_range(data_range: float) -> float:
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample of ``[B, ...]`` float tensors -> float64 ``[B]``."""
    _check_pair(pred, target)
    data_range = _check_range(data_range)
    err = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / err)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per sample of ``[B, C, H, W]`` tensors (H, W >= 7) -> float64 ``[B]``.

    Equals ``skimage.metrics.structural_similarity(pred[b], target[b], data_range=data_range,
    channel_axis=0)`` (the module docstring gives the definition).
    """
    _check_pair(pred, target, ndim=4)
    data_range = _check_range(data_range)
    if min(pred.shape[-2:]) < _SSIM_WIN:
        raise ValueError(f"ssim needs H and W >= {_SSIM_WIN}, got shape {tuple(pred.shape)}")
    x, y = pred.double(), target.double()
    b, c = x.shape[:2]
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [B, 5C, H, W]
    m = F.avg_pool2d(stack, _SSIM_WIN, stride=1)            # window means, valid region only
    ux, uy, uxx, uyy, uxy = m.split(c, dim=1)
    n = _SSIM_WIN * _SSIM_WIN
    cov = n / (n - 1.0)
    vx, vy, vxy = cov * (uxx - ux * ux), cov * (uyy - uy * uy), cov * (uxy - ux * uy)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(1)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample -> float64 ``[B]``."""
    _check_pair(pred, target)
    return (pred.double() - target.double()).abs().flatten(1).mean(1)


def _binary(name: str, t: torch.Tensor, threshold: float | None) -> torch.Tensor:
    if threshold is None:
        return (t > 0.5) if t.is_floating_point() else t.bool()
    return t > threshold


def ravd(pred: torch.Tensor, target: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Relative absolute volume difference per sample -> float64 ``[B]``.

    ``pred``: a binary mask (bool / 0-1) or probabilities binarised at ``threshold``
    (default 0.5 for floats); ``target``: a binary mask.
    """
    _check_pair(pred, target)
    vp = _binary("pred", pred, threshold).flatten(1).sum(1).double()
    vg = _binary("target", target, None).flatten(1).sum(1).double()
    out = (vp - vg).abs() / vg
    return torch.where(vg > 0, out, torch.where(vp > 0, torch.full_like(out, float("inf")),
                                                torch.zeros_like(out)))


def dice_at_threshold(prob: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Dice ``2|P ∩ G| / (|P| + |G|)`` of ``prob > threshold`` vs a binary ``target`` per
    sample (over every non-batch dim) -> float64 ``[B]``; 1 where both masks are empty."""
    _check_pair(prob, target)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    p = (prob > threshold).flatten(1)
    g = _binary("target", target, None).flatten(1)
    inter = (p & g).sum(1).double()
    total = (p.sum(1) + g.sum(1)).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), torch.ones_like(total))


# reconstruction metrics of the vae experiment


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(psnr [B], ssim [B])`` (float32, CPU) of [0, 1] images ``[B, 3, H, W]`` (data
    range 1), by :mod:`dualdiff.metrics.image` (scikit-image's definitions)."""
    pred, target = pred.detach().float(), target.detach().float()
    return psnr(pred, target, data_range=1.0).float().cpu(), ssim(pred, target, data_range=1.0).float().cpu()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device).pow(2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(h, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def highpass_error(pred: torch.Tensor, target: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """Per-image relative error in the high-pass band (where vessels live), ``[B]``:
    ``||HP(pred) - HP(target)||² / ||HP(target)||²`` with ``HP(x) = x - gauss_blur(x, σ)``,
    σ = S/112 px by default (2 px at 224²). 1 = no fine detail reproduced (a blurry output)."""
    sigma = sigma if sigma is not None else max(0.5, target.shape[-1] / 112)
    hp_t = target - _blur(target, sigma)
    hp_p = pred - _blur(pred, sigma)
    num = (hp_p - hp_t).pow(2).flatten(1).sum(1)
    return num / hp_t.pow(2).flatten(1).sum(1).clamp_min(1e-12)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent units with ``Cov_x(E[z|x]) > threshold`` over the rows of ``mu [N, D]`` (Burda et al.)."""
    if mu.shape[0] < 2:
        raise ValueError("active_units needs at least 2 samples")
    return int((mu.float().var(dim=0) > threshold).sum())
