"""Image <-> latent codecs for latent diffusion: :class:`Codec` over the vae experiment's
``conv_kl`` autoencoder (:func:`own_codec`) or a local diffusers ``AutoencoderKL``
(:func:`diffusers_codec`)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dualdiff.errors import DataError, UserError

__all__ = ["Codec", "own_codec", "diffusers_codec"]


class Codec:
    """Images in [0, 1] <-> unscaled latents. ``encode(x [B, 3, S, S]) -> z`` (posterior mean),
    ``decode(z) -> x`` in [0, 1]; ``scaling_factor``: the autoencoder's (None if it has none)."""

    def __init__(self, encode, decode, scaling_factor: float | None, latent_channels: int,
                 downsample_factor: int, name: str) -> None:
        self.encode, self.decode = encode, decode
        self.scaling_factor, self.latent_channels = scaling_factor, latent_channels
        self.downsample_factor, self.name = downsample_factor, name


def own_codec(ae: nn.Module) -> Codec:
    """A :class:`Codec` of the vae experiment's ``conv_kl`` autoencoder ``ae`` (ImageNet-normalised input)."""
    from dualdiff.data.fundus import normalize

    @torch.no_grad()
    def enc(x: Tensor) -> Tensor:
        return ae.encode(normalize(x))[0]

    @torch.no_grad()
    def dec(z: Tensor) -> Tensor:
        return torch.sigmoid(ae.decode(z).float())

    return Codec(enc, dec, float(ae.scaling_factor), ae.latent_channels, ae.downsample_factor, "own")


def diffusers_codec(path: str, device: torch.device | str = "cpu") -> Codec:
    """A :class:`Codec` of a local diffusers ``AutoencoderKL`` folder (``local_files_only``)."""
    if not Path(path).is_dir():
        raise DataError(f"ae.path: no such folder: {path!r}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UserError("ae.source=diffusers needs the diffusers package (pip install diffusers)") from e
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def enc(x: Tensor) -> Tensor:
        return vae.encode(x * 2 - 1).latent_dist.mean  # diffusers' VAE takes images in [-1, 1]

    @torch.no_grad()
    def dec(z: Tensor) -> Tensor:
        return ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return Codec(enc, dec, float(vae.config.scaling_factor), int(vae.config.latent_channels), f, "diffusers")
