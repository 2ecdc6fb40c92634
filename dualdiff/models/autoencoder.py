"""A convolutional KL autoencoder with a spatial latent (the autoencoder of latent diffusion).

API (what the ldm experiment relies on)::

    ae = ConvKLAutoencoder(in_channels=3, latent_channels=4, base_channels=64,
                           channel_mults=(1, 2, 4), downsample_factor=8)
    mu, logvar = ae.encode(x)             # x [B, 3, H, W] -> each [B, 4, H/f, W/f]
    logits = ae.decode(z)                 # z [B, 4, H/f, W/f] -> [B, 3, H, W] logits
    logits, mu, logvar = ae(x, sample=True)   # z = mu + exp(logvar/2)·eps (sample=False: z = mu)
    images = torch.sigmoid(logits)        # the reconstruction in [0, 1]

    ae.scaling_factor                     # 0-d buffer (saved in the state_dict), 1.0 until fitted
    ae.fit_scaling_factor(x)              # sets it to 1 / std(z) over the images x
    z = ae.to_latent(x)                   # scaling_factor · (mu, or a sample with sample=True)
    logits = ae.from_latent(z)            # decode(z / scaling_factor)

``H`` and ``W`` must be divisible by ``f = downsample_factor``. The input is whatever the
autoencoder was trained on: the vae experiment feeds the ImageNet-normalised image and trains
the sigmoid of the output against the un-normalised [0, 1] image (``dualdiff.ops.vae_loss``
applies the sigmoid to the logits). The latent carries no batch-global state, so any batch size
works in training and eval alike (GroupNorm, no BatchNorm).

Layout (channels ``C_i = base_channels · channel_mults[i]``, ``n = log2(f)`` downsamples, which
end the first ``n`` levels; ``n <= len(channel_mults)``):

    encoder: conv3x3 -> C_0; level i: num_res_blocks ResBlocks (-> C_i), then a 2x downsample
             (3x3 stride-2 conv) when i < n; middle: ResBlock, self-attention, ResBlock;
             GroupNorm, SiLU, conv3x3 -> 2·latent_channels (mu, logvar; logvar clamped to [-30, 20])
    decoder: conv3x3 latent -> C_last; middle: ResBlock, self-attention, ResBlock; levels in
             reverse: num_res_blocks ResBlocks (-> C_i), then a 2x nearest upsample + conv3x3 when
             i < n; GroupNorm, SiLU, conv3x3 -> in_channels logits
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualdiff.nn.layers import SelfAttention2d

__all__ = ["ConvKLAutoencoder"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class _ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch, groups), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.body(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, groups: int, attention: bool) -> nn.Sequential:
    attn = SelfAttention2d(channels, norm_groups=groups) if attention else nn.Identity()
    return nn.Sequential(_ResBlock(channels, channels, groups), attn, _ResBlock(channels, channels, groups))


class ConvKLAutoencoder(nn.Module):
    """Convolutional VAE with a ``[B, latent_channels, H/f, W/f]`` Gaussian latent (see module doc).

    Args:
        in_channels: image channels (3).
        latent_channels: channels of the latent (4).
        base_channels: width of the first level.
        channel_mults: width multiplier per level.
        downsample_factor: f, a power of two with ``log2(f) <= len(channel_mults)``.
        num_res_blocks: ResBlocks per level (encoder and decoder).
        norm_groups: GroupNorm groups (reduced to a divisor of each width).
        mid_attention: self-attention in the middle blocks (at H/f x W/f).
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, base_channels: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 4), downsample_factor: int = 8, *,
                 num_res_blocks: int = 1, norm_groups: int = 32, mid_attention: bool = True) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        if in_channels < 1 or latent_channels < 1 or base_channels < 1:
            raise ValueError("in_channels, latent_channels and base_channels must be >= 1, got "
                             f"{in_channels}, {latent_channels}, {base_channels}")
        if not mults or min(mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty list of positive ints, got {channel_mults}")
        f = int(downsample_factor)
        n_down = f.bit_length() - 1
        if f < 1 or (1 << n_down) != f or n_down > len(mults):
            raise ValueError(f"downsample_factor must be a power of two up to 2**len(channel_mults) = "
                             f"{2 ** len(mults)}, got {downsample_factor}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.in_channels, self.latent_channels, self.downsample_factor = in_channels, latent_channels, f
        widths = [base_channels * m for m in mults]
        g = norm_groups

        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(_ResBlock(ch, w, g))
                ch = w
            if i < n_down:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [_middle(ch, g, mid_attention), _norm(ch, g), nn.SiLU(),
                nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), _middle(ch, g, mid_attention)]
        for i in reversed(range(len(widths))):
            for _ in range(num_res_blocks):
                dec.append(_ResBlock(ch, widths[i], g))
                ch = widths[i]
            if i < n_down:
                dec.append(_Upsample(ch))
        dec += [_norm(ch, g), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("scaling_factor", torch.tensor(1.0))

    def _check(self, name: str, t: Tensor, channels: int, multiple: int) -> None:
        if t.dim() != 4 or t.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, H, W], got shape {tuple(t.shape)}")
        if t.shape[2] % multiple or t.shape[3] % multiple:
            raise ValueError(f"{name} height and width must be divisible by {multiple}, got "
                             f"{tuple(t.shape[2:])}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W] -> (mu, logvar)``, each ``[B, latent_channels, H/f, W/f]``."""
        self._check("x", x, self.in_channels, self.downsample_factor)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, latent_channels, h, w] -> logits [B, C, h·f, w·f]`` (sigmoid gives the image)."""
        self._check("z", z, self.latent_channels, 1)
        return self.decoder(z)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """``mu + exp(logvar / 2) · eps``, eps ~ N(0, I)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``x -> (logits [B, C, H, W], mu, logvar)``; decodes a posterior sample or (sample=False) mu."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def to_latent(self, x: Tensor, sample: bool = False) -> Tensor:
        """The diffusion-space latent ``scaling_factor · z`` of ``x`` (z = mu, or a sample)."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample else mu
        return z * self.scaling_factor.to(z.dtype)

    def from_latent(self, z: Tensor) -> Tensor:
        """Logits of a diffusion-space latent: ``decode(z / scaling_factor)``."""
        return self.decode(z / self.scaling_factor.to(z.dtype))

    @torch.no_grad()
    def fit_scaling_factor(self, x: Tensor, sample: bool = True) -> float:
        """Set ``scaling_factor = 1 / std(z)`` over the images ``x`` (LDM's recipe); returns it."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample else mu
        std = z.float().std()
        if not torch.isfinite(std) or std <= 0:
            raise ValueError(f"cannot fit scaling_factor: latent std is {std.item()}")
        self.scaling_factor.fill_(1.0 / std.item())
        return float(self.scaling_factor)
