"""Latents of a dataset, encoded once by the autoencoder and cached in one ``.pt`` file.

A :class:`LatentCache` holds, for N tiles: ``latents [N, C, h, w]`` float32 (the encoder's
posterior mean, *unscaled*), ``dist [N, K]`` (class fractions; zeros without a mask),
``has_mask [N]`` bool, and ``scale`` (the factor the diffusion model sees the latents
multiplied by: the autoencoder's scaling factor, or 1/std of these latents, see
:func:`latent_scale`), plus ``meta`` (a JSON-able dict: autoencoder source, image size, split).
No ``2x - 1`` and no clamping: latents are not images.

Saved with :func:`torch.save` and read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dualdiff.errors import DataError

__all__ = ["LatentCache", "encode_dataset", "latent_scale", "CacheError"]


class CacheError(DataError):
    """A missing or malformed latent cache (a user's mistake: wrong path, stale file)."""


@dataclass
class LatentCache:
    latents: Tensor
    dist: Tensor
    has_mask: Tensor
    scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if self.latents.dim() != 4:
            raise CacheError(f"latents must be [N, C, h, w], got {tuple(self.latents.shape)}")
        if self.dist.dim() != 2 or self.dist.shape[0] != n or self.has_mask.shape != (n,):
            raise CacheError(f"dist [N, K] and has_mask [N] must match N={n}, got "
                             f"{tuple(self.dist.shape)} and {tuple(self.has_mask.shape)}")
        if not (self.scale > 0 and torch.isfinite(torch.tensor(self.scale))):
            raise CacheError(f"scale must be a positive finite float, got {self.scale}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def scaled(self) -> Tensor:
        """``scale · latents``: what the diffusion model is trained on."""
        return self.latents * self.scale

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"latents": self.latents.contiguous(), "dist": self.dist, "has_mask": self.has_mask,
                    "scale": float(self.scale), "meta": dict(self.meta)}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatentCache":
        path = Path(path)
        if not path.is_file():
            raise CacheError(f"latent cache {str(path)!r} does not exist: run `dualdiff ldm encode` first")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt / foreign file
            raise CacheError(f"latent cache {str(path)!r} cannot be read: {e}") from e
        missing = {"latents", "dist", "has_mask", "scale"} - set(d)
        if missing:
            raise CacheError(f"latent cache {str(path)!r} lacks {sorted(missing)}")
        return cls(d["latents"], d["dist"], d["has_mask"], float(d["scale"]), dict(d.get("meta") or {}))


def latent_scale(latents: Tensor, ae_scaling_factor: float | None, mode: str = "auto") -> float:
    """The factor applied to cached latents: ``mode='ae'`` the autoencoder's ``scaling_factor``,
    ``'std'`` 1/std of ``latents``, ``'auto'`` the autoencoder's when it has one other than 1
    (a fitted one), else 1/std."""
    if mode not in ("auto", "ae", "std"):
        raise ValueError(f"ae.scale must be auto, ae or std, got {mode!r}")
    if mode == "ae" or (mode == "auto" and ae_scaling_factor not in (None, 1.0)):
        if ae_scaling_factor is None:
            raise ValueError("ae.scale=ae but the autoencoder has no scaling factor")
        return float(ae_scaling_factor)
    std = float(latents.float().std())
    if not std > 0:
        raise ValueError(f"cannot scale latents by 1/std: std is {std}")
    return 1.0 / std


@torch.no_grad()
def encode_dataset(encode: Callable[[Tensor], Tensor], dataset, *, batch_size: int = 32,
                   device: torch.device | str = "cpu", progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(latents [N, C, h, w] float32 CPU, dist [N, K], has_mask [N])`` of every item of
    ``dataset`` (dicts with image, dist, has_mask), ``encode(images [B, 3, S, S] in [0, 1])``
    returning unscaled latents."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="encode")
    zs, ds, ms = [], [], []
    for batch in loader:
        zs.append(encode(batch["image"].to(device)).float().cpu())
        ds.append(batch["dist"].float())
        ms.append(batch["has_mask"].bool())
    if not zs:
        raise CacheError("the dataset to encode is empty")
    return torch.cat(zs), torch.cat(ds), torch.cat(ms)
