"""Drop-in replacements for code researchers already run (change one import).

* :class:`DiceLoss` — ``monai.losses.DiceLoss`` (:mod:`dualdiff.compat.monai`);
* :class:`DualTimestepEmbedding` — two diffusers ``Timesteps`` + ``TimestepEmbedding`` pairs and
  their combining projection (:mod:`dualdiff.compat.diffusers`);
* :class:`VAELoss` — VAE-DG's ``ResNet_VAE.loss_function`` with corrected defaults
  (:mod:`dualdiff.compat.vae_dg`).

Each module fuses what maps onto a dualdiff op and computes anything else in plain PyTorch,
saying why in ``.fallback_reason`` and with a one-time :class:`FallbackWarning`.
:mod:`dualdiff.patch` swaps MONAI's class in place, Liger-style. See docs/compat.md.
"""
from dualdiff.compat._fallback import FallbackWarning
from dualdiff.compat.diffusers import DualTimestepEmbedding
from dualdiff.compat.monai import DiceLoss
from dualdiff.compat.vae_dg import VAELoss

__all__ = ["DiceLoss", "DualTimestepEmbedding", "FallbackWarning", "VAELoss"]
