"""An offline stand-in for FID: the Fréchet distance in a small autoencoder's features.

FID needs pytorch-fid's Inception weights, which an offline machine may not have. This module
gives a **proxy**, always to be named as one (:data:`PROXY_NAME`): a small convolutional
autoencoder (:class:`ConvAutoencoder`) is trained, seeded, on images of the data distribution
(for the LIFT study: procedural images drawn with the proxy's own seed, not any run's training
set), and the Fréchet distance (:func:`dualdiff.ops.frechet_distance`, the FID formula) is
computed between the Gaussians fitted to two image sets' bottleneck codes (the encoder's output,
the network's penultimate layer before the decoder). Its numbers are comparable only within one
trained proxy (same config, same seed): they are not FID values and not comparable to FIDs.

Also here: :func:`nearest_mse`, the per-image mean squared error to the nearest reference image
(a cheap fidelity number: low means close to some training image; it does not see diversity,
and a memorising model scores 0).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.ops.frechet import frechet_distance

__all__ = ["PROXY_NAME", "PROXY_SHORT", "FeatureProxyConfig", "ConvAutoencoder", "train_feature_proxy",
           "feature_statistics", "proxy_frechet_distance", "nearest_mse", "save_feature_proxy",
           "load_feature_proxy"]

#: the proxy's name, used in every table and figure that shows its numbers
PROXY_NAME = "AE-FD proxy (Fréchet distance in a small autoencoder's features; not FID)"
#: short form for axis labels and column heads
PROXY_SHORT = "AE-FD (proxy, not FID)"


@dataclass
class FeatureProxyConfig:
    """The proxy network and its training: ``channels`` per stride-2 encoder stage,
    ``features`` (the bottleneck width = the feature dimension), ``steps`` Adam steps of
    ``batch_size`` at ``lr`` on ``num_images`` images, ``seed`` (initial weights, batches and,
    for procedural data, which images)."""
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    features: int = 32
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    num_images: int = 512
    seed: int = 12345

    def validate(self) -> None:
        """Raise ValueError naming the bad key."""
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"proxy.channels must be a non-empty list of positive ints, got {self.channels}")
        for k in ("features", "steps", "batch_size", "num_images"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"proxy.{k} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"proxy.lr must be > 0, got {self.lr}")


class ConvAutoencoder(nn.Module):
    """``[B, 3, S, S]`` in [-1, 1] -> code ``[B, features]`` -> reconstruction; S must be a
    multiple of ``2 ** len(channels)``. :meth:`features` returns the code."""

    def __init__(self, image_size: int, channels: list[int], features: int, in_channels: int = 3):
        super().__init__()
        k = 2 ** len(channels)
        if image_size % k:
            raise ValueError(f"image_size {image_size} must be a multiple of {k} for {len(channels)} stages")
        self.image_size, self.channels, self.num_features = image_size, list(channels), features
        enc: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.encoder = nn.Sequential(*enc)
        self._side = image_size // k
        flat = channels[-1] * self._side ** 2
        self.to_code = nn.Linear(flat, features)
        self.from_code = nn.Linear(features, flat)
        dec: list[nn.Module] = []
        rev = list(reversed(channels))
        for c, c_next in zip(rev, rev[1:] + [rev[-1]]):
            dec += [nn.SiLU(), nn.ConvTranspose2d(c, c_next, 4, stride=2, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(rev[-1], in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck code ``[B, features]`` of images ``x`` in [-1, 1]."""
        return self.to_code(self.encoder(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.from_code(self.features(x)).view(x.shape[0], self.channels[-1], self._side, self._side)
        return self.decoder(h)


def train_feature_proxy(images: torch.Tensor, config: FeatureProxyConfig | None = None) -> ConvAutoencoder:
    """Train the proxy autoencoder on ``images`` ``[N, 3, S, S]`` in [-1, 1] (MSE reconstruction,
    Adam, batches drawn with a generator seeded by ``config.seed``; initial weights seeded by it
    too); returns it in eval mode, on the images' device."""
    cfg = config or FeatureProxyConfig()
    cfg.validate()
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"images must be [N >= 2, C, S, S], got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain non-finite values")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = ConvAutoencoder(images.shape[-1], cfg.channels, cfg.features, images.shape[1]).to(images.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n = images.shape[0]
    net.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)
        x = images[idx.to(images.device)]
        loss = F.mse_loss(net(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.final_loss = float(loss.detach())  # type: ignore[attr-defined]
    return net.eval()


@torch.no_grad()
def feature_statistics(net: ConvAutoencoder, images: torch.Tensor, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` float64 of the proxy features of ``images`` (N >= 2, in
    [-1, 1]; covariance with N - 1 as ``np.cov``)."""
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"need images [N >= 2, C, S, S] for a covariance, got shape {tuple(images.shape)}")
    dev = next(net.parameters()).device
    feats = [net.features(images[s:s + batch_size].to(dev).float()).double().cpu()
             for s in range(0, images.shape[0], batch_size)]
    f = torch.cat(feats).numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def proxy_frechet_distance(net: ConvAutoencoder, a, b) -> float:
    """The proxy's Fréchet distance between two image sets (tensors ``[N, 3, S, S]`` in
    [-1, 1]) or precomputed ``(mu, sigma)`` pairs of :func:`feature_statistics`."""
    sa = feature_statistics(net, a) if isinstance(a, torch.Tensor) else a
    sb = feature_statistics(net, b) if isinstance(b, torch.Tensor) else b
    return frechet_distance(sa[0], np.atleast_2d(sa[1]), sb[0], np.atleast_2d(sb[1]))


@torch.no_grad()
def nearest_mse(samples: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per sample, the mean squared error (over pixels) to its nearest image in ``reference``
    (both ``[N, C, H, W]`` of the same size); returns float64 ``[N]``."""
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in size")
    s = samples.flatten(1).double()
    r = reference.flatten(1).double().to(s.device)
    d = s.shape[1]
    out = []
    r2 = r.square().sum(1)
    for k in range(0, s.shape[0], chunk):
        x = s[k:k + chunk]
        dist = (x.square().sum(1, keepdim=True) + r2[None] - 2 * x @ r.T).clamp_min(0) / d
        out.append(dist.min(dim=1).values)
    return torch.cat(out).cpu()


def save_feature_proxy(net: ConvAutoencoder, config: FeatureProxyConfig, path: str | os.PathLike,
                       meta: dict | None = None) -> Path:
    """Write the proxy (weights, its config, ``meta``) atomically to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    torch.save({"state_dict": net.state_dict(), "config": asdict(config), "image_size": net.image_size,
                "meta": dict(meta or {})}, tmp)
    os.replace(tmp, p)
    return p


def load_feature_proxy(path: str | os.PathLike) -> tuple[ConvAutoencoder, FeatureProxyConfig, dict]:
    """``(net in eval mode, config, meta)`` from :func:`save_feature_proxy`'s file."""
    d = torch.load(Path(path), map_location="cpu", weights_only=True)
    cfg = FeatureProxyConfig(**d["config"])
    net = ConvAutoencoder(int(d["image_size"]), cfg.channels, cfg.features)
    net.load_state_dict(d["state_dict"])
    return net.eval(), cfg, dict(d.get("meta", {}))
