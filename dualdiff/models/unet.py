"""UNet building blocks shared by the image diffusion models (LIFT, single-scale baseline,
later the class-conditioned UNet).

Layout of :class:`UNet` (the one of the LIFT experiment's public code, written anew):

    x [B, Cin, H, W] -> conv3x3 -> C0
    encoder, level i = 0..L-1 (channels C_i):
        ResBlock(C_{i-1} -> C_i), ResBlock(C_i -> C_i), SelfAttention if C_i >= attn_min_channels
        -> skip_i ; Downsample 2x (4x4 stride-2 conv)                 (H / 2^L at the bottom)
    bottleneck: ResBlock, SelfAttention, ResBlock                    (C_{L-1})
    decoder, level i = L-1..0:
        Upsample 2x (4x4 stride-2 transposed conv, channels of the level below),
        concat skip_i, ResBlock(C_below + C_i -> C_i), ResBlock(C_i -> C_i), attention as above
    GroupNorm, SiLU, conv3x3 -> Cout

Every ResBlock is ``GroupNorm, SiLU, conv3x3, + Linear(SiLU(emb)), GroupNorm, SiLU, conv3x3``
plus a (1x1 conv when the width changes) shortcut; ``emb`` is the [B, emb_dim] conditioning
vector (timestep embedding) injected into every block.

Only forward-AD-safe layers are used (:class:`dualdiff.nn.GroupNorm`,
:class:`dualdiff.nn.SelfAttention2d`), so ``torch.func.jvp`` through the network works eager and
compiled (the Hutchinson error heatmap needs it).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.nn.layers import GroupNorm, SelfAttention2d

__all__ = ["ResBlock", "Downsample", "Upsample", "UNet", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works for models built on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ResBlock(nn.Module):
    """Residual block with conditioning: ``x -> [B, out_ch, H, W]`` given ``emb [B, emb_dim]``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, norm_groups: int = 8,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = GroupNorm(min(norm_groups, in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm(min(norm_groups, out_ch), out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.shortcut(x)


class Downsample(nn.Module):
    """2x spatial downsampling by a learned 4x4 stride-2 convolution (H, W even)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2x spatial upsampling by a learned 4x4 stride-2 transposed convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Level(nn.Module):
    """Two ResBlocks and optional attention at one resolution."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, attention: bool, num_heads: int,
                 norm_groups: int, dropout: float) -> None:
        super().__init__()
        self.res1 = ResBlock(in_ch, out_ch, emb_dim, norm_groups=norm_groups, dropout=dropout)
        self.res2 = ResBlock(out_ch, out_ch, emb_dim, norm_groups=norm_groups, dropout=dropout)
        self.attn = SelfAttention2d(out_ch, num_heads, norm_groups=norm_groups) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res2(self.res1(x, emb), emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """The UNet body: ``forward(x [B, in_channels, H, W], emb [B, emb_dim]) -> [B, out_channels, H, W]``.

    ``channels``: widths per level (one 2x downsampling per level, so H and W must be divisible
    by ``2 ** len(channels)``); attention at levels with at least ``attn_min_channels`` channels
    and always in the bottleneck; ``num_heads`` attention heads; GroupNorm with
    ``norm_groups`` groups (capped at the channel count). The conditioning embedding is built by
    the caller (see :mod:`dualdiff.models.lift`).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int], emb_dim: int,
                 *, attn_min_channels: int = 128, num_heads: int = 4, norm_groups: int = 8,
                 dropout: float = 0.0) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        for c in channels:
            if c % min(norm_groups, c) or c % num_heads:
                raise ValueError(f"every channel count must be divisible by norm_groups "
                                 f"({norm_groups}) and num_heads ({num_heads}), got {channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels = channels
        self.emb_dim = emb_dim
        kw = dict(num_heads=num_heads, norm_groups=norm_groups, dropout=dropout)

        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = channels[0]
        for c in channels:
            self.down_levels.append(_Level(prev, c, emb_dim, c >= attn_min_channels, **kw))
            self.downsamples.append(Downsample(c))
            prev = c
        top = channels[-1]
        self.mid_res1 = ResBlock(top, top, emb_dim, norm_groups=norm_groups, dropout=dropout)
        self.mid_attn = SelfAttention2d(top, num_heads, norm_groups=norm_groups)
        self.mid_res2 = ResBlock(top, top, emb_dim, norm_groups=norm_groups, dropout=dropout)
        self.upsamples = nn.ModuleList()
        self.up_levels = nn.ModuleList()
        below = top
        for c in reversed(channels):
            self.upsamples.append(Upsample(below))
            self.up_levels.append(_Level(below + c, c, emb_dim, c >= attn_min_channels, **kw))
            below = c
        self.out_norm = GroupNorm(min(norm_groups, channels[0]), channels[0])
        self.out_conv = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W] with H, W divisible by {f}, "
                             f"got shape {tuple(x.shape)}")
        if emb.dim() != 2 or emb.shape != (x.shape[0], self.emb_dim):
            raise ValueError(f"emb must be [B={x.shape[0]}, {self.emb_dim}], got shape {tuple(emb.shape)}")
        h = self.init_conv(x)
        skips = []
        for level, down in zip(self.down_levels, self.downsamples):
            h = level(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for up, level in zip(self.upsamples, self.up_levels):
            h = torch.cat([up(h), skips.pop()], dim=1)
            h = level(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
