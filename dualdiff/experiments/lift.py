"""LIFT experiment: configuration, training and checkpoint loading.

Training objective (per batch of clean 64x64 images x64 and their area-downsampled 32x32
views x32, :func:`dualdiff.data.images.dual_scale_views`):

    t64, t32 ~ U{0..T-1} independently per sample (the same draw when shared_timesteps)
    ε64, ε32 ~ N(0, I);   x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε   at each scale
    (ε̂64, ε̂32) = model(x64_t, x32_t, t64, t32)
    loss = MSE(ε̂64, ε64) + MSE(ε̂32, ε32)        (each MSE a mean over its elements)

The **sum** of the two per-scale means is the experiment's public code (``loss_64 + loss_32``);
``loss_reduction="mean"`` halves it. ``model_kind="single"`` trains the single-scale baseline
(:class:`dualdiff.models.lift.SingleScaleUNet`) with ``MSE(ε̂64, ε64)`` on the same data.

Defaults follow the public code (``train_lift.py`` / ``train_lift_ema.py``): AdamW, lr 1e-4,
weight decay 0.01, gradient clipping at 1.0, batch 64, EMA 0.9999, cosine β schedule with
T = 1000 as the public code builds it (``"lift_cosine"``: its DDIM scheduler clips the cosine
betas to [1e-4, 0.02]; this is the schedule behind the seed's γ <-> t anchors, see
:func:`dualdiff.diffusion.snr_to_timestep`; ``schedule="cosine"`` is the textbook one), and
cosine LR decay to ``train.min_lr`` = 1e-6 over the run — stepped per optimizer step (the public
script steps its CosineAnnealingLR once per epoch with T_max = epochs x batches, so its LR
barely decays: a defect not reproduced). 32x32 views by area averaging (the public code uses
bilinear interpolation, which for an exact 2x reduction is the same 2x2 mean:
``data.downsample="bilinear"``). Training runs through :class:`dualdiff.train.Trainer` (AMP,
compile, EMA, atomic checkpoints, exact resume, DDP under torchrun).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.config import ConfigError
from dualdiff.data.images import (ImageFolderDataset, ProceduralDualScaleImages, dual_scale_views,
                                  hf_afhq)
from dualdiff.diffusion import NoiseSchedule, make_schedule, q_sample
from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig, SingleScaleUNet
from dualdiff.utils.seed import derive_seed
from dualdiff.experiments.run import apply_run_flags, check_resume, from_name, load_run, load_weights
from dualdiff.train import TrainConfig, Trainer, resolve_checkpoint

__all__ = ["LIFTDataConfig", "LIFTConfig", "LIFT_PRESETS", "LIFTLoss", "lift_loss",
           "single_scale_loss", "build_lift_model", "build_lift_dataset", "build_lift_schedule",
           "train_lift", "load_lift_model", "resolve_checkpoint"]

log = logging.getLogger("dualdiff.lift")


@dataclass
class LIFTDataConfig:
    """Training images. ``source``: ``procedural`` (embedded default, ``num_images`` images from
    ``seed``), ``folder`` (every image under ``path``), ``afhq`` (Hugging Face ``huggan/AFHQv2``,
    ``split``, ``cache_dir``). ``downsample``: how the 32x32 view is made (area | bilinear).
    ``texture_scale``: amplitude factor of the procedural images' fine textures (1: as designed;
    other sources ignore it). ``verify`` / ``skip_bad`` (folder source): the image files are checked
    when the dataset is built (``verify``: fully decoded); a bad one is an error naming it, or with
    ``skip_bad`` is skipped with a warning (:mod:`dualdiff.data.checks`)."""
    source: Literal["procedural", "folder", "afhq"] = "procedural"
    path: str | None = None
    num_images: int = 10000
    seed: int = 0
    split: str = "train"
    cache_dir: str | None = None
    image_size: int = 64
    downsample: Literal["area", "bilinear"] = "area"
    texture_scale: float = 1.0
    verify: bool = False
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.source == "folder" and not self.path:
            raise ConfigError("data.path is required when data.source is 'folder'")
        if self.num_images <= 0:
            raise ConfigError(f"data.num_images must be > 0, got {self.num_images}")
        if self.image_size <= 0 or self.image_size % 2:
            raise ConfigError(f"data.image_size must be a positive even int, got {self.image_size}")
        if not self.texture_scale >= 0:
            raise ConfigError(f"data.texture_scale must be >= 0, got {self.texture_scale}")


def _default_train() -> TrainConfig:
    # ~30 epochs of AFHQ-64 train (~14.6 k images) at batch 64, as the public train_lift.py
    return TrainConfig(steps=7000, batch_size=64, lr=1e-4, optimizer="adamw", weight_decay=0.01,
                       scheduler="cosine", min_lr=1e-6, grad_clip=1.0, ema_decay=0.9999,
                       checkpoint_every=1000, out_dir="runs/lift", log_every=10)


@dataclass
class LIFTConfig:
    """The whole LIFT run (YAML / ``key=value`` overridable through :mod:`dualdiff.config`).

    ``model`` / ``data`` / ``train``: the sections above and :class:`dualdiff.train.TrainConfig`
    (the final LR of the cosine decay is ``train.min_lr``); ``schedule`` / ``T``: noise schedule
    name (:func:`dualdiff.diffusion.make_schedule`) and number of timesteps;
    ``shared_timesteps``: one t for both scales instead of independent ones;
    ``loss_reduction``: ``sum`` (public code) or ``mean`` of the two per-scale MSEs;
    ``model_kind``: ``dual`` (LIFT) or ``single`` (the single-scale baseline).
    Named sizes: :data:`LIFT_PRESETS` / :meth:`from_name` (``tiny`` | ``default``).
    """
    model: LIFTModelConfig = field(default_factory=LIFTModelConfig)
    data: LIFTDataConfig = field(default_factory=LIFTDataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    schedule: str = "lift_cosine"
    T: int = 1000
    shared_timesteps: bool = False
    loss_reduction: Literal["sum", "mean"] = "sum"
    model_kind: Literal["dual", "single"] = "dual"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`dualdiff.config.ConfigError` naming the bad key(s); never rewrites one."""
        from dualdiff.diffusion import SCHEDULES

        if self.T < 2:
            raise ConfigError(f"T must be >= 2, got {self.T}")
        if self.data.image_size != self.model.image_size:
            raise ConfigError(f"data.image_size ({self.data.image_size}) must equal "
                              f"model.image_size ({self.model.image_size})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    @classmethod
    def from_name(cls, name: str) -> "LIFTConfig":
        """A fresh copy of the preset ``name`` of :data:`LIFT_PRESETS` (``tiny`` | ``default``)."""
        return from_name(LIFT_PRESETS, name, cls.__name__)


def _tiny() -> LIFTConfig:
    """CPU demo / tests: ~0.24 M-parameter model at **32x32 (and its 16x16 view)**, 256
    procedural images, 1600 steps of 16.

    Sized for the README's demo: train + analysis within 5 minutes on 2 cores without AVX-512
    (1600 steps took 180 s there, the whole demo 3 min 23 s wall). At the paper's 64x64 the
    same budget buys 800 steps of 8 (6.4 k images seen): the samples were colour blobs,
    smaller and more numerous than the data's, with no smooth backgrounds. A 32x32 image costs
    about a third of a 64x64 one, so at 32x32 the model sees 25.6 k images, and its samples
    show the data's gradient backgrounds, blobs and textures. Tried at 64x64 and not kept:
    channels [16, 32, 64], batch 4 x 1600 steps, 16 images, v-parameterised output, loss
    weights up to 20x at high noise, zero-initialised ResBlock outputs, a pixel-unshuffle stem
    (``benchmarks/RESULTS.md``). ``data.texture_scale`` 0.25: the 1-3 px checkerboards and
    stripes at a quarter of their amplitude; at 1 this model leaves them as grain over every
    sample. EMA 0.99 after a 100-step warm-up (EMA = weights until then). ``train.min_lr``
    2e-5 allows ``train.lr`` overrides down to 2e-5 (the README's ``train.lr=2e-4``).
    ``model.image_size=64 data.image_size=64`` trains at the paper's size."""
    train = TrainConfig(steps=1600, batch_size=16, lr=2e-3, optimizer="adamw", weight_decay=0.01,
                        scheduler="cosine", min_lr=2e-5, grad_clip=1.0, ema_decay=0.99,
                        ema_warmup=100, checkpoint_every=0, out_dir="runs/lift-tiny", log_every=10,
                        progress=False)
    model = replace(LIFTModelConfig.tiny(), image_size=32)
    return LIFTConfig(model=model, data=LIFTDataConfig(num_images=256, image_size=32, texture_scale=0.25),
                      train=train)


#: name -> zero-argument function building a fresh config (``preset=NAME`` on the command line)
LIFT_PRESETS: dict[str, Callable[[], LIFTConfig]] = {"tiny": _tiny, "default": LIFTConfig}


# ---------------------------------------------------------------------------------------
# builders


def build_lift_model(config: LIFTConfig) -> nn.Module:
    """The model ``config.model_kind`` asks for, freshly initialised."""
    if config.model_kind == "single":
        return SingleScaleUNet(config.model)
    return LIFTDualTimestepModel(config.model)


def build_lift_schedule(config: LIFTConfig) -> NoiseSchedule:
    return make_schedule(config.schedule, config.T)


def build_lift_dataset(data: LIFTDataConfig) -> torch.utils.data.Dataset:
    """The training images of ``data`` (float32 [3, S, S] in [-1, 1])."""
    if data.source == "procedural":
        return ProceduralDualScaleImages(data.num_images, seed=data.seed, size=data.image_size,
                                         texture_scale=data.texture_scale)
    if data.source == "folder":
        return ImageFolderDataset(data.path, size=data.image_size, verify=data.verify, skip_bad=data.skip_bad)
    if data.source == "afhq":
        return hf_afhq(data.split, data.cache_dir, size=data.image_size)
    raise ValueError(f"unknown data.source {data.source!r}")  # pragma: no cover - Literal-checked


# ---------------------------------------------------------------------------------------
# losses


def _split_batch(batch, downsample: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"batch must be x64 or (x64, x32), got a sequence of {len(batch)}")
        return batch[0], batch[1]
    if isinstance(batch, dict):
        batch = batch.get("image", batch.get("x64"))
    return dual_scale_views(batch, mode=downsample)


def lift_loss(model: nn.Module, batch, schedule: NoiseSchedule, shared_timesteps: bool = False,
              reduction: str = "sum", downsample: str = "area"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ε-prediction loss of a dual-scale model on one batch (module docstring).

    ``batch``: clean images ``[B, 3, 64, 64]`` (the 32x32 view is made with ``downsample``) or
    a pair ``(x64, x32)``. Timesteps and noise come from the global torch RNG (checkpointed by
    the Trainer, so resume is exact). Returns ``(loss, {"loss_64", "loss_32"})``; the MSEs are
    computed in float32 (also under autocast).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    x64, x32 = _split_batch(batch, downsample)
    b, T, dev = x64.shape[0], schedule.num_timesteps, x64.device
    t64 = torch.randint(0, T, (b,), device=dev)
    t32 = t64 if shared_timesteps else torch.randint(0, T, (b,), device=dev)
    n64, n32 = torch.randn_like(x64), torch.randn_like(x32)
    xt64 = q_sample(x64, t64, n64, schedule)
    xt32 = q_sample(x32, t32, n32, schedule)
    e64, e32 = model(xt64, xt32, t64, t32)
    l64 = F.mse_loss(e64.float(), n64.float())
    l32 = F.mse_loss(e32.float(), n32.float())
    loss = l64 + l32 if reduction == "sum" else 0.5 * (l64 + l32)
    return loss, {"loss_64": l64.detach(), "loss_32": l32.detach()}


def single_scale_loss(model: nn.Module, batch, schedule: NoiseSchedule
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ε-prediction MSE of a single-scale model ``model(x_t, t)`` on the 64x64 images."""
    x64 = batch[0] if isinstance(batch, (tuple, list)) else batch
    t = torch.randint(0, schedule.num_timesteps, (x64.shape[0],), device=x64.device)
    noise = torch.randn_like(x64)
    l64 = F.mse_loss(model(q_sample(x64, t, noise, schedule), t).float(), noise.float())
    return l64, {"loss_64": l64.detach()}


class LIFTLoss:
    """``loss_fn(model, batch)`` for the Trainer: :func:`lift_loss` (or
    :func:`single_scale_loss`) with the schedule's tables kept on the batch's device."""

    def __init__(self, schedule: NoiseSchedule, shared_timesteps: bool = False,
                 reduction: str = "sum", downsample: str = "area", model_kind: str = "dual"):
        self.schedule, self.shared_timesteps = schedule, shared_timesteps
        self.reduction, self.downsample, self.model_kind = reduction, downsample, model_kind
        self._on: dict[torch.device, NoiseSchedule] = {}

    def _schedule_on(self, device: torch.device) -> NoiseSchedule:
        if device not in self._on:
            self._on[device] = self.schedule.to(device)
        return self._on[device]

    def __call__(self, model: nn.Module, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        sched = self._schedule_on(x.device)
        if self.model_kind == "single":
            return single_scale_loss(model, batch, sched)
        return lift_loss(model, batch, sched, self.shared_timesteps, self.reduction, self.downsample)


# ---------------------------------------------------------------------------------------
# training and loading


def _prepared(config: LIFTConfig, out_dir, resume) -> LIFTConfig:
    if not isinstance(config, LIFTConfig):
        raise TypeError(f"config must be a LIFTConfig, got {type(config).__name__}")
    cfg = apply_run_flags(config, out_dir, resume, presets=LIFT_PRESETS)
    cfg.train.validate()
    check_resume(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints")
    return cfg


def train_lift(config: LIFTConfig, out_dir: str | os.PathLike | None = None, resume: bool | str | None = None, *,
               dataset: torch.utils.data.Dataset | None = None, eval_fn=None,
               until: int | None = None, verbose: bool = True) -> Trainer:
    """Train (or continue) a LIFT run with :class:`dualdiff.train.Trainer`.

    ``out_dir``: the run folder (None: ``config.train.out_dir``; both set and different: a
    ConfigError). ``resume``: None (as ``config.train.resume`` says), ``"auto"`` / True,
    ``"latest"``, a checkpoint path, or False (fresh) — :mod:`dualdiff.experiments.run`.
    ``dataset`` overrides ``config.data``; ``until`` stops at that step (simulated preemption).
    Checkpoints store the whole config (``run_config``), so :func:`load_lift_model` rebuilds the
    model from the file alone. Returns the (closed) trainer: ``trainer.history`` holds the
    logged records, ``trainer.ema_model`` the EMA weights.
    """
    cfg = _prepared(config, out_dir, resume)
    data = dataset if dataset is not None else build_lift_dataset(cfg.data)
    torch.manual_seed(derive_seed(cfg.train.seed, "lift-init"))  # reproducible initial weights
    model = build_lift_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"LIFT {cfg.model_kind}-scale model: {n:,} parameters; {len(data):,} training images")
    log.info("LIFT %s model with %d parameters", cfg.model_kind, n)
    loss_fn = LIFTLoss(build_lift_schedule(cfg), cfg.shared_timesteps, cfg.loss_reduction,
                       cfg.data.downsample, cfg.model_kind)
    trainer = Trainer(model, loss_fn, data, cfg.train, eval_fn=eval_fn, run_config=cfg)
    try:
        trainer.fit(until=until)
    finally:
        trainer.close()
    return trainer


def load_lift_model(checkpoint_path: str | os.PathLike, ema: bool = True,
                    map_location: Any = "cpu") -> tuple[nn.Module, LIFTConfig]:
    """``(model, config)`` from a checkpoint written by :func:`train_lift` (file or run dir).

    Loads with ``torch.load(weights_only=True)``; rebuilds the model from the stored config;
    takes the EMA weights when ``ema`` and the checkpoint has them (otherwise the raw weights,
    with a warning if EMA was asked for). The model is returned in eval mode on ``map_location``.
    """
    run = load_run(checkpoint_path, LIFTConfig, writer="train_lift", map_location=map_location)
    model = load_weights(build_lift_model(run.config), run, ema=ema, warn_missing_ema=True)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    return model.eval(), run.config
