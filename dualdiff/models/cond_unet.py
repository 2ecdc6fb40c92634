"""The class-distribution-conditioned UNet of the ldm experiment (lucidrains'
``classifier_free_guidance.Unet`` layout, conditioned on a class *distribution*).

    net = ClassDistUNet.from_name("tiny")
    out = net(x, t, dist)                     # x [B, C, h, w], t [B] int, dist [B, K] -> [B, C, h, w]
    out = net(x, t, dist, null_mask=m)        # m [B] bool: these samples get the null embedding

Conditioning: ``dist`` holds per-class pixel fractions (rows sum to 1). The condition vector is
``dist @ E`` (E = ``class_emb``, [K, dim]: a one-hot row gives lucidrains' ``nn.Embedding``),
replaced by the learned ``null_emb`` [dim] where ``null_mask`` is True, then an MLP
(Linear dim -> 4·dim, GELU, Linear) gives c. Every ResnetBlock takes ``cat(time_emb, c)`` ->
SiLU -> Linear -> (scale, shift) on its first conv block. Which samples are dropped is the
caller's choice (:func:`dualdiff.experiments.ldm.drop_mask`), so training and guidance can
batch conditional and null rows in one forward.

Layout (widths ``dim·m`` for m in ``dim_mults``): conv7x7 -> dim; per level two ResnetBlocks +
linear attention, then a 4x4 stride-2 downsample (a 3x3 conv at the last level); middle:
ResnetBlock, full attention, ResnetBlock; up path mirrored with skip concatenations; a final
ResnetBlock on ``cat(x, init)`` and a 1x1 conv. Convolutions in the blocks are weight-
standardised (lucidrains). ``default`` preset: dim 256, mults (1, 2, 4), 4 channels, 5 classes,
GroupNorm groups 2 -> 172,104,196 parameters, lucidrains' count for the same arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassDistUNet", "CondUNetConfig", "COND_UNET_PRESETS", "LUCIDRAINS_DEFAULT_PARAMS"]

LUCIDRAINS_DEFAULT_PARAMS = 172_104_196  # lucidrains' Unet(dim=256, num_classes=5, dim_mults=(1,2,4), channels=4, resnet_block_groups=2)


@dataclass
class CondUNetConfig:
    """Arguments of :class:`ClassDistUNet` (``dim_mults`` as a list for YAML)."""
    dim: int = 256
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    channels: int = 4
    num_classes: int = 5
    groups: int = 2
    attn_heads: int = 4
    attn_dim_head: int = 32

    def validate(self) -> None:
        if self.dim < 2 or self.dim % 2:
            raise ValueError(f"model.dim must be an even int >= 2, got {self.dim}")
        if not self.dim_mults or min(self.dim_mults) < 1:
            raise ValueError(f"model.dim_mults must be positive ints, got {self.dim_mults}")
        for name in ("channels", "num_classes", "groups", "attn_heads", "attn_dim_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for w in [self.dim] + [self.dim * m for m in self.dim_mults]:
            if w % self.groups:
                raise ValueError(f"model.groups={self.groups} must divide every width, not {w}")


COND_UNET_PRESETS: dict[str, CondUNetConfig] = {
    "default": CondUNetConfig(),
    "tiny": CondUNetConfig(dim=16, dim_mults=[1, 2], groups=2, attn_heads=2, attn_dim_head=8),
}


class _WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: w <- (w - mean) / sqrt(var + eps) per output channel."""

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) * var.clamp(min=eps).rsqrt(), self.bias, self.stride, self.padding)


class _RMSNorm(nn.Module):
    """``normalize(x, dim=1) · g · sqrt(C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.g * (x.shape[1] ** 0.5)


class _Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = _WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2))
        self.block1 = _Block(dim, dim_out, groups)
        self.block2 = _Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)
        return self.block2(self.block1(x, (scale, shift))) + self.res_conv(x)


class _Attention(nn.Module):
    """Residual pre-RMSNorm multi-head attention over the h·w positions: linear (softmax of q
    over channels, of k over positions) or full (scaled dot product)."""

    def __init__(self, dim: int, heads: int, dim_head: int, linear: bool) -> None:
        super().__init__()
        self.heads, self.dim_head, self.linear = heads, dim_head, linear
        hidden = heads * dim_head
        self.norm = _RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), _RMSNorm(dim)) if linear \
            else nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, self.dim_head, h * w)
                   for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        if self.linear:
            q = q.softmax(dim=-2) * self.dim_head ** -0.5
            k = k.softmax(dim=-1)
            context = torch.einsum("bhdn,bhen->bhde", k, v / (h * w))
            out = torch.einsum("bhde,bhdn->bhen", context, q)
        else:
            out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                                 v.transpose(-1, -2)).transpose(-1, -2)
        return self.to_out(out.reshape(b, -1, h, w)) + x


def _sinusoidal(t: Tensor, dim: int) -> Tensor:
    """[B] -> [B, dim]: ``cat(sin(t·f), cos(t·f))``, f_i = 10000^(-i/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * -(math.log(10000.0) / max(half - 1, 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ClassDistUNet(nn.Module):
    """UNet predicting a tensor of x's shape from (x, t, class distribution); see module doc."""

    presets: ClassVar[dict[str, CondUNetConfig]] = COND_UNET_PRESETS

    def __init__(self, cfg: CondUNetConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CondUNetConfig()
        cfg.validate()
        self.cfg = cfg
        dim, g = cfg.dim, cfg.groups
        self.channels, self.num_classes = cfg.channels, cfg.num_classes
        emb = dim * 4
        self.time_mlp = nn.Sequential(nn.Linear(dim, emb), nn.GELU(), nn.Linear(emb, emb))
        self.class_emb = nn.Parameter(torch.randn(cfg.num_classes, dim))
        self.null_emb = nn.Parameter(torch.randn(dim))
        self.class_mlp = nn.Sequential(nn.Linear(dim, emb), nn.GELU(), nn.Linear(emb, emb))
        cond = 2 * emb  # cat(time, class)

        self.init_conv = nn.Conv2d(cfg.channels, dim, 7, padding=3)
        dims = [dim] + [dim * m for m in cfg.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        attn = dict(heads=cfg.attn_heads, dim_head=cfg.attn_dim_head)
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                _ResnetBlock(d_in, d_in, cond, g), _ResnetBlock(d_in, d_in, cond, g),
                _Attention(d_in, linear=True, **attn),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else nn.Conv2d(d_in, d_out, 4, 2, 1)]))
        mid = dims[-1]
        self.mid_block1 = _ResnetBlock(mid, mid, cond, g)
        self.mid_attn = _Attention(mid, linear=False, **attn)
        self.mid_block2 = _ResnetBlock(mid, mid, cond, g)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                _ResnetBlock(d_out + d_in, d_out, cond, g), _ResnetBlock(d_out + d_in, d_out, cond, g),
                _Attention(d_out, linear=True, **attn),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(d_out, d_in, 3, padding=1))]))
        self.final_block = _ResnetBlock(dim * 2, dim, cond, g)
        self.final_conv = nn.Conv2d(dim, cfg.channels, 1)

    @classmethod
    def from_name(cls, name: str) -> "ClassDistUNet":
        """The preset ``name`` of :data:`COND_UNET_PRESETS` (``default`` | ``tiny``)."""
        if name not in COND_UNET_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(COND_UNET_PRESETS)}")
        return cls(COND_UNET_PRESETS[name])

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be divisible by this (2 ** (levels - 1))."""
        return 2 ** (len(self.cfg.dim_mults) - 1)

    def condition(self, dist: Tensor, null_mask: Tensor | None = None) -> Tensor:
        """``class_mlp(where(null_mask, null_emb, dist @ class_emb))`` -> [B, 4·dim]."""
        e = dist.to(self.class_emb.dtype) @ self.class_emb
        if null_mask is not None:
            e = torch.where(null_mask[:, None], self.null_emb.expand_as(e), e)
        return self.class_mlp(e)

    def forward(self, x: Tensor, t: Tensor, dist: Tensor, null_mask: Tensor | None = None) -> Tensor:
        """``x [B, C, h, w]`` float, ``t [B]`` int timesteps, ``dist [B, K]`` class fractions,
        ``null_mask [B]`` bool or None -> ``[B, C, h, w]`` (the objective's prediction)."""
        b = x.shape[0]
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [B, {self.channels}, h, w], got {tuple(x.shape)}")
        if x.shape[2] % self.downsample_factor or x.shape[3] % self.downsample_factor:
            raise ValueError(f"x height and width must be divisible by {self.downsample_factor}, "
                             f"got {tuple(x.shape[2:])}")
        if dist.shape != (b, self.num_classes):
            raise ValueError(f"dist must be [B={b}, {self.num_classes}], got {tuple(dist.shape)}")
        if t.shape != (b,):
            raise ValueError(f"t must be [B={b}], got {tuple(t.shape)}")
        if null_mask is not None and (null_mask.shape != (b,) or null_mask.dtype != torch.bool):
            raise ValueError(f"null_mask must be a bool tensor [B={b}], got "
                             f"{null_mask.dtype} {tuple(null_mask.shape)}")
        emb = torch.cat([self.time_mlp(_sinusoidal(t, self.cfg.dim)), self.condition(dist, null_mask)], dim=-1)
        x = self.init_conv(x)
        r = x
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = attn(block2(x, emb))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, emb)), emb)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), emb)
            x = attn(block2(torch.cat([x, skips.pop()], dim=1), emb))
            x = up(x)
        return self.final_conv(self.final_block(torch.cat([x, r], dim=1), emb))
