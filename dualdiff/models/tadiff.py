"""TaDiff network: one 2-D UNet that denoises the target MRI session and segments every session.

Layout (the public TaDiff-Net ``tadiff_unet_arch.py``, written anew on dualdiff's blocks):

    x [B, S·M, H, W]   S = 4 sessions × M = 3 modalities (T1, T1c, FLAIR), session-major
                       (channel s·M + m); the target session's slot holds the noised x_t
    out [B, S + M, H, W]   channels 0..S-1: mask logits of the S sessions,
                           S..S+M-1: the noise prediction ε̂ of the target session

Conditioning (width ``base`` = model channels):
    e_t   = MLP(sinusoid(t))                                  diffusion time           [B, base]
    v_s   = MLP(sinusoid(day_s)) + MLP(Fourier((treat_s + 1)·10))   per session        [B, S, base]
    mid   = e_t + v_target
    u_s   = v_s - v_target   (+ mid for s = target)
    ResBlocks of the encoder/decoder get concat_s u_s  [B, S·base]; the bottleneck gets mid.

UNet (guided-diffusion style): conv3x3 -> per level ``num_res_blocks`` ResBlocks (+ attention
at the downsampling factors in ``attention_ds``), a stride-2 3x3 conv between levels;
bottleneck ResBlock-attention-ResBlock; decoder with ``num_res_blocks + 1`` ResBlocks per level,
each concatenating one encoder activation, nearest-neighbour 2x upsampling + conv3x3 between
levels; GroupNorm, SiLU, zero-initialised conv3x3 output. The public configuration (base 32,
multipliers (1, 2, 3, 4), two ResBlocks per level, attention at 1/4 and 1/8, 4 heads) has about
5.5 M parameters (:meth:`TaDiffModelConfig.default`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.models.unet import ResBlock, count_parameters
from dualdiff.nn.layers import GroupNorm, SelfAttention2d
from dualdiff.ops.timestep_embedding import sinusoidal_embedding

__all__ = ["TaDiffModelConfig", "TaDiffNet", "FourierFeatures", "count_parameters"]


@dataclass
class TaDiffModelConfig:
    """Architecture of :class:`TaDiffNet`; ``image_size`` must be divisible by
    ``2 ** (len(channel_mult) - 1)``."""
    image_size: int = 192
    sessions: int = 4
    modalities: int = 3
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_res_blocks: int = 2
    attention_ds: list[int] = field(default_factory=lambda: [4, 8])
    num_heads: int = 4
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def in_channels(self) -> int:
        return self.sessions * self.modalities

    @property
    def out_channels(self) -> int:
        return self.sessions + self.modalities

    def validate(self) -> None:
        for name in ("image_size", "sessions", "modalities", "base_channels", "num_res_blocks",
                     "num_heads", "norm_groups"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.sessions < 2:
            raise ValueError(f"model.sessions must be >= 2 (references + target), got {self.sessions}")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"model.channel_mult must be positive ints, got {self.channel_mult}")
        f = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % f:
            raise ValueError(f"model.image_size ({self.image_size}) must be divisible by {f} "
                             f"(2 ** (len(channel_mult) - 1))")
        for m in self.channel_mult:
            c = m * self.base_channels
            if c % min(self.norm_groups, c) or c % self.num_heads:
                raise ValueError(f"model: every width base_channels*mult ({c}) must be divisible by "
                                 f"norm_groups ({self.norm_groups}) and num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def default(cls) -> "TaDiffModelConfig":
        """The public configuration at 192² (≈ 5.5 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "TaDiffModelConfig":
        """CPU demo / tests: 32² slices, base 16, multipliers (1, 2, 2), one ResBlock per level."""
        return cls(image_size=32, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                   attention_ds=[4], num_heads=2, norm_groups=8)


class FourierFeatures(nn.Module):
    """``[B, in] -> [B, out]``: cos ‖ sin of 2π·x·Wᵀ with a learned ``W ~ N(0, std²)`` ``[out/2, in]``."""

    def __init__(self, in_features: int, out_features: int, std: float = 1.0) -> None:
        super().__init__()
        if out_features % 2:
            raise ValueError(f"out_features must be even, got {out_features}")
        self.weight = nn.Parameter(torch.randn(out_features // 2, in_features) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))


class _Down(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Block(nn.Module):
    """ResBlock (+ attention) (+ a final up/down sampler)."""

    def __init__(self, res: ResBlock | None, attn: SelfAttention2d | None, sampler: nn.Module | None):
        super().__init__()
        self.res, self.attn, self.sampler = res, attn, sampler

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.sampler is not None:
            h = self.sampler(h)
        return h


class TaDiffNet(nn.Module):
    """``forward(x, t, days, treatments, target) -> [B, S + M, H, W]`` (module docstring).

    ``x``: ``[B, S·M, H, W]`` float; ``t``: ``[B]`` diffusion timesteps (int or float);
    ``days``, ``treatments``: ``[B, S]`` day of each session and its treatment code;
    ``target``: ``[B]`` int index of the target session (negative counts from the end).
    """

    def __init__(self, config: TaDiffModelConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or TaDiffModelConfig()
        cfg.validate()
        mc, S = cfg.base_channels, cfg.sessions
        self.time_embed = _mlp(mc, mc)
        self.days_embed = _mlp(mc, mc)
        self.treat_embed = nn.Sequential(FourierFeatures(1, mc), _mlp(mc, mc))
        sess_dim = S * mc
        kw = dict(norm_groups=cfg.norm_groups, dropout=cfg.dropout)

        def attn(ch: int) -> SelfAttention2d:
            return SelfAttention2d(ch, cfg.num_heads, norm_groups=cfg.norm_groups)

        ch = cfg.channel_mult[0] * mc
        self.in_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        skips, ds = [ch], 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = mult * mc
                self.down.append(_Block(ResBlock(ch, out, sess_dim, **kw),
                                        attn(out) if ds in cfg.attention_ds else None, None))
                ch = out
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(_Block(None, None, _Down(ch)))
                skips.append(ch)
                ds *= 2
        self.mid1 = ResBlock(ch, ch, mc, **kw)
        self.mid_attn = attn(ch)
        self.mid2 = ResBlock(ch, ch, mc, **kw)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out = mult * mc
                res = ResBlock(ch + skips.pop(), out, sess_dim, **kw)
                ch = out
                up = _Up(ch) if level and i == cfg.num_res_blocks else None
                self.up.append(_Block(res, attn(ch) if ds in cfg.attention_ds else None, up))
                if up is not None:
                    ds //= 2
        self.out_norm = GroupNorm(min(cfg.norm_groups, ch), ch)
        self.out_conv = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def conditioning(self, t: torch.Tensor, days: torch.Tensor, treatments: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(session embedding [B, S·base], bottleneck embedding [B, base])``."""
        B, S, mc = t.shape[0], self.config.sessions, self.config.base_channels
        dtype = self.time_embed[0].weight.dtype
        e_t = self.time_embed(sinusoidal_embedding(t, mc).to(dtype))
        d = self.days_embed(sinusoidal_embedding(days.reshape(-1).float(), mc).to(dtype))
        tr = self.treat_embed((treatments.reshape(-1, 1).to(dtype) + 1.0) * 10.0)
        v = (d + tr).view(B, S, mc)
        onehot = F.one_hot(target.long() % S, S).to(v.dtype)           # [B, S]
        v_tg = (onehot[:, :, None] * v).sum(1)                           # [B, base]
        mid = e_t + v_tg
        u = v - v_tg[:, None] + onehot[:, :, None] * mid[:, None]
        return u.reshape(B, S * mc), mid

    def forward(self, x: torch.Tensor, t: torch.Tensor, days: torch.Tensor, treatments: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        B = x.shape[0] if x.dim() else 0
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W] ({cfg.sessions} sessions x "
                             f"{cfg.modalities} modalities), got shape {tuple(x.shape)}")
        f = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"x's H and W must be divisible by {f}, got shape {tuple(x.shape)}")
        for name, v, shape in (("t", t, (B,)), ("days", days, (B, cfg.sessions)),
                               ("treatments", treatments, (B, cfg.sessions)), ("target", target, (B,))):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {got}")
        emb, mid = self.conditioning(t, days, treatments, target)
        h = self.in_conv(x)
        hs = [h]
        for blk in self.down:
            h = blk(h, emb)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, mid)), mid)
        for blk in self.up:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))
