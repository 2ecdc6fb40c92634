"""LIFT dual-scale denoiser: one UNet, a 64x64 image and its 32x32 version, one timestep each.

    x32_up = bilinear_upsample_2x(x32)                              [B, 3, 64, 64]
    emb    = DualTimestepEmbedding(t64, t32)                        [B, time_emb_dim]
    out    = UNet(concat(x64, x32_up), emb)                         [B, 6, 64, 64]
    eps64  = out[:, :3]                                             [B, 3, 64, 64]
    eps32  = bilinear_downsample_2x(out[:, 3:])                     [B, 3, 32, 32]

(bilinear with ``align_corners=False`` both ways, as in the experiment's public code).
The UNet is :class:`dualdiff.models.unet.UNet`; the default :class:`LIFTModelConfig` (channels
[64, 128, 256, 512], time embedding 64 -> 256, 4 attention heads, 8 norm groups) has
58.49 M parameters (the public model: 58.48 M), the public model's layout (its time MLP is shared between the scales and
followed by a two-layer combiner; ours is the fused two-branch embedding: +17 k parameters).

:class:`SingleScaleUNet` is the fair baseline: the same UNet on x64 alone (3 channels in and
out) with a single sinusoidal timestep embedding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.models.unet import UNet, count_parameters
from dualdiff.ops.timestep_embedding import DualTimestepEmbedding, sinusoidal_embedding

__all__ = ["LIFTModelConfig", "LIFTDualTimestepModel", "SingleScaleUNet", "count_parameters"]


@dataclass
class LIFTModelConfig:
    """Architecture of :class:`LIFTDualTimestepModel` / :class:`SingleScaleUNet`.

    ``channels``: UNet widths per level (one 2x downsampling each); ``time_freq_dim``: number of
    sinusoidal features per timestep; ``time_emb_dim``: width of the timestep embedding injected
    into every ResBlock; attention at levels with >= ``attn_min_channels`` channels (and in the
    bottleneck); ``image_size``: side of the large scale (the small one is half of it).
    ``embedding_backend``: backend of the fused dual timestep embedding (None = auto).
    """
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    time_freq_dim: int = 64
    time_emb_dim: int = 256
    attn_min_channels: int = 128
    num_heads: int = 4
    norm_groups: int = 8
    dropout: float = 0.0
    image_size: int = 64
    embedding_backend: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.channels or any(int(c) <= 0 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")
        if self.time_freq_dim < 2 or self.time_emb_dim < 1:
            raise ValueError(f"time_freq_dim must be >= 2 and time_emb_dim >= 1, got "
                             f"{self.time_freq_dim}, {self.time_emb_dim}")
        f = 2 ** (len(self.channels) + 1)  # the 32-scale must also survive the downsampling
        if self.image_size <= 0 or self.image_size % f:
            raise ValueError(f"image_size must be a positive multiple of {f} for "
                             f"{len(self.channels)} levels, got {self.image_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def tiny(cls) -> "LIFTModelConfig":
        """~0.3 M parameters: channels [16, 32], attention only in the bottleneck (tests, demo)."""
        return cls(channels=[16, 32], time_freq_dim=16, time_emb_dim=64, num_heads=2,
                   attn_min_channels=128)


def _build_unet(cfg: LIFTModelConfig, in_ch: int, out_ch: int) -> UNet:
    return UNet(in_ch, out_ch, cfg.channels, cfg.time_emb_dim, attn_min_channels=cfg.attn_min_channels,
                num_heads=cfg.num_heads, norm_groups=cfg.norm_groups, dropout=cfg.dropout)


def _timesteps(name: str, t, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a [B={batch}] tensor (or a scalar), got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer or floating tensor, got {t.dtype}")
    return t.to(device)


class LIFTDualTimestepModel(nn.Module):
    """``forward(x64 [B,3,S,S], x32 [B,3,S/2,S/2], t64 [B], t32 [B]) -> (eps64, eps32)``.

    S = ``config.image_size`` (64). Timesteps are integer (or float) diffusion steps, one per
    sample and scale; a scalar is broadcast to the batch. See the module docstring.
    """

    def __init__(self, config: LIFTModelConfig | None = None) -> None:
        super().__init__()
        cfg = copy.deepcopy(config) if config is not None else LIFTModelConfig()
        cfg.validate()
        self.config = cfg
        self.time_embed = DualTimestepEmbedding(cfg.time_freq_dim, cfg.time_emb_dim,
                                                backend=cfg.embedding_backend)
        self.unet = _build_unet(cfg, 6, 6)

    def _check(self, x64: torch.Tensor, x32: torch.Tensor) -> None:
        s = self.config.image_size
        for name, x, side in (("x64", x64, s), ("x32", x32, s // 2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != side or x.shape[3] != side:
                raise ValueError(f"{name} must be [B, 3, {side}, {side}], got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x32.shape[0] != x64.shape[0]:
            raise ValueError(f"x64 and x32 must have the same batch size, got {x64.shape[0]} and {x32.shape[0]}")

    def forward(self, x64: torch.Tensor, x32: torch.Tensor, t64, t32) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x64, x32)
        b, s = x64.shape[0], self.config.image_size
        t64 = _timesteps("t64", t64, b, x64.device)
        t32 = _timesteps("t32", t32, b, x64.device)
        emb = self.time_embed(t64, t32)
        x32_up = F.interpolate(x32, size=(s, s), mode="bilinear", align_corners=False)
        out = self.unet(torch.cat([x64, x32_up.to(x64.dtype)], dim=1), emb)
        eps64 = out[:, :3]
        eps32 = F.interpolate(out[:, 3:], size=(s // 2, s // 2), mode="bilinear", align_corners=False)
        return eps64, eps32

    def num_parameters(self) -> int:
        return count_parameters(self)


class SingleScaleUNet(nn.Module):
    """Baseline: ``forward(x [B,3,S,S], t [B]) -> eps [B,3,S,S]``, the same UNet on one scale.

    Timestep embedding: ``Linear(E, E) ∘ SiLU ∘ Linear(F, E)`` on the sinusoidal features of t
    (F = ``time_freq_dim``, E = ``time_emb_dim``).
    """

    def __init__(self, config: LIFTModelConfig | None = None) -> None:
        super().__init__()
        cfg = copy.deepcopy(config) if config is not None else LIFTModelConfig()
        cfg.validate()
        self.config = cfg
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.time_emb_dim), nn.SiLU(),
                                        nn.Linear(cfg.time_emb_dim, cfg.time_emb_dim))
        self.unet = _build_unet(cfg, 3, 3)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        s = self.config.image_size
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"x must be [B, 3, {s}, {s}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        t = _timesteps("t", t, x.shape[0], x.device)
        w = self.time_embed[0].weight
        emb = self.time_embed(sinusoidal_embedding(t, self.config.time_freq_dim).to(w.dtype))
        return self.unet(x, emb)

    def num_parameters(self) -> int:
        return count_parameters(self)
