"""Time-dependent weights of an auxiliary loss term: λ(t) of the tadiff experiment.

λ(t) from ᾱ_t (:func:`lambda_weight`): ``fixed`` λ0; ``power`` λ0·ᾱᵏ (k = 1 is the seed's
"linear"); ``cosine`` λ0·sin²(πᾱ/2) (falls with noise); ``cosine_seed`` λ0·cos²(πᾱ/2) (the
seed's written formula, which rises with noise — kept for reproduction); ``step`` λ0 if
ᾱ > 0.5 else λ0/10; ``learnable`` λ0·exp(-s(t)) with s a learned per-timestep-bin log-variance trained by
homoscedastic uncertainty weighting (:class:`LearnableLambda`: the loss gets
λ0·(exp(-s)·L_dice + s), whose optimum is s = log L_dice).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dualdiff.errors import ConfigError

__all__ = ["LAMBDA_SCHEDULES", "LearnableLambda", "lambda_weight"]

LAMBDA_SCHEDULES = ("fixed", "power", "cosine", "cosine_seed", "step", "learnable")


class LearnableLambda(nn.Module):
    """Learned λ(t) by homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    A log-variance ``s_k`` per timestep bin k (``bins`` equal bins of 0..T-1, ``k(t) =
    floor(t·bins/T)``; parameter ``log_var [bins]``, starting at 0, i.e. at λ0). The Dice part
    of the loss for a sample at timestep t is

        λ0 · ( exp(-s_{k(t)}) · D + s_{k(t)} )

    (D: that sample's Dice loss as weighted by the experiment), so λ(t) = λ0·exp(-s_{k(t)})
    (:meth:`forward`) and the regulariser λ0·s_{k(t)} (:meth:`regulariser`) keeps s from
    running to +inf. λ0 = 1 is Kendall's form with the noise task's variance fixed at 1; λ0
    only scales the term and leaves the optimum unchanged: d/ds = λ0(1 - e^{-s}·D) = 0 at
    s = log D, i.e. each bin learns λ = λ0 / E[D | bin] (the Dice term's weight is inverse to
    its own loss level per bin, a smooth interior optimum — unlike minimising Σ λ(t)·D(t)
    under a mean constraint, which puts all the weight where D is smallest).
    """

    def __init__(self, T: int, lambda0: float = 0.01, bins: int = 10) -> None:
        super().__init__()
        if not (isinstance(T, int) and T >= 1):
            raise ConfigError(f"T must be an int >= 1, got {T!r}")
        if not (isinstance(bins, int) and 1 <= bins <= T):
            raise ConfigError(f"learnable bins must be an int in [1, T={T}], got {bins!r}")
        self.T, self.bins, self.lambda0 = T, bins, float(lambda0)
        self.log_var = nn.Parameter(torch.zeros(bins))

    def bin(self, t: torch.Tensor) -> torch.Tensor:
        """Bin index ``floor(t·bins/T)`` of integer timesteps ``t`` (clamped to [0, bins-1])."""
        return (t.long() * self.bins // self.T).clamp(0, self.bins - 1)

    def table(self) -> torch.Tensor:
        """λ at every t = 0..T-1, ``[T]``."""
        return self.forward(torch.arange(self.T, device=self.log_var.device))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = λ0·exp(-s_{k(t)}) ``[B]`` for integer timesteps ``t [B]``."""
        return self.lambda0 * torch.exp(-self.log_var[self.bin(t.to(self.log_var.device))])

    def regulariser(self, t: torch.Tensor) -> torch.Tensor:
        """λ0·s_{k(t)} ``[B]`` (add its batch mean to the loss beside the λ-weighted Dice)."""
        return self.lambda0 * self.log_var[self.bin(t.to(self.log_var.device))]


def lambda_weight(schedule: str, alphabar: torch.Tensor, *, lambda0: float = 0.01, k: float = 2.0,
                  t: torch.Tensor | None = None, net: LearnableLambda | None = None) -> torch.Tensor:
    """The Dice weight λ per sample from ᾱ_t ``[B]`` (float) -> ``[B]`` (ᾱ's dtype).

    ``schedule``: ``fixed`` | ``power`` (λ0·ᾱᵏ) | ``cosine`` (λ0·sin²(πᾱ/2)) | ``cosine_seed``
    (λ0·cos²(πᾱ/2), inverted) | ``step`` (λ0 if ᾱ > 0.5 else λ0/10) | ``learnable`` (needs
    ``net`` and the integer timesteps ``t`` [B]).
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(LAMBDA_SCHEDULES)}, got {schedule!r}")
    if not isinstance(alphabar, torch.Tensor) or not alphabar.is_floating_point():
        raise TypeError("alphabar must be a floating-point tensor [B]")
    if not (isinstance(k, (int, float)) and k >= 0):
        raise ConfigError(f"k must be >= 0, got {k!r}")
    if not (isinstance(lambda0, (int, float)) and lambda0 >= 0):
        raise ConfigError(f"lambda0 must be >= 0, got {lambda0!r}")
    if schedule == "fixed":
        return torch.full_like(alphabar, lambda0)
    if schedule == "power":
        return lambda0 * alphabar.pow(k)
    if schedule == "cosine":
        return lambda0 * torch.sin(0.5 * math.pi * alphabar).pow(2)
    if schedule == "cosine_seed":
        return lambda0 * torch.cos(0.5 * math.pi * alphabar).pow(2)
    if schedule == "step":
        return torch.where(alphabar > 0.5, torch.full_like(alphabar, lambda0),
                           torch.full_like(alphabar, lambda0 / 10.0))
    if net is None or t is None:
        raise ValueError("schedule 'learnable' needs net= (a LearnableLambda) and t= (the timesteps)")
    return net(t).to(alphabar.dtype)
