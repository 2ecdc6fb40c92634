"""Time-dependent weights of an auxiliary loss term: λ(t) of the tadiff experiment.

λ(t) from ᾱ_t (:func:`lambda_weight`): ``fixed`` λ0; ``power`` λ0·ᾱᵏ (k = 1 is the seed's
"linear"); ``cosine`` λ0·sin²(πᾱ/2) (falls with noise); ``cosine_seed`` λ0·cos²(πᾱ/2) (the
seed's written formula, which rises with noise — kept for reproduction); ``step`` λ0 if
ᾱ > 0.5 else λ0/10; ``learnable`` a small positive MLP of (t/T, ᾱ) normalised so its mean over
t is λ0 (:class:`LearnableLambda`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.errors import ConfigError

__all__ = ["LAMBDA_SCHEDULES", "LearnableLambda", "lambda_weight"]

LAMBDA_SCHEDULES = ("fixed", "power", "cosine", "cosine_seed", "step", "learnable")


class LearnableLambda(nn.Module):
    """λ(t) = λ0 · f(t/(T-1), ᾱ_t) / mean_{t'} f(t'/(T-1), ᾱ_{t'}) with f = softplus(MLP) > 0.

    ``alphas_cumprod``: the schedule's ᾱ table ``[T]``. The MLP (2 -> ``hidden`` -> 1, SiLU)
    starts as a constant (last layer zero), i.e. at λ0 for every t; its mean over t stays λ0
    whatever it learns. ``forward(t [B] int) -> λ [B]`` (float32).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, lambda0: float = 0.01, hidden: int = 16) -> None:
        super().__init__()
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float32).reshape(-1)
        T = ab.shape[0]
        self.lambda0 = float(lambda0)
        self.register_buffer("features", torch.stack([torch.arange(T) / max(T - 1, 1), ab], 1),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.constant_(self.mlp[2].bias, math.log(math.e - 1.0))  # softplus(b) = 1

    def table(self) -> torch.Tensor:
        """λ at every t = 0..T-1, ``[T]``."""
        f = F.softplus(self.mlp(self.features)).squeeze(1)
        return self.lambda0 * f / f.mean()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.table()[t.long()]


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
