"""``VAELoss``: VAE-DG's ``ResNet_VAE.loss_function`` (sharonchokuwa/VAE-DG
``domainbed/algorithms/vae_dg.py``) with corrected defaults, on the fused BCE + Gaussian-KL op.

Call signature: ``loss(recon_x, x, mu, logvar, y_hat, y) -> (total, recon, kl_term, ce_term)``
(the four values VAE-DG returns: total, recon_loss, loss_multiplier_kl · KLD,
loss_multiplier_y · CE), or ``loss.loss_function(model, x, y)``, which runs
``recon_x, mu, logvar, y_hat = model(x)`` first, like VAE-DG's method. Shapes: recon_x and x
``[B, 3, H, W]``, mu and logvar ``[B, D]``, y_hat ``[B, K]`` logits (or None), y ``[B]`` int64.

    target = x * std + mean             (un-normalised: the image in [0, 1]; VAE-DG: target = x)
    recon  = mean_i BCE(recon_x_i, target_i)    (VAE-DG: sum_i)
    KLD    = mean_{b,j} -0.5 (1 + logvar - mu² - exp(logvar))   (as VAE-DG)
    CE     = mean_b cross_entropy(y_hat_b, y_b)                 (VAE-DG: sum_b)
    total  = recon + loss_multiplier_kl · KLD + loss_multiplier_y · CE

Differences from VAE-DG, each switchable back: (1) ``unnormalize=True``: VAE-DG feeds its
ImageNet-normalised input as the BCE target (values outside [0, 1]: not a probability, and
current PyTorch refuses it); here the target is the un-normalised image. (2) ``reduction="mean"``:
VAE-DG sums BCE and CE over elements/samples but averages KLD over B·D, so β effectively shrinks
by B·3·H·W; here recon and CE are means. ``reduction="sum", unnormalize=False`` is VAE-DG's
arithmetic exactly (computed in the logit form, valid for any target). (3) ``logits``: VAE-DG's
decoder ends in Sigmoid, so ``recon_x`` are probabilities (``logits=False``, the default, plain
PyTorch BCE with log clamped at -100 like ``F.binary_cross_entropy``); drop the final Sigmoid
and pass ``logits=True`` to use the fused kernel (BCE from logits, stable, one pass with the KL).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.compat._fallback import notify_fallback
from dualdiff.ops import gaussian_kl, vae_loss

__all__ = ["VAELoss", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VAELoss(nn.Module):
    """VAE-DG's loss with corrected defaults (see the module docstring for formula and differences).

    Args:
        loss_multiplier_kl, loss_multiplier_y: VAE-DG's ``hparams.loss_multiplier_kl`` / ``_y``.
        unnormalize: reconstruct ``x * std + mean`` (True) or ``x`` itself (VAE-DG).
        mean, std: the per-channel normalisation of ``x`` (ImageNet's by default).
        reduction: "mean" (corrected) or "sum" (VAE-DG: BCE and CE summed, KLD a mean).
        logits: ``recon_x`` are pre-sigmoid logits (fused) or probabilities (plain PyTorch).
        backend: the fused op's backend (None: ``DUALDIFF_BACKEND`` or the fastest).
    """

    def __init__(self, loss_multiplier_kl: float = 1.0, loss_multiplier_y: float = 1.0, *,
                 unnormalize: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, reduction: str = "mean", logits: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have one entry per channel and std > 0, got {mean}, {std}")
        self.loss_multiplier_kl = float(loss_multiplier_kl)
        self.loss_multiplier_y = float(loss_multiplier_y)
        self.unnormalize, self.reduction, self.logits, self.backend = unnormalize, reduction, logits, backend
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.fallback_reason: Optional[str] = None if logits else (
            "logits=False: recon_x are probabilities (VAE-DG's decoder ends in Sigmoid); the fused kernel "
            "reads logits — drop the final Sigmoid and pass logits=True (the KL term is fused either way)")
        if self.fallback_reason is not None:
            notify_fallback("dualdiff.compat.VAELoss", self.fallback_reason)

    @classmethod
    def from_hparams(cls, hparams, **kwargs) -> "VAELoss":
        """From a VAE-DG ``hparams`` object (``.loss_multiplier_kl``, ``.loss_multiplier_y``)."""
        return cls(hparams.loss_multiplier_kl, hparams.loss_multiplier_y, **kwargs)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction target: ``x * std + mean`` (``unnormalize``) or ``x``."""
        if not self.unnormalize:
            return x
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"x must be [B, {self.mean.shape[1]}, H, W] (one mean/std per channel), "
                             f"got {tuple(x.shape)}")
        return (x.float() * self.std + self.mean).to(x.dtype)

    def forward(self, recon_x: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                y_hat: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None):
        """-> (total, recon, loss_multiplier_kl · KLD, loss_multiplier_y · CE), 0-d fp32 tensors."""
        if recon_x.shape != x.shape:
            raise ValueError(f"recon_x shape {tuple(recon_x.shape)} does not match x shape {tuple(x.shape)}")
        if mu.dim() != 2 or mu.shape != logvar.shape or mu.shape[0] != x.shape[0]:
            raise ValueError(f"mu and logvar must both be [B, D] with B = {x.shape[0]}, got "
                             f"{tuple(mu.shape)}, {tuple(logvar.shape)}")
        b, d = mu.shape
        t = self.target(x).detach()
        if self.logits:
            # the op's kl is the batch mean (or sum) of the per-sample sum over D: KLD = kl / D (/ B)
            kl_scale = 1.0 / d if self.reduction == "mean" else 1.0 / (b * d)
            total, recon, kl = vae_loss(recon_x, t.to(recon_x.dtype), mu, logvar,
                                        kl_weight=self.loss_multiplier_kl * kl_scale, recon="bce",
                                        reduction=self.reduction, backend=self.backend)
            kld = kl * kl_scale
        else:
            p, tt = recon_x.float(), t.float()
            terms = -(tt * p.log().clamp_min(-100) + (1 - tt) * (1 - p).log().clamp_min(-100))
            recon = terms.mean() if self.reduction == "mean" else terms.sum()
            kld = gaussian_kl(mu, logvar, reduction="mean", backend=self.backend) / d
            total = recon + self.loss_multiplier_kl * kld
        if y_hat is not None:
            ce = F.cross_entropy(y_hat.float(), y, reduction=self.reduction)
        else:
            ce = total.new_zeros(())
        ce_term = self.loss_multiplier_y * ce
        return total + ce_term, recon, self.loss_multiplier_kl * kld, ce_term

    def loss_function(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """VAE-DG's ``model.loss_function(x, y)``: ``model(x) -> (recon_x, mu, logvar, y_hat)``."""
        recon_x, mu, logvar, y_hat = model(x)
        return self(recon_x, x, mu, logvar, y_hat, y)
