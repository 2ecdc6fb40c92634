"""vae experiment: β-VAE with KL annealing, the reconstruction fix and subset training, for
domain generalisation on fundus images (VAE-DG), plus the spatial ``conv_kl`` autoencoder.

Loss (``loss="fixed"``, the default), per batch of B images with model input x (ImageNet-
normalised), target t (the same image in [0, 1]), grades y and latent dimension D:

    recon = mean BCE(sigmoid(logits), t)                     (over all B·3·S·S elements)
    KL    = (1 / (B·D)) Σ_b Σ_j -0.5 (1 + logvar - mu² - exp(logvar))   (the seed's convention:
            a mean over batch AND latent dims; ``dualdiff.ops.vae_loss`` sums over the latent, so
            it is called with kl_weight / D)
    CE    = mean cross-entropy(classify(z), y)
    total = recon + β(step) · kl_weight · KL + y_weight · CE

``loss="legacy"`` is VAE-DG's original: ``BCE_sum(sigmoid(logits), x)`` against the *normalised*
input, ``+ β(step) · 50 000 · KL + 50 000 · CE_sum`` (with ``anneal=none`` exactly the original).
Current PyTorch refuses that target in ``F.binary_cross_entropy`` (values outside [0, 1]); the
logit form used here, ``softplus(l) - l·x``, is the same formula for any x.

``conv_kl`` (:class:`dualdiff.models.autoencoder.ConvKLAutoencoder`) trains with the same loss
and annealing, D = 4·(S/f)², no classifier (CE = 0).

β(step) is :func:`kl_anneal_weight`. The step passed to the loss is the number of optimizer
steps already taken (0 for the first). By default the linear ramp ends at 25 % of
``train.steps`` and the cyclical schedule spans the run (:class:`VAEConfig`).

Effective β (:meth:`VAEConfig.effective_beta`): multiplying the fixed loss by 3·S² (the
pixels of a sample) gives ``BCE summed over a sample's pixels + kl_weight·(3·S²/D)·KL summed
over its latent dims`` (both batch means) ``+ ...``, the usual β-VAE form with
β = kl_weight · 3·S² / D. The seed's kl_weight 1e-4 is β ≈ 0.059 at 224², D = 256 (default)
and β ≈ 0.038 at 64², D = 32 (tiny): a KL term about 17-26x weaker than the ELBO's (β = 1);
kl_weight 1e-3 gives β ≈ 0.59 / 0.38.

Outputs of :func:`train_vae` under ``out_dir``: the Trainer's ``metrics.jsonl`` / ``.csv``
(per step: loss, recon, kl, ce, beta, lr ...), ``config.yaml``, ``checkpoints/``,
``recon_step_<N>/grid.png`` (every ``train.eval_every`` steps: validation inputs on top,
reconstructions below), ``recon_final/grid.png``, ``metrics.json`` (validation and test
metrics: PSNR, SSIM, high-pass error, active units, accuracy per environment),
``training.png`` (loss terms and β). :func:`evaluate_vae_run` (``dualdiff vae eval``) scores a
finished run again (``eval.json``, ``eval_recon/grid.png``).

Size (over ~500 lines): KL annealing, config, loss, evaluation and the train / eval / loo /
sweep / demo entry points; the image metrics are in :mod:`dualdiff.metrics.image`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualdiff.config import refuse_changes
from dualdiff.errors import ConfigError
from dualdiff.experiments.run import apply_run_flags, check_resume, from_name, load_run, load_weights
from dualdiff.metrics.image import active_units, highpass_error, image_metrics
from dualdiff.train import TrainConfig, Trainer
from dualdiff.utils.seed import derive_seed

__all__ = ["ANNEAL_SCHEDULES", "DEFAULT_ANNEAL_END_FRAC", "LEGACY_WEIGHT", "kl_anneal_weight", "VAEModelConfig", "VAEDataConfig",
           "VAEConfig", "VAE_PRESETS", "VAELoss", "build_vae_model", "build_vae_data", "eval_selection",
           "evaluate_vae",
           "evaluate_vae_run",
           "EVAL_KEYS",
           "train_vae", "load_vae_model", "loo_vae", "sweep_vae", "plot_vae", "demo_vae", "image_metrics",
           "highpass_error", "active_units"]

log = logging.getLogger("dualdiff.vae")

ANNEAL_SCHEDULES = ("none", "linear", "cyclical")
#: where the linear ramp ends when neither anneal_end nor anneal_end_frac is given (a fraction
#: of train.steps: the ramp should end at 10-30 % of training)
DEFAULT_ANNEAL_END_FRAC = 0.25
LEGACY_WEIGHT = 50_000.0


# ---------------------------------------------------------------------------------------
# KL annealing


def _check_anneal(schedule: str, start: int, end: int, total_steps: int | None, cycles: int,
                  ratio: float, prefix: str = "") -> None:
    """Raise ValueError naming the argument (``prefix`` + name; the config's keys are ``anneal_*``)."""
    if schedule not in ANNEAL_SCHEDULES:
        raise ConfigError(f"{prefix.rstrip('_') or 'schedule'} must be one of {ANNEAL_SCHEDULES}, got {schedule!r}")
    if start < 0:
        raise ConfigError(f"{prefix}start must be >= 0, got {start}")
    if end < start:
        raise ConfigError(f"{prefix}end ({end}) must be >= {prefix}start ({start})")
    if total_steps is not None and total_steps < 1:
        raise ConfigError(f"{prefix}total_steps must be >= 1 or None, got {total_steps}")
    if cycles < 1:
        raise ConfigError(f"{prefix}cycles must be >= 1, got {cycles}")
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"{prefix}ratio must be in (0, 1], got {ratio}")
    if schedule == "cyclical" and total_steps is None and end == start:
        raise ConfigError(f"cyclical annealing needs {prefix}total_steps or {prefix}end > {prefix}start")


def kl_anneal_weight(step: int, *, schedule: str, start: int = 0, end: int = 5000,
                     total_steps: int | None = None, cycles: int = 4, ratio: float = 0.5) -> float:
    """β(step) in [0, 1] for the KL term.

    * ``none``: 1.
    * ``linear``: 0 before ``start``, ``(step - start) / (end - start)`` in between, 1 from ``end``.
    * ``cyclical``: ``frange_cycle_linear`` of the cyclical-annealing paper (Fu et al. 2019) over
      ``total_steps`` steps counted from ``start`` (None: ``end - start``): period
      p = total_steps / cycles; in each period β ramps 0 -> 1 over ratio·p steps, then holds 1.
      With i = step - start - floor(c·p) for the period c the step falls in, β = min(1, i / (ratio·p)).
      0 before ``start``, 1 after the last period.
    """
    _check_anneal(schedule, start, end, total_steps, cycles, ratio)
    if schedule == "none":
        return 1.0
    if step < start:
        return 0.0
    if schedule == "linear":
        return 1.0 if step >= end else (step - start) / (end - start)
    n = total_steps if total_steps is not None else end - start
    s = step - start
    if s >= n:
        return 1.0
    period = n / cycles
    c = min(int(s // period), cycles - 1)
    while c > 0 and math.floor(c * period) > s:  # float rounding at a period boundary
        c -= 1
    while c + 1 < cycles and math.floor((c + 1) * period) <= s:
        c += 1
    i = s - math.floor(c * period)
    return min(1.0, i / (period * ratio))


# ---------------------------------------------------------------------------------------
# config


@dataclass
class VAEModelConfig:
    """``arch``: ``resnet_vae`` (:class:`dualdiff.models.vae.ResNetVAE`: ``trunk``,
    ``trunk_weights``, ``small_channels``, ``fc_hidden``, ``latent_dim``, ``decoder``,
    ``deep_channels``) or ``conv_kl`` (:class:`dualdiff.models.autoencoder.ConvKLAutoencoder`:
    ``latent_channels``, ``base_channels``, ``channel_mults``, ``downsample_factor``,
    ``num_res_blocks``, ``mid_attention``). ``num_classes`` None = the data's."""
    arch: Literal["resnet_vae", "conv_kl"] = "resnet_vae"
    image_size: int = 224
    trunk: Literal["resnet50", "resnet18", "small"] = "resnet50"
    trunk_weights: str | None = None
    small_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    fc_hidden: int = 1024
    latent_dim: int = 256
    num_classes: int | None = None
    decoder: Literal["original", "deep"] = "original"
    deep_channels: int = 256
    latent_channels: int = 4
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    downsample_factor: int = 8
    num_res_blocks: int = 1
    mid_attention: bool = True

    def validate(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"model.image_size must be >= 16, got {self.image_size}")
        for name in ("fc_hidden", "latent_dim", "deep_channels", "latent_channels", "base_channels",
                     "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2 or None, got {self.num_classes}")
        if not self.small_channels or min(self.small_channels) < 1:
            raise ConfigError(f"model.small_channels must be positive ints, got {self.small_channels}")
        if self.trunk == "small" and self.trunk_weights is not None:
            raise ConfigError("model.trunk_weights applies to the resnet trunks only")
        if self.decoder == "deep" and self.image_size % 2:
            raise ConfigError(f"model.decoder=deep needs an even model.image_size, got {self.image_size}")
        if self.arch == "conv_kl":
            f = self.downsample_factor
            if f < 2 or f & (f - 1) or f > 2 ** len(self.channel_mults):
                raise ConfigError(f"model.downsample_factor must be a power of two <= "
                                 f"2**len(model.channel_mults), got {f}")
            if self.image_size % f:
                raise ConfigError(f"model.image_size ({self.image_size}) must be divisible by "
                                 f"model.downsample_factor ({f})")


@dataclass
class VAEDataConfig:
    """``source``: ``fundus`` (embedded synthetic set, ``num_per_env`` images per environment of
    ``environments``, None = all four) or ``folder`` (DomainBed tree at ``path``). ``test_env``:
    the held-out environment's name (None: train on every environment, no test set).
    ``holdout_fraction``: per training environment, the share kept for validation.
    ``subset_size``: N images per training environment (seeded). ``seed``: data and splits.
    ``verify`` / ``skip_bad`` (folder source): the images are checked when the dataset is built
    (``verify``: fully decoded); a bad one is an error naming it, or with ``skip_bad`` is skipped
    with a warning (:mod:`dualdiff.data.checks`)."""
    source: Literal["fundus", "folder"] = "fundus"
    path: str | None = None
    num_per_env: int = 200
    environments: list[str] | None = None
    test_env: str | None = None
    holdout_fraction: float = 0.2
    subset_size: int | None = None
    seed: int = 0
    verify: bool = False
    skip_bad: bool = False

    def validate(self) -> None:
        if self.source == "folder" and not self.path:
            raise ConfigError("data.path is required when data.source is 'folder'")
        if self.num_per_env < 1:
            raise ConfigError(f"data.num_per_env must be >= 1, got {self.num_per_env}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.subset_size is not None and self.subset_size < 1:
            raise ConfigError(f"data.subset_size must be >= 1 or None, got {self.subset_size}")
        if self.source == "fundus":
            from dualdiff.data.fundus import FUNDUS_ENVIRONMENTS
            envs = self.environments or list(FUNDUS_ENVIRONMENTS)
            bad = [e for e in envs if e not in FUNDUS_ENVIRONMENTS]
            if bad:
                raise ConfigError(f"data.environments: unknown {bad}; choose from {list(FUNDUS_ENVIRONMENTS)}")
            if self.test_env is not None and self.test_env not in envs:
                raise ConfigError(f"data.test_env {self.test_env!r} is not one of {envs}")
            if self.subset_size is not None:
                n_in = self.num_per_env - int(self.num_per_env * self.holdout_fraction)
                if self.subset_size > n_in:
                    raise ConfigError(f"data.subset_size={self.subset_size} is larger than an environment "
                                     f"({n_in} images in its training split)")


def _default_train() -> TrainConfig:
    return TrainConfig(steps=5000, batch_size=32, lr=1e-4, optimizer="adam", out_dir="runs/vae",
                       checkpoint_every=1000, eval_every=500, log_every=10)


@dataclass
class VAEConfig:
    """The whole vae run. Loss keys (module docstring): ``loss`` fixed | legacy, ``recon``
    bce | mse, ``kl_weight`` and ``y_weight`` (the seed's values, KL in its per-latent-dim
    convention; :meth:`effective_beta` converts to the usual β), ``anneal`` none | linear |
    cyclical (:func:`kl_anneal_weight`), its steps set in fractions of ``train.steps`` or in
    absolute steps (:meth:`anneal_kwargs` resolves them):

    * ``anneal_start``: the step the ramp starts (0).
    * ``anneal_end_frac`` / ``anneal_end``: where the linear ramp reaches β = 1, as a fraction of
      ``train.steps`` (rounded) or an absolute step; give at most one. Neither:
      :data:`DEFAULT_ANNEAL_END_FRAC` (0.25; the ramp ends at 10-30 % of training).
    * cyclical (``frange_cycle_linear``: ``anneal_cycles`` periods, each ramping over
      ``anneal_ratio`` of it, then β = 1): its span ``anneal_total_frac`` (of ``train.steps``)
      or ``anneal_total_steps``, at most one; neither: ``anneal_end - anneal_start`` when an end
      key is given, else the rest of the run (``train.steps - anneal_start``).

    A key that would be ignored is an error: both keys of a pair, ``anneal_total_*`` without
    ``anneal=cyclical``, an end key with ``anneal=none``.
    ``loss_backend``: vae_loss backend (None = auto). ``recon_images``: images per grid.
    ``eval_images``: validation / test images used for the metrics (0 = all; fewer than
    held out: a seeded subset stratified by class and environment, :func:`eval_selection`). ``plots``: draw
    ``training.png`` at the end (the PNG grids are always written)."""
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    loss: Literal["fixed", "legacy"] = "fixed"
    recon: Literal["bce", "mse"] = "bce"
    kl_weight: float = 1e-4
    y_weight: float = 0.1
    anneal: str = "linear"
    anneal_start: int = 0
    anneal_end: int | None = None
    anneal_end_frac: float | None = None
    anneal_total_steps: int | None = None
    anneal_total_frac: float | None = None
    anneal_cycles: int = 4
    anneal_ratio: float = 0.5
    loss_backend: str | None = None
    recon_images: int = 8
    eval_images: int = 256
    plots: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.anneal_kwargs()  # checks the anneal_* keys
        for name in ("kl_weight", "y_weight"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite float >= 0, got {v}")
        if self.loss == "legacy" and self.recon != "bce":
            raise ConfigError("loss=legacy is the original BCE loss: it needs recon=bce")
        if self.recon_images < 1 or self.eval_images < 0:
            raise ConfigError(f"recon_images must be >= 1 and eval_images >= 0, got "
                             f"{self.recon_images}, {self.eval_images}")

    def anneal_kwargs(self) -> dict[str, Any]:
        """:func:`kl_anneal_weight`'s keyword arguments in absolute steps (class docstring);
        :class:`ConfigError` naming the key for a conflicting or out-of-range one."""
        steps = self.train.steps
        for a, b in (("anneal_end", "anneal_end_frac"), ("anneal_total_steps", "anneal_total_frac")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ConfigError(f"{a}={getattr(self, a)} and {b}={getattr(self, b)} conflict: give one of them")
        for name in ("anneal_end_frac", "anneal_total_frac"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise ConfigError(f"{name} must be in (0, 1] (a fraction of train.steps), got {v}")
        if self.anneal != "cyclical" and (self.anneal_total_steps is not None or self.anneal_total_frac is not None):
            raise ConfigError(f"anneal_total_steps / anneal_total_frac apply to anneal=cyclical only "
                              f"(anneal={self.anneal})")
        end_given = self.anneal_end is not None or self.anneal_end_frac is not None
        if self.anneal == "none" and end_given:
            raise ConfigError("anneal_end / anneal_end_frac do not apply to anneal=none")
        start = self.anneal_start
        if self.anneal_end is not None:
            end = self.anneal_end
        else:
            frac = self.anneal_end_frac if self.anneal_end_frac is not None else DEFAULT_ANNEAL_END_FRAC
            end = int(round(frac * steps))
            if self.anneal == "linear" and end < start:
                raise ConfigError(f"anneal_start ({start}) is after the ramp's end ({end} = {frac:g} x "
                                  f"train.steps {steps}): set anneal_end_frac or anneal_end later")
        total = self.anneal_total_steps
        if self.anneal == "cyclical" and total is None:
            if self.anneal_total_frac is not None:
                total = int(round(self.anneal_total_frac * steps))
            elif end_given:
                total = end - start
            else:
                total = steps - start
            if total < 1:
                raise ConfigError(f"the cyclical schedule's span is {total} steps (anneal_start {start}, "
                                  f"train.steps {steps}): it must be >= 1")
        if self.anneal != "linear" and not end_given:
            end = max(end, start)  # unused: none has no ramp, cyclical runs over ``total``
        _check_anneal(self.anneal, start, end, total, self.anneal_cycles, self.anneal_ratio, prefix="anneal_")
        return dict(schedule=self.anneal, start=start, end=end, total_steps=total, cycles=self.anneal_cycles,
                    ratio=self.anneal_ratio)

    def effective_beta(self) -> float:
        """β in the usual β-VAE convention: the KL weight relative to a reconstruction term summed
        over the pixels (3·S·S) of a sample and a KL summed over its D latent dims, both averaged
        over the batch (β = 1: the ELBO with a Bernoulli decoder). The fixed loss divides the BCE by
        3·S·S and the KL by D, so β = kl_weight · 3·S² / D (× β(step) while annealing); the legacy
        loss sums the BCE over the batch and divides the KL by B·D, so β = 50 000 / (B·D)."""
        s, m = self.model.image_size, self.model
        d = m.latent_dim if m.arch == "resnet_vae" else m.latent_channels * (s // m.downsample_factor) ** 2
        if self.loss == "legacy":
            return LEGACY_WEIGHT / (self.train.batch_size * d)
        return self.kl_weight * 3 * s * s / d

    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        """A fresh copy of the preset ``name`` (:data:`VAE_PRESETS`)."""
        return from_name(VAE_PRESETS, name, cls.__name__)


def _tiny() -> VAEConfig:
    """64², a small CNN trunk, deep decoder, 200 steps of 16 images (β ramps over the first 25 %)."""
    model = VAEModelConfig(image_size=64, trunk="small", fc_hidden=256, latent_dim=32, decoder="deep",
                           deep_channels=128, base_channels=32)
    train = TrainConfig(steps=200, batch_size=16, lr=1e-3, optimizer="adam", out_dir="runs/vae-tiny",
                        checkpoint_every=0, eval_every=50, log_every=10, progress=False)
    return VAEConfig(model=model, data=VAEDataConfig(num_per_env=64), train=train,
                     eval_images=128)


def _demo() -> VAEConfig:
    """The tiny preset writing to ``runs/vae-demo``."""
    cfg = _tiny()
    cfg.train.out_dir = "runs/vae-demo"
    return cfg


#: name -> zero-argument function building a fresh config (``preset=NAME``)
VAE_PRESETS: dict[str, Callable[[], VAEConfig]] = {
    "default": VAEConfig,  # 224², ResNet-50 (weights=None unless model.trunk_weights), the original decoder
    "tiny": _tiny,
    "demo": _demo,
}


# ---------------------------------------------------------------------------------------
# building


def build_vae_data(cfg: VAEDataConfig, image_size: int):
    """``(dataset, DomainSplit, test_env_index or None)`` (see :mod:`dualdiff.data.fundus`)."""
    from dualdiff.data.fundus import DatasetError, DomainFolder, SyntheticFundus, domain_split

    if cfg.source == "fundus":
        ds = SyntheticFundus(cfg.num_per_env, image_size, environments=cfg.environments, seed=cfg.seed)
    else:
        ds = DomainFolder(cfg.path, image_size, verify=cfg.verify, skip_bad=cfg.skip_bad)
    test = []
    if cfg.test_env is not None:
        if cfg.test_env not in ds.environments:
            raise DatasetError(f"data.test_env {cfg.test_env!r} is not one of {ds.environments}")
        test = [ds.environments.index(cfg.test_env)]
    split = domain_split(ds.env_labels, test, holdout_fraction=cfg.holdout_fraction, seed=cfg.seed,
                         subset_size=cfg.subset_size, environments=ds.environments)
    return ds, split, (test[0] if test else None)


def build_vae_model(cfg: VAEModelConfig, num_classes: int = 5) -> nn.Module:
    """The model of ``cfg.arch`` (``cfg.num_classes`` overrides ``num_classes``)."""
    if cfg.arch == "conv_kl":
        from dualdiff.models.autoencoder import ConvKLAutoencoder

        return ConvKLAutoencoder(3, cfg.latent_channels, cfg.base_channels, tuple(cfg.channel_mults),
                                 cfg.downsample_factor, num_res_blocks=cfg.num_res_blocks,
                                 mid_attention=cfg.mid_attention)
    from dualdiff.models.vae import ResNetVAE

    return ResNetVAE(cfg.image_size, trunk=cfg.trunk, trunk_weights=cfg.trunk_weights,
                     small_channels=tuple(cfg.small_channels), fc_hidden=cfg.fc_hidden,
                     latent_dim=cfg.latent_dim, num_classes=cfg.num_classes or num_classes,
                     decoder=cfg.decoder, deep_channels=cfg.deep_channels)


def _forward(model: nn.Module, x: Tensor, sample: bool | None = None):
    """``(logits, mu [B, D], logvar [B, D], class_logits or None)`` for either architecture."""
    out = model(x) if sample is None else model(x, sample=sample)
    if len(out) == 4:
        logits, mu, logvar, y_logits = out
    else:
        (logits, mu, logvar), y_logits = out, None
    return logits, mu.flatten(1), logvar.flatten(1), y_logits


# ---------------------------------------------------------------------------------------
# loss


class VAELoss:
    """``loss_fn(model, batch, step) -> (total, {recon, kl, ce, beta})`` for the Trainer.

    ``batch = (x, target, y, env)``; ``step``: optimizer steps taken so far (the Trainer passes
    it). ``kl`` is logged per latent dim (the seed's convention), ``recon`` and ``ce`` as they
    enter the total.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        self.cfg = cfg
        self.anneal = cfg.anneal_kwargs()

    def __call__(self, model: nn.Module, batch, step: int):
        x, target, y = batch[0], batch[1], batch[2]
        beta = kl_anneal_weight(int(step), **self.anneal)
        logits, mu, logvar, y_logits = _forward(model, x)
        total, parts = self.terms(logits, x, target, mu, logvar, y_logits, y, beta)
        return total, parts

    def terms(self, logits: Tensor, x: Tensor, target: Tensor, mu: Tensor, logvar: Tensor,
              y_logits: Tensor | None, y: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and its parts from model outputs (module docstring)."""
        from dualdiff.ops import vae_loss

        cfg = self.cfg
        b, d = mu.shape
        if cfg.loss == "legacy":
            # sum reduction: kl = Σ_b kl_b, the original's KLD = that / (B·D)
            rec_total, rec, kl = vae_loss(logits, x.to(logits.dtype), mu, logvar,
                                          kl_weight=beta * LEGACY_WEIGHT / (b * d), recon="bce",
                                          reduction="sum", backend=cfg.loss_backend)
            kl_per_dim = kl / (b * d)
            ce = F.cross_entropy(y_logits.float(), y, reduction="sum") if y_logits is not None \
                else rec_total.new_zeros(())
            total = rec_total + LEGACY_WEIGHT * ce
        else:
            rec_total, rec, kl = vae_loss(logits, target.to(logits.dtype), mu, logvar,
                                          kl_weight=beta * cfg.kl_weight / d, recon=cfg.recon,
                                          reduction="mean", backend=cfg.loss_backend)
            kl_per_dim = kl / d
            ce = F.cross_entropy(y_logits.float(), y) if y_logits is not None else rec_total.new_zeros(())
            total = rec_total + cfg.y_weight * ce
        parts = {"recon": rec.detach(), "kl": kl_per_dim.detach(), "ce": ce.detach(),
                 "beta": torch.tensor(float(beta))}
        return total, parts


# ---------------------------------------------------------------------------------------
# metrics (dualdiff.metrics.image: image_metrics, highpass_error, active_units)


def eval_selection(dataset, indices: list[int], max_images: int = 0, *, seed: int = 0) -> list[int]:
    """The items of ``indices`` a metric is computed on: all of them when ``max_images`` is 0 or
    at least ``len(indices)``, else a seeded subset of ``max_images`` stratified by (class,
    environment): each (class, env) group of the held-out images gets its proportional share
    (largest remainder; ties to the larger group, then the earlier one), drawn by a permutation
    seeded by ``(seed, class, env)``. Needs the dataset's ``labels`` / ``env_labels`` arrays;
    without them, a seeded uniform subset. Returned in increasing order.

    (Split indices come grouped — a test environment in class-folder order, validation sorted by
    environment — so the first ``max_images`` would score one class or one environment.)"""
    idx = [int(i) for i in indices]
    if not max_images or max_images >= len(idx):
        return sorted(idx)
    labels = getattr(dataset, "labels", None)
    envs = getattr(dataset, "env_labels", None)
    if labels is None or envs is None:
        rng = np.random.default_rng(derive_seed(seed, "eval-subset"))
        return sorted(np.asarray(idx)[rng.permutation(len(idx))[:max_images]].tolist())
    labels, envs = np.asarray(labels), np.asarray(envs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in idx:
        groups.setdefault((int(labels[i]), int(envs[i])), []).append(i)
    keys = sorted(groups)
    exact = {k: max_images * len(groups[k]) / len(idx) for k in keys}
    quota = {k: int(math.floor(exact[k])) for k in keys}
    left = max_images - sum(quota.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), -len(groups[k]), k))[:left]:
        quota[k] += 1
    chosen: list[int] = []
    for k in keys:
        members = np.asarray(sorted(groups[k]))
        rng = np.random.default_rng(derive_seed(seed, "eval-subset", k[0], k[1]))
        chosen += members[rng.permutation(len(members))[:quota[k]]].tolist()
    return sorted(chosen)


@torch.no_grad()
def evaluate_vae(model: nn.Module, dataset, indices: list[int], *, device: torch.device | str = "cpu",
                 batch_size: int = 32, max_images: int = 0, seed: int = 0) -> dict[str, Any]:
    """Reconstruction and classifier metrics on ``dataset[indices]`` (eval mode, z = mu).

    ``max_images`` (0 = all) caps the images scored by :func:`eval_selection` (stratified by
    class and environment, seeded by ``seed``); per-environment accuracies come from the same
    images. Returns ``psnr``, ``ssim``, ``highpass_rel_error``, ``recon_bce`` (means),
    ``active_units``, ``latent_dim``, ``accuracy`` and ``accuracy_per_env`` ({name: acc}) when
    the model classifies, ``n`` (images scored) and ``n_available``."""
    idx = eval_selection(dataset, indices, max_images, seed=seed)
    if not idx:
        return {"n": 0, "n_available": 0}
    was = model.training
    model.eval()
    ps, ss, hp, bce, mus, correct, envs = [], [], [], [], [], [], []
    try:
        for i in range(0, len(idx), batch_size):
            items = [dataset[j] for j in idx[i:i + batch_size]]
            x, t, y, e = (torch.stack(v) for v in zip(*items))
            x, t = x.to(device), t.to(device)
            logits, mu, _, y_logits = _forward(model, x, sample=False)
            pred = torch.sigmoid(logits.float())
            p_, s_ = image_metrics(pred, t)
            ps.append(p_)
            ss.append(s_)
            hp.append(highpass_error(pred, t).cpu())
            bce.append(F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").flatten(1).mean(1).cpu())
            mus.append(mu.float().cpu())
            envs.append(e)
            if y_logits is not None:
                correct.append((y_logits.argmax(1).cpu() == y).float())
    finally:
        model.train(was)
    mu_all = torch.cat(mus)
    out: dict[str, Any] = {"n": len(idx), "n_available": len(indices), "psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()),
                           "highpass_rel_error": float(torch.cat(hp).mean()),
                           "recon_bce": float(torch.cat(bce).mean()),
                           "active_units": active_units(mu_all) if len(mu_all) > 1 else None,
                           "latent_dim": int(mu_all.shape[1])}
    if correct:
        c, e = torch.cat(correct), torch.cat(envs)
        names = getattr(dataset, "environments", None)
        out["accuracy"] = float(c.mean())
        out["accuracy_per_env"] = {(names[k] if names else str(k)): float(c[e == k].mean())
                                   for k in sorted(set(e.tolist()))}
    return out


def _recon_grid(model: nn.Module, dataset, indices: list[int], device, path: Path) -> Path:
    from dualdiff.analysis.vae_plots import save_recon_grid

    items = [dataset[j] for j in indices]
    x, t = torch.stack([it[0] for it in items]).to(device), torch.stack([it[1] for it in items])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = _forward(model, x, sample=False)[0]
    finally:
        model.train(was)
    return save_recon_grid(t, torch.sigmoid(logits.float()).cpu(), path)


# ---------------------------------------------------------------------------------------
# entry points


def train_vae(cfg: VAEConfig, out_dir: str | Path | None = None, *, resume: bool | str | None = None,
              data: tuple | None = None) -> dict[str, Any]:
    """Train one model (module docstring); returns ``{"metrics": ..., "out_dir": ..., "trainer": ...}``.

    ``out_dir``: the run folder (None: ``train.out_dir``). ``resume`` (None: the ``train.resume``
    key): ``auto`` / True, ``latest``, a checkpoint path, or False (fresh) —
    :mod:`dualdiff.experiments.run`.
    ``data``: ``(dataset, DomainSplit, test_env index or None)`` to train on instead of
    ``cfg.data`` (items as :mod:`dualdiff.data.fundus` describes; e.g. the ldm experiment's
    histology tiles for its ``conv_kl`` autoencoder)."""
    from dualdiff.analysis.vae_plots import plot_training

    if not isinstance(cfg, VAEConfig):
        raise TypeError(f"cfg must be a VAEConfig, got {type(cfg).__name__}")
    cfg = apply_run_flags(cfg, out_dir, resume, presets=VAE_PRESETS)
    out = Path(cfg.train.out_dir)
    check_resume(cfg.train.resume, out / "checkpoints")
    ds, split, test_env = data if data is not None else build_vae_data(cfg.data, cfg.model.image_size)
    with torch.random.fork_rng(devices=[]):  # initial weights depend on train.seed only
        torch.manual_seed(derive_seed(cfg.train.seed, "vae-init"))
        model = build_vae_model(cfg.model, len(ds.classes))
    tcfg, run_cfg = cfg.train, cfg
    loss = VAELoss(cfg)
    grid_idx = eval_selection(ds, split.val or split.train, cfg.recon_images, seed=cfg.data.seed)

    def eval_fn(m: nn.Module, step: int) -> dict:
        _recon_grid(m, ds, grid_idx, trainer.device, out / f"recon_step_{step}" / "grid.png")
        r = evaluate_vae(m, ds, split.val, device=trainer.device, batch_size=cfg.train.batch_size,
                         max_images=min(cfg.eval_images or 64, 64), seed=cfg.data.seed)
        return {k: r[k] for k in ("psnr", "highpass_rel_error", "accuracy") if k in r}

    trainer = Trainer(model, loss, torch.utils.data.Subset(ds, split.train), tcfg,
                      eval_fn=eval_fn, run_config=run_cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    m = trainer.ema_model
    metrics: dict[str, Any] = {"step": trainer.step, "train_images": len(split.train),
                               "data": "config" if data is None else "given"}
    metrics["val"] = evaluate_vae(m, ds, split.val, device=trainer.device, batch_size=cfg.train.batch_size,
                                  max_images=cfg.eval_images, seed=cfg.data.seed)
    if split.test:
        metrics["test"] = evaluate_vae(m, ds, split.test, device=trainer.device,
                                       batch_size=cfg.train.batch_size, max_images=cfg.eval_images,
                                       seed=cfg.data.seed)
        metrics["test_env"] = ds.environments[test_env]
    _recon_grid(m, ds, grid_idx, trainer.device, out / "recon_final" / "grid.png")
    if trainer.is_main:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if trainer.is_main and cfg.plots:
        plot_training(trainer.history, out / "training.png", title=f"vae {cfg.model.arch}")
    return {"metrics": metrics, "out_dir": out, "trainer": trainer}


def load_vae_model(path: str | Path, *, ema: bool = True, map_location: Any = "cpu") -> tuple[nn.Module, VAEConfig]:
    """``(model, config)`` from a checkpoint of :func:`train_vae` (a file, or a run folder: its
    newest checkpoint), e.g. the ``conv_kl`` autoencoder for latent diffusion. Loads with
    ``weights_only=True``, the EMA weights when ``ema`` and present; the model in eval mode."""
    run = load_run(path, VAEConfig, writer="train_vae", map_location=map_location)
    return _model_of_run(run, ema), run.config


def _model_of_run(run, ema: bool = True) -> nn.Module:
    """The model of a loaded :func:`train_vae` run (EMA weights when ``ema`` and present), in
    eval mode; the classifier's size comes from its weights."""
    weights = run.state["ema"]["model"] if ema and run.state.get("ema") else run.state["model"]
    n_cls = weights["classifier.weight"].shape[0] if "classifier.weight" in weights else 5
    return load_weights(build_vae_model(run.config.model, n_cls), run, ema=ema).eval()


#: what ``vae eval`` may change in a run's stored config: where the images are read and how many
#: are scored. The keys that choose the held-out images (source, environments, test_env,
#: holdout_fraction, subset_size, seed) and the model stay the run's, so the scores are on the
#: images the run never trained on.
EVAL_KEYS = ("eval_images", "recon_images", "data.path", "data.verify", "data.skip_bad",
             "train.batch_size", "train.device")


def evaluate_vae_run(checkpoint: str | Path, out_dir: str | Path | None = None, *,
                     config: VAEConfig | None = None) -> dict[str, Any]:
    """Score a finished :func:`train_vae` run again (EMA weights, z = mu): the validation images
    and, when the run held an environment out, its test images, with :func:`evaluate_vae`.

    ``checkpoint``: a checkpoint file or a run folder (its newest checkpoint). ``config``: the
    run's stored config with changes to :data:`EVAL_KEYS` only (e.g. ``eval_images=0`` scores
    every held-out image; ``data.path`` where the images now are); any other change is a
    ConfigError. Writes ``eval.json`` and ``eval_recon/grid.png`` to ``out_dir`` (default: the
    run folder); returns ``{"checkpoint", "step", "eval_images", "val", "test", "test_env"}``
    (``test`` / ``test_env`` only with a held-out environment)."""
    from dualdiff.train.distributed import default_device

    run = load_run(checkpoint, VAEConfig, writer="train_vae")
    cfg = run.config if config is None else config
    refuse_changes(run.config, cfg, EVAL_KEYS,
                   "vae eval scores the run's own held-out images with its trained model")
    ckpt = run.path
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    trained = json.loads((run_dir / "metrics.json").read_text()) \
        if (run_dir / "metrics.json").is_file() else {}
    if trained.get("data") == "given":
        raise ConfigError(f"{str(run_dir)!r} trained on data passed to train_vae(data=...) (e.g. the "
                          "ldm autoencoder's tiles); vae eval rebuilds the data from the run's config, "
                          "so it cannot score this run: evaluate it with the command that trained it")
    device = default_device(cfg.train.device)
    ds, split, test_env = build_vae_data(cfg.data, cfg.model.image_size)
    if "train_images" in trained and trained["train_images"] != len(split.train):
        raise ConfigError(f"the data rebuilt from the run's config has {len(split.train)} training "
                          f"images, but the run trained on {trained['train_images']}: not the run's "
                          f"data (moved or changed files under data.path?)")
    model = _model_of_run(run).to(device)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(device=device, batch_size=cfg.train.batch_size, max_images=cfg.eval_images,
              seed=cfg.data.seed)
    metrics: dict[str, Any] = {"checkpoint": str(ckpt), "step": run.state.get("step"),
                               "eval_images": cfg.eval_images,
                               "val": evaluate_vae(model, ds, split.val, **kw)}
    if split.test:
        metrics["test"] = evaluate_vae(model, ds, split.test, **kw)
        metrics["test_env"] = ds.environments[test_env]
    grid_idx = eval_selection(ds, split.val or split.train, cfg.recon_images, seed=cfg.data.seed)
    _recon_grid(model, ds, grid_idx, device, out / "eval_recon" / "grid.png")
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def loo_vae(cfg: VAEConfig, out_dir: str | Path | None = None, *,
            resume: bool | str | None = None) -> dict[str, dict]:
    """Leave-one-domain-out: one model per held-out environment under ``out_dir/<env>/``
    (``out_dir`` None: ``train.out_dir``; ``resume`` applies to each run, as in
    :func:`train_vae`); writes ``loo.json`` ({env: test/val accuracy and recon metrics}) and
    ``loo.png``."""
    from dualdiff.analysis.vae_plots import plot_loo

    cfg = apply_run_flags(cfg, out_dir, resume, presets=VAE_PRESETS)
    out = Path(cfg.train.out_dir)
    envs = _environment_names(cfg.data)
    summary: dict[str, dict] = {}
    for env in envs:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_env=env),
                                train=dataclasses.replace(cfg.train, out_dir=str(out / env)))
        res = train_vae(c)["metrics"]
        summary[env] = {"test_accuracy": res["test"].get("accuracy"), "val_accuracy": res["val"].get("accuracy"),
                        "test_psnr": res["test"]["psnr"], "val_psnr": res["val"]["psnr"]}
    (out / "loo.json").write_text(json.dumps(summary, indent=2))
    plot_loo(summary, out / "loo.png")
    return summary


SWEEP_KL_WEIGHTS = (5e-5, 1e-4, 5e-4)


def sweep_vae(cfg: VAEConfig, out_dir: str | Path | None = None, *, kl_weights=SWEEP_KL_WEIGHTS,
              resume: bool | str | None = None) -> dict[str, dict]:
    """One run per kl_weight under ``out_dir/kl_<w>/``; writes ``sweep.json`` (validation
    metrics per weight) and ``sweep.png``. A larger weight blurs more (lower PSNR, higher
    high-pass error, fewer active units) — the opposite of the seed's troubleshooting advice."""
    from dualdiff.analysis.vae_plots import plot_sweep

    cfg = apply_run_flags(cfg, out_dir, resume, presets=VAE_PRESETS)
    out = Path(cfg.train.out_dir)
    summary: dict[str, dict] = {}
    for w in kl_weights:
        c = dataclasses.replace(cfg, kl_weight=float(w),
                                train=dataclasses.replace(cfg.train, out_dir=str(out / f"kl_{w:g}")))
        res = train_vae(c)["metrics"]
        summary[f"{w:g}"] = res["val"]
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    plot_sweep(summary, out / "sweep.png")
    return summary


def _environment_names(cfg: VAEDataConfig) -> list[str]:
    if cfg.source == "fundus":
        from dualdiff.data.fundus import FUNDUS_ENVIRONMENTS
        return list(cfg.environments or FUNDUS_ENVIRONMENTS)
    from dualdiff.data.fundus import DomainFolder
    return DomainFolder(cfg.path, 16).environments


def plot_vae(out_dir: str | Path) -> list[Path]:
    """Redraw the figures of a finished run, sweep or loo folder; returns the files written."""
    from dualdiff.analysis.vae_plots import plot_loo, plot_sweep, plot_training
    from dualdiff.train import read_jsonl

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"--out-dir: no such folder: {str(out)!r}")
    written = []
    if (out / "metrics.jsonl").is_file():
        written.append(plot_training(read_jsonl(out / "metrics.jsonl"), out / "training.png"))
    if (out / "sweep.json").is_file():
        written.append(plot_sweep(json.loads((out / "sweep.json").read_text()), out / "sweep.png"))
    if (out / "loo.json").is_file():
        written.append(plot_loo(json.loads((out / "loo.json").read_text()), out / "loo.png"))
    if not written:
        raise FileNotFoundError(f"{str(out)!r} holds no vae run (metrics.jsonl, sweep.json or loo.json)")
    return written


def _demo_comparisons(model: nn.Module, ds, split, device, n_show: int) -> dict[str, Any]:
    """Per validation image: the model's and a trivial baseline's PSNR / high-pass error (the
    baseline predicts the mean training image) and grade correctness (model vs the majority
    training grade); paired 95 % t-intervals of the differences; ``n_show`` images for the figure."""
    from dualdiff.study.stats import paired_interval

    train_t = torch.stack([ds[j][1] for j in split.train])
    mean_img = train_t.mean(0, keepdim=True)
    majority = int(np.bincount(np.asarray(ds.labels)[split.train]).argmax())
    idx = list(split.val)
    items = [ds[j] for j in idx]
    x, t, y = (torch.stack(v) for v in list(zip(*items))[:3])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, _, _, y_logits = _forward(model, x.to(device), sample=False)
    finally:
        model.train(was)
    pred = torch.sigmoid(logits.float()).cpu()
    base = mean_img.expand_as(t)
    per = {"psnr": (image_metrics(pred, t)[0], image_metrics(base, t)[0]),
           "highpass_rel_error": (highpass_error(pred, t), highpass_error(base, t))}
    if y_logits is not None:
        per["accuracy"] = ((y_logits.argmax(1).cpu() == y).float(), (y == majority).float())
    rows = {}
    for k, (a, b) in per.items():
        av, bv = a.double().tolist(), b.double().tolist()
        iv = paired_interval(dict(enumerate(av)), dict(enumerate(bv))).to_dict()
        rows[k] = {"model": float(np.mean(av)), "baseline": float(np.mean(bv)), "difference": iv,
                   "within_noise": iv["low"] is None or iv["low"] <= 0.0 <= iv["high"]}
    return {"rows": rows, "n": len(idx), "targets": t[:n_show], "recons": pred[:n_show],
            "baselines": {"psnr": "mean training image", "highpass_rel_error": "mean training image",
                          "accuracy": f"majority grade ({ds.classes[majority]})"}}


def demo_vae(out_dir: str | Path | None = None, cfg: VAEConfig | None = None) -> dict[str, Any]:
    """Train the ``demo`` preset (tiny, into ``runs/vae-demo``) on the embedded fundus set (a few
    CPU minutes) and answer "does it reconstruct, and better than a trivial baseline?" in one
    figure, ``demo.png`` (validation images beside their reconstructions, PSNR vs the mean-image
    baseline in the title). Returns train_vae's result plus ``table`` (rows step, beta, recon,
    kl, ce, loss of the logged steps), ``comparisons`` (per metric: model, baseline, the paired
    95 % interval over validation images of model - baseline, ``within_noise``: it contains 0)
    and ``figure``."""
    from dualdiff.analysis.vae_plots import plot_demo

    cfg = cfg or VAEConfig.from_name("demo")
    res = train_vae(cfg, out_dir)
    hist = res["trainer"].history
    res["table"] = [{k: r.get(k) for k in ("step", "beta", "recon", "kl", "ce", "loss")} for r in hist
                    if "recon" in r]
    ds, split, _ = build_vae_data(cfg.data, cfg.model.image_size)
    cmp = _demo_comparisons(res["trainer"].ema_model, ds, split, res["trainer"].device, cfg.recon_images)
    p = cmp["rows"]["psnr"]
    iv = p["difference"]
    ci = "" if iv["low"] is None else f" [{iv['low']:+.1f}, {iv['high']:+.1f}]"
    noise = "within noise" if p["within_noise"] else "beyond noise"
    title = (f"vae demo: validation PSNR {p['model']:.1f} dB vs {p['baseline']:.1f} dB for the mean image "
             f"({iv['mean']:+.1f} dB{ci}, 95 % CI over {cmp['n']} images: {noise})")
    h = cmp["rows"]["highpass_rel_error"]
    sub = (f"high-pass error {h['model']:.2f} (1 = no fine detail; mean image {h['baseline']:.2f}); "
           f"{cfg.train.steps} steps, effective β {cfg.effective_beta():.3g}")
    res["figure"] = plot_demo(cmp["targets"], cmp["recons"], Path(res["out_dir"]) / "demo.png", title, sub)
    res["comparisons"] = {k: {**v, "baseline_name": cmp["baselines"][k], "n": cmp["n"]}
                          for k, v in cmp["rows"].items()}
    return res
