"""The β-VAE of the vae experiment: a ResNet encoder, an MLP to a Gaussian latent, a
transposed-convolution decoder that emits **logits**, and a classifier head on the latent.

Layout (the facts of VAE-DG's ``ResNet_VAE``, written anew; F = trunk features, h = ``fc_hidden``):

    encoder: trunk (torchvision ResNet-50 without fc, F = 2048; or ResNet-18, F = 512; or a small
             CNN, F = small_channels[-1]) -> Linear(F, h) + BN + ReLU -> Linear(h, h) + BN + ReLU
             -> mu, logvar = Linear(h, latent), Linear(h, latent)
    z:       mu + exp(logvar / 2) · eps in training mode, mu in eval mode (``sample=`` overrides)
    decoder ``original``: Linear(latent, h) + BN + ReLU -> Linear(h, 64·4·4) + BN + ReLU
             -> 3 x ConvTranspose(k 3, s 2, no padding) 4 -> 9 -> 19 -> 39 (BN + ReLU between,
             BN after the last) -> bilinear resize to the image size. 39² pixels of detail at most:
             it cannot show fine vessels.
    decoder ``deep``: Linear(latent, h) + BN + ReLU -> Linear(h, C·s·s) + BN + ReLU, where
             s = image_size / 2^n is the size reached by halving until odd or <= 7 -> n x
             ConvTranspose(k 4, s 2, p 1) + BN + ReLU, halving the channels (>= 16) -> conv3x3 -> 3.
             The exact image size, no resize.
    classifier: Linear(ReLU(z)) -> num_classes logits

``forward(x) -> (recon_logits [B, 3, S, S], mu [B, latent], logvar [B, latent], class_logits
[B, num_classes])``. The sigmoid of ``recon_logits`` is the reconstruction in [0, 1] (the
original applies the sigmoid inside the model; here ``dualdiff.ops.vae_loss`` applies it).

BatchNorm of the trunk is frozen (kept in eval mode, its affine parameters not trained) only
when pretrained trunk weights are loaded: frozen BN on random weights uses the initial running
statistics (mean 0, var 1) and blows the features up by ~30x.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNetVAE", "TRUNKS", "DECODERS", "deep_decoder_plan"]

TRUNKS = ("resnet50", "resnet18", "small")
DECODERS = ("original", "deep")


def _small_trunk(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                   nn.ReLU(inplace=True)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def _resnet_trunk(name: str, weights_path: str | None) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"model.trunk_weights: no such file: {str(path)!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"model.trunk_weights {str(path)!r} does not fit {name}: missing "
                             f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def deep_decoder_plan(image_size: int) -> tuple[int, int]:
    """``(s, n)``: the deep decoder starts at ``s x s`` and doubles ``n`` times to ``image_size``."""
    s, n = image_size, 0
    while s % 2 == 0 and s > 7:
        s //= 2
        n += 1
    if n == 0:
        raise ValueError(f"the deep decoder needs an even image_size, got {image_size}")
    return s, n


class ResNetVAE(nn.Module):
    """β-VAE with a ResNet encoder and a classifier head (see the module docstring).

    Args:
        image_size: S of the ``[B, 3, S, S]`` input and output.
        trunk: ``resnet50`` | ``resnet18`` (torchvision, ``weights=None``) | ``small`` (CNN of
            stride-2 conv + BN + ReLU stages of ``small_channels``).
        trunk_weights: a local state-dict file for the torchvision trunk (fc keys ignored);
            loading it freezes the trunk's BatchNorm.
        fc_hidden, latent_dim, num_classes: widths (VAE-DG: 1024, 256, 5 grades).
        decoder: ``original`` | ``deep``; ``deep_channels``: width of the deep decoder's first map.
    """

    def __init__(self, image_size: int = 224, *, trunk: str = "resnet50",
                 trunk_weights: str | None = None, small_channels: tuple[int, ...] = (32, 64, 128, 256),
                 fc_hidden: int = 1024, latent_dim: int = 256, num_classes: int = 5,
                 decoder: Literal["original", "deep"] = "original", deep_channels: int = 256) -> None:
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if trunk == "small" and trunk_weights is not None:
            raise ValueError("trunk_weights applies to the torchvision trunks only")
        self.image_size, self.latent_dim, self.decoder_kind = image_size, latent_dim, decoder
        if trunk == "small":
            self.trunk, features = _small_trunk(tuple(small_channels)), small_channels[-1]
        else:
            self.trunk, features = _resnet_trunk(trunk, trunk_weights)
        self.freeze_bn = trunk_weights is not None
        if self.freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        h = fc_hidden
        self.fc = nn.Sequential(nn.Linear(features, h), nn.BatchNorm1d(h, momentum=0.01), nn.ReLU(inplace=True),
                                nn.Linear(h, h), nn.BatchNorm1d(h, momentum=0.01), nn.ReLU(inplace=True))
        self.fc_mu = nn.Linear(h, latent_dim)
        self.fc_logvar = nn.Linear(h, latent_dim)

        if decoder == "original":
            self.start_channels, self.start_size = 64, 4
            convs = [nn.ConvTranspose2d(64, 32, 3, stride=2), nn.BatchNorm2d(32, momentum=0.01), nn.ReLU(inplace=True),
                     nn.ConvTranspose2d(32, 8, 3, stride=2), nn.BatchNorm2d(8, momentum=0.01), nn.ReLU(inplace=True),
                     nn.ConvTranspose2d(8, 3, 3, stride=2), nn.BatchNorm2d(3, momentum=0.01)]
        else:
            s, n = deep_decoder_plan(image_size)
            self.start_channels, self.start_size = deep_channels, s
            convs, c = [], deep_channels
            for _ in range(n):
                c_out = max(c // 2, 16)
                convs += [nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                          nn.ReLU(inplace=True)]
                c = c_out
            convs.append(nn.Conv2d(c, 3, 3, padding=1))
        flat = self.start_channels * self.start_size ** 2
        self.fc_dec = nn.Sequential(nn.Linear(latent_dim, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                                    nn.Linear(h, flat), nn.BatchNorm1d(flat), nn.ReLU(inplace=True))
        self.deconv = nn.Sequential(*convs)
        self.classifier = nn.Linear(latent_dim, num_classes)

    def train(self, mode: bool = True) -> "ResNetVAE":
        super().train(mode)
        if self.freeze_bn:
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 3, S, S]`` (normalised) -> ``(mu, logvar)``, each ``[B, latent_dim]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W], got shape {tuple(x.shape)}")
        h = self.fc(self.trunk(x).flatten(1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        """``z [B, latent_dim]`` -> reconstruction logits ``[B, 3, S, S]``."""
        h = self.fc_dec(z).view(-1, self.start_channels, self.start_size, self.start_size)
        out = self.deconv(h)
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear",
                                align_corners=False)
        return out

    def classify(self, z: Tensor) -> Tensor:
        """Grade logits ``[B, num_classes]`` of latents ``z``: ``Linear(ReLU(z))``."""
        return self.classifier(F.relu(z))

    def forward(self, x: Tensor, sample: bool | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(recon_logits, mu, logvar, class_logits)``; ``sample`` None = sample in training mode."""
        mu, logvar = self.encode(x)
        if sample is None:
            sample = self.training
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return self.decode(z), mu, logvar, self.classify(z)
