"""tadiff experiment: joint denoising + segmentation with a time-dependent Dice weight λ(t).

TaDiff-Net (public code: samleoqh/TaDiff-Net ``src/tadiff_model.py``) predicts the next MRI
session of a brain-tumour patient and the tumour masks of every session with one diffusion
UNet (:class:`dualdiff.models.tadiff.TaDiffNet`, 12 input / 7 output channels). Per batch of
4-session windows (``image [B, 4, 3, H, W]`` in [0, 1], mapped to [-1, 1]; ``label [B, 4, H, W]``):

    target j_b = the last session, or (probability ``p_random_target``) a uniform one
    t_b ~ U{0..T-1}, ε ~ N(0, I);  x_t = √ᾱ_t x_{j} + √(1-ᾱ_t) ε  in the target's slot
    (mask logits [B, 4], ε̂ [B, 3]) = model(inputs, t, days, treatments, j)
    noise term  = mean_pixels( w ⊙ (ε̂ - ε)² ),  w = 1 + conv(s·e^{-s}, 11x11 box / 10),
                  s = Σ_sessions label  (the public map; ``noise_weight_map=false``: w = 1)
    Dice[b, c]  = soft Dice loss, sigmoid, squared_pred, smooth_nr 0, smooth_dr 1e-5 (public flags)
    a[b, c]     = √ᾱ_{t_b} for the target session c = j_b, else 1          (public code)
    Λ_b         = λ(t_b)                                                   ("per_sample", default)
                = mean_b' λ(t_b')                                          ("seed_batch_mean")
    w[b, c]     = Λ_b · a[b, c]  for c = j_b;  λ0 for c ≠ j_b              ("target", default)
                = Λ_b · a[b, c]  for every c                               ("all", the seed's)
    Dice term   = mean_{b,c} w[b, c] · Dice[b, c]  (+ the learnable regulariser below)
    loss        = noise term + Dice term

The Dice term is one call of the fused :func:`dualdiff.ops.weighted_dice_loss` with the
``[B, C]`` weight w. ``seed_batch_mean`` is the seed's written code (``mean(dice) *
mean(lambda)``; with ``all`` it equals mean_{b,c}(a·Dice)·mean_b λ): one noisy constant weight
per batch, kept only to reproduce it.

``lambda_sessions``: λ(t)'s rationale (the target's mask is harder to predict from a noisier
x_t) applies to the target session only; the reference sessions' inputs are clean whatever t
is. ``target`` (default) scales only the target session's Dice by λ(t) and gives the reference
sessions the constant λ0 — the structure of the public TaDiff-Net code, whose ``get_loss``
multiplies the target session's Dice by √ᾱ_t and then every session's Dice by one constant
(``torch.mean(dice_loss) * cfg.aux_loss_w``), so no time-dependent factor touches a reference
session there. ``all`` is the seed document's code (λ(t) on every session), kept as a named
option to reproduce it. For ``fixed`` the two coincide.

λ(t) (:func:`lambda_weight`, ᾱ = ᾱ_t of the linear β schedule 1e-4..0.02, T = 1000):
``fixed`` λ0; ``power`` λ0·ᾱᵏ (k = 1 is the seed's "linear"); ``cosine`` λ0·sin²(πᾱ/2) (falls
with noise, as the seed intends); ``cosine_seed`` λ0·cos²(πᾱ/2) (the seed's written formula,
which *rises* with noise — inverted, kept for reproduction); ``step`` λ0 if ᾱ > 0.5 else λ0/10;
``learnable`` λ(t) = λ0·exp(-s_{k(t)}) with s a learned log-variance per timestep bin
(``learnable_bins`` equal bins, :class:`LearnableLambda`, trained with the model) by
homoscedastic uncertainty weighting (Kendall et al. 2018): the loss gains the regulariser
mean_b λ0·(n_λ/S)·s_{k(t_b)} (n_λ = the number of sessions λ scales: 1 for ``target``, S for
``all``), i.e. per sample λ0·(exp(-s)·D + s) with D the mean over those sessions of a·Dice,
so each bin's optimum is s = log E[D | bin] and λ = λ0 / E[D | bin]. With the real schedule ᾱ_{T/2} ≈ 0.079
(not 0.5, as the seed assumes) and λ(T) = λ0·ᾱ_{T-1}² ≈ 1.6e-11 (not 1e-4).

Training goes through :class:`dualdiff.train.Trainer`; defaults are the public configuration
(AdamW lr 5e-3, weight decay 3e-5, 100-step warm-up then cosine, clip 1.5, batch 16 x
accumulation 4, 60 k steps). Sweeps train every schedule from the same initial weights on
the same batches, targets, timesteps and noise (the same seeds: common random numbers).

Size (over ~500 lines): config, the loss (TaDiff's weighted noise map, input assembly),
training, the evaluation (losses, Dice vs t, sampled sessions) and the sweep / plots / demo
entry points; λ(t) already lives in :mod:`dualdiff.diffusion.loss_weights`. The evaluation
helpers are the next candidates to move out.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.diffusion.loss_weights import LAMBDA_SCHEDULES, LearnableLambda, lambda_weight
from dualdiff.errors import CheckpointError, ConfigError
from dualdiff.experiments.run import apply_run_flags, check_resume, from_name, load_run, load_weights
from dualdiff.diffusion import (DDIMScheduler, NoiseSchedule, ddim_sample, ddim_timesteps,
                                ddpm_sample, make_schedule, q_sample)
from dualdiff.metrics.image import dice_at_threshold, mae, psnr, ravd, ssim
from dualdiff.models.tadiff import TaDiffModelConfig, TaDiffNet
from dualdiff.ops import weighted_dice_loss
from dualdiff.train import TrainConfig, Trainer, latest_checkpoint, unwrap_model
from dualdiff.utils.seed import derive_seed

__all__ = ["LAMBDA_SCHEDULES", "lambda_weight", "LearnableLambda", "TaDiffDataConfig", "TaDiffConfig",
           "TADIFF_PRESETS", "TaDiffModel", "TaDiffLoss", "noise_weight_map", "build_tadiff_model",
           "build_tadiff_schedule", "build_tadiff_datasets", "make_data", "train_tadiff",
           "evaluate_tadiff", "sweep_tadiff", "plot_tadiff", "demo_tadiff", "demo_summary", "per_case_metrics",
           "load_tadiff_model"]

log = logging.getLogger("dualdiff.tadiff")

DICE_FLAGS = dict(activation="sigmoid", squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)


# λ(t) lives in the diffusion layer (dualdiff.diffusion.loss_weights); re-exported here
# ---------------------------------------------------------------------------------------
# configuration


@dataclass
class TaDiffDataConfig:
    """Patients. ``source``: ``procedural`` (written to ``path``, default ``OUT/data``, then read
    back by the ``.npy`` loader), ``npy`` or ``nifti`` (read from ``path``; see
    :mod:`dualdiff.data.tadiff_io`). ``num_patients`` / ``sessions`` / ``depth`` / ``seed``
    shape the procedural set; the last ``val_patients`` patients are the validation split.
    ``verify`` / ``skip_bad``: every patient's files are checked from their headers before any is
    read (``verify``: fully read, image values finite); a bad one is an error naming the file, or
    with ``skip_bad`` the patient is skipped with a warning (:func:`dualdiff.data.tadiff_io.load_patients`)."""
    source: Literal["procedural", "npy", "nifti"] = "procedural"
    path: str | None = None
    num_patients: int = 12
    val_patients: int = 2
    sessions: int = 5
    depth: int = 24
    seed: int = 0
    verify: bool = False
    skip_bad: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.source != "procedural" and not self.path:
            raise ConfigError(f"data.path is required when data.source is {self.source!r}")
        if self.num_patients < 2:
            raise ConfigError(f"data.num_patients must be >= 2, got {self.num_patients}")
        if not 1 <= self.val_patients < self.num_patients:
            raise ConfigError(f"data.val_patients must be in [1, num_patients), got {self.val_patients}")
        if self.sessions < 4:
            raise ConfigError(f"data.sessions must be >= 4, got {self.sessions}")
        if self.depth < 1:
            raise ConfigError(f"data.depth must be >= 1, got {self.depth}")


def _default_train() -> TrainConfig:
    return TrainConfig(steps=60000, batch_size=16, grad_accum=4, lr=5e-3, optimizer="adamw",
                       weight_decay=3e-5, scheduler="cosine", warmup_steps=100, grad_clip=1.5,
                       checkpoint_every=1000, log_every=10, out_dir="runs/tadiff")


@dataclass
class TaDiffConfig:
    """One tadiff run (or sweep). Keys besides ``model`` / ``data`` / ``train``:

    ``schedule`` (λ(t), one of ``LAMBDA_SCHEDULES``), ``lambda0``, ``k``, ``lambda_combine``
    (``per_sample`` | ``seed_batch_mean``), ``lambda_sessions`` (``target``: λ(t) scales the
    target session's Dice only, the references get λ0 | ``all``: every session, the seed's),
    ``learnable_bins`` (timestep bins of the learnable log-variance); ``noise_weight_map`` (the public
    tumour-weighted noise MSE); ``T`` / ``beta_start`` / ``beta_end`` (linear β);
    ``p_random_target``; ``schedules``: the schedules ``dualdiff tadiff sweep`` trains (a key,
    not a flag: ``schedules=fixed,power``). Evaluation: ``eval_batches`` validation batches of
    ``train.batch_size``; ``eval_t_points`` timesteps for Dice vs t; ``sample_cases`` slices,
    ``num_samples`` samples each, ``sample_steps`` steps of ``sampler`` (ddim | ddpm);
    ``eval_seed`` fixes every random draw of the evaluation.
    """
    model: TaDiffModelConfig = field(default_factory=TaDiffModelConfig)
    data: TaDiffDataConfig = field(default_factory=TaDiffDataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    schedule: str = "power"
    lambda0: float = 0.01
    k: float = 2.0
    lambda_combine: Literal["per_sample", "seed_batch_mean"] = "per_sample"
    lambda_sessions: Literal["target", "all"] = "target"
    learnable_bins: int = 10
    noise_weight_map: bool = True
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_random_target: float = 0.5
    schedules: list[str] = field(default_factory=lambda: ["fixed", "power", "cosine", "step", "learnable"])
    eval_batches: int = 4
    eval_t_points: int = 10
    sample_cases: int = 4
    num_samples: int = 4
    sample_steps: int = 50
    sampler: Literal["ddim", "ddpm"] = "ddim"
    eval_seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for s in [self.schedule, *self.schedules]:
            if s not in LAMBDA_SCHEDULES:
                raise ConfigError(f"unknown λ schedule {s!r}; choose from {', '.join(LAMBDA_SCHEDULES)}")
        if not self.schedules:
            raise ConfigError("schedules must name at least one λ schedule")
        if len(set(self.schedules)) != len(self.schedules):
            raise ConfigError(f"schedules has duplicates: {self.schedules}")
        if not (self.k >= 0 and math.isfinite(self.k)):
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if not self.lambda0 >= 0:
            raise ConfigError(f"lambda0 must be >= 0, got {self.lambda0}")
        if self.T < 2:
            raise ConfigError(f"T must be >= 2, got {self.T}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0.0 <= self.p_random_target <= 1.0:
            raise ConfigError(f"p_random_target must be in [0, 1], got {self.p_random_target}")
        if self.data.sessions < self.model.sessions:
            raise ConfigError(f"data.sessions ({self.data.sessions}) must be >= model.sessions ({self.model.sessions})")
        if self.model.modalities != 3:
            raise ConfigError(f"model.modalities must be 3 (T1, T1c, FLAIR), got {self.model.modalities}")
        if self.lambda_sessions not in ("target", "all"):
            raise ConfigError(f"lambda_sessions must be 'target' or 'all', got {self.lambda_sessions!r}")
        if self.lambda_combine not in ("per_sample", "seed_batch_mean"):
            raise ConfigError(f"lambda_combine must be 'per_sample' or 'seed_batch_mean', got {self.lambda_combine!r}")
        if not 1 <= self.learnable_bins <= self.T:
            raise ConfigError(f"learnable_bins must be in [1, T={self.T}], got {self.learnable_bins}")
        for name in ("eval_batches", "eval_t_points", "sample_cases", "num_samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 1 <= self.sample_steps <= self.T:
            raise ConfigError(f"sample_steps must be in [1, T={self.T}], got {self.sample_steps}")

    @classmethod
    def tiny(cls) -> "TaDiffConfig":
        """CPU preset: 32² slices, ~0.28 M-parameter model, 8 patients, 150 steps of batch 8."""
        train = TrainConfig(steps=150, batch_size=8, lr=5e-3, optimizer="adamw", weight_decay=3e-5,
                            scheduler="cosine", warmup_steps=10, grad_clip=1.5, checkpoint_every=0,
                            log_every=5, out_dir="runs/tadiff-tiny", progress=False)
        return cls(model=TaDiffModelConfig.tiny(),
                   data=TaDiffDataConfig(num_patients=8, val_patients=2, depth=12),
                   train=train, eval_batches=2, eval_t_points=8, sample_cases=4, num_samples=2,
                   sample_steps=20)

    @classmethod
    def from_name(cls, name: str) -> "TaDiffConfig":
        """A fresh copy of the preset ``name`` (``tiny`` | ``default``)."""
        return from_name(TADIFF_PRESETS, name, cls.__name__)


def _demo() -> TaDiffConfig:
    """The demo: the tiny preset sweeping fixed / power / learnable λ, 8 sampled cases."""
    cfg = TaDiffConfig.tiny()
    cfg.schedules = ["fixed", "power", "learnable"]
    cfg.sample_cases = 8
    cfg.train.out_dir = "runs/tadiff-demo"
    return cfg


#: name -> zero-argument function building a fresh config (``preset=NAME``)
TADIFF_PRESETS: dict[str, Callable[[], TaDiffConfig]] = {"default": TaDiffConfig, "tiny": TaDiffConfig.tiny,
                                                         "demo": _demo}


# ---------------------------------------------------------------------------------------
# model, schedule, data


class TaDiffModel(nn.Module):
    """The trained module: ``net`` (:class:`TaDiffNet`) plus, for ``schedule=learnable``, the
    λ network ``lam`` (so the Trainer optimises and checkpoints both). Calls go to ``net``."""

    def __init__(self, net: TaDiffNet, lam: LearnableLambda | None = None) -> None:
        super().__init__()
        self.net, self.lam = net, lam

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.net(*args, **kwargs)


def build_tadiff_schedule(cfg: TaDiffConfig) -> NoiseSchedule:
    """The linear β schedule of the run (β_start..β_end over T steps)."""
    return make_schedule("linear", cfg.T, beta_start=cfg.beta_start, beta_end=cfg.beta_end)


def build_tadiff_model(cfg: TaDiffConfig) -> TaDiffModel:
    """A freshly initialised :class:`TaDiffModel` (the λ net is built after the UNet, so every
    schedule of a sweep starts from the same UNet weights)."""
    net = TaDiffNet(cfg.model)
    lam = None
    if cfg.schedule == "learnable":
        lam = LearnableLambda(cfg.T, cfg.lambda0, cfg.learnable_bins)
    return TaDiffModel(net, lam)


def make_data(cfg: TaDiffConfig, out_dir: str | os.PathLike) -> Path:
    """Write the procedural patients of ``cfg.data`` to ``data.path`` (or ``out_dir``) unless
    they are there already; returns the folder."""
    from dualdiff.data.tadiff import patient_ids, write_procedural_patients
    from dualdiff.data.tadiff_io import list_npy_patients

    d = cfg.data
    path = Path(d.path) if d.path else Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    stamp = path / "procedural.json"
    meta = {"seed": d.seed, "num_patients": d.num_patients, "size": cfg.model.image_size,
            "depth": d.depth, "sessions": d.sessions}
    have = set(list_npy_patients(path))
    if stamp.is_file() and json.loads(stamp.read_text()) == meta and set(patient_ids(d.num_patients)) <= have:
        return path
    write_procedural_patients(path, d.num_patients, seed=d.seed, size=cfg.model.image_size,
                              depth=d.depth, sessions=d.sessions)
    stamp.write_text(json.dumps(meta))
    return path


def build_tadiff_datasets(cfg: TaDiffConfig, out_dir: str | os.PathLike | None = None):
    """``(train, val)`` :class:`dualdiff.data.tadiff_io.TaDiffSlices` of ``cfg.data``."""
    from dualdiff.data.tadiff_io import (TaDiffSlices, center_crop_pad, crop_foreground,
                                         list_nifti_patients, list_npy_patients, load_patients)

    d = cfg.data
    if d.source == "procedural":
        root = make_data(cfg, d.path or Path(out_dir or ".") / "data")
        ids = list_npy_patients(root)[: d.num_patients]
    else:
        root = Path(d.path)
        ids = list_npy_patients(root) if d.source == "npy" else list_nifti_patients(root)
    if len(ids) < 2:
        raise FileNotFoundError(f"data.path {str(root)!r} holds {len(ids)} patient(s) in the "
                                f"{d.source} layout; at least 2 are needed (train + validation)")
    nval = min(d.val_patients, len(ids) - 1)
    patients = [center_crop_pad(crop_foreground(p), cfg.model.image_size)
                for p in load_patients(root, ids, "nifti" if d.source == "nifti" else "npy",
                                       verify=d.verify, skip_bad=d.skip_bad)]
    S = cfg.model.sessions
    return TaDiffSlices(patients[:-nval], S), TaDiffSlices(patients[-nval:], S)


# ---------------------------------------------------------------------------------------
# loss


def noise_weight_map(label: torch.Tensor) -> torch.Tensor:
    """The public code's pixel weights ``1 + conv(s·e^{-s}, 11x11 ones / 10)`` (zero padding),
    ``s = Σ_sessions label``; ``label [B, S, H, W]`` -> ``[B, 1, H, W]``."""
    s = label.float().sum(1, keepdim=True)
    return 1.0 + 0.1 * _box_sum(s * torch.exp(-s), 11)


def _box_sum(y: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over the k x k window centred on each pixel of ``y [B, 1, H, W]`` (zero padding, odd k):
    two cumulative-sum differences, O(HW) instead of the O(k²HW) convolution (same values to
    float rounding)."""
    r = k // 2
    z = F.pad(y, (r + 1, r, r + 1, r))
    c = z.cumsum(2)
    z = c[:, :, k:] - c[:, :, :-k]
    c = z.cumsum(3)
    return c[..., k:] - c[..., :-k]


def _unpack(batch: dict, sessions: int, modalities: int) -> tuple[torch.Tensor, ...]:
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict with image, label, days, treatments; got {type(batch).__name__}")
    missing = {"image", "label", "days", "treatments"} - set(batch)
    if missing:
        raise KeyError(f"batch is missing {sorted(missing)}")
    img, lab, days, treat = batch["image"], batch["label"], batch["days"], batch["treatments"]
    if img.dim() != 5 or img.shape[1] != sessions or img.shape[2] != modalities:
        raise ValueError(f"batch['image'] must be [B, {sessions} sessions, {modalities} modalities, H, W], "
                         f"got shape {tuple(img.shape)}")
    B, _, _, H, W = img.shape
    if tuple(lab.shape) != (B, sessions, H, W):
        raise ValueError(f"batch['label'] must be [B, {sessions}, H, W] = {[B, sessions, H, W]}, got {tuple(lab.shape)}")
    for name, v in (("days", days), ("treatments", treat)):
        if tuple(v.shape) != (B, sessions):
            raise ValueError(f"batch['{name}'] must be [B, {sessions}], got {tuple(v.shape)}")
    return img, lab, days, treat


def build_inputs(img: torch.Tensor, x_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Model input ``[B, S·M, H, W]``: the sessions ``img [B, S, M, H, W]`` (in [-1, 1]) with
    the target session's slot replaced by ``x_t [B, M, H, W]``."""
    B, S = img.shape[:2]
    oh = F.one_hot(target.long() % S, S).to(img.dtype)[:, :, None, None, None]
    return (img * (1 - oh) + x_t[:, None] * oh).reshape(B, -1, *img.shape[-2:])


class TaDiffLoss:
    """``loss_fn(model, batch) -> (loss, metrics)`` for the Trainer (module docstring).

    Draws (target choice, t, ε) from the global torch RNG in a fixed order and number, so runs
    with the same seed see the same draws whatever the λ schedule (common random numbers) and
    a resumed run continues exactly. Metrics: ``noise_loss`` (weighted), ``noise_mse``
    (unweighted), ``dice_loss`` (unweighted mean soft Dice over (b, session)), ``dice_term``
    (the weighted term in the loss), ``lambda_mean``.
    """

    def __init__(self, cfg: TaDiffConfig, schedule: NoiseSchedule | None = None) -> None:
        self.cfg = cfg
        self.schedule = schedule or build_tadiff_schedule(cfg)
        self._ab: dict[torch.device, torch.Tensor] = {}

    def alphabar(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._ab:
            self._ab[t.device] = self.schedule.alphas_cumprod.to(t.device, torch.float32)
        return self._ab[t.device][t]

    def draw(self, B: int, device: torch.device, shape: tuple[int, ...]):
        """``(target [B], t [B], noise [B, *shape])`` from the global RNG."""
        S, T = self.cfg.model.sessions, self.cfg.T
        pick = torch.rand(B, device=device) < self.cfg.p_random_target
        other = torch.randint(0, S, (B,), device=device)
        target = torch.where(pick, other, torch.full_like(other, S - 1))
        t = torch.randint(0, T, (B,), device=device)
        return target, t, torch.randn((B, *shape), device=device)

    def dice_weights(self, lam: torch.Tensor, a: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """The Dice weights w ``[B, S]`` from λ ``[B]``, the target scaling ``a [B, S]`` and the
        target one-hot ``[B, S]`` (module docstring: ``lambda_combine``, ``lambda_sessions``)."""
        if self.cfg.lambda_combine == "seed_batch_mean":
            lam = lam.mean().expand_as(lam)
        w = lam[:, None] * a
        if self.cfg.lambda_sessions == "target":
            w = torch.where(onehot.bool(), w, torch.full_like(w, self.cfg.lambda0))
        return w

    def dice_term(self, logits: torch.Tensor, label: torch.Tensor, w: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weighted Dice term, unweighted mean Dice loss (detached))`` from mask logits
        ``[B, S, H, W]`` and the weights ``w [B, S]`` (:meth:`dice_weights`): one fused call."""
        term = weighted_dice_loss(logits, label, w, **DICE_FLAGS)
        with torch.no_grad():
            plain = weighted_dice_loss(logits.detach(), label, None, **DICE_FLAGS)
        return term, plain

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        S, M = cfg.model.sessions, cfg.model.modalities
        img, lab, days, treat = _unpack(batch, S, M)
        x = img.float() * 2.0 - 1.0
        B = x.shape[0]
        target, t, noise = self.draw(B, x.device, tuple(x.shape[2:]))
        ab = self.alphabar(t)
        x0 = x[torch.arange(B, device=x.device), target]
        x_t = q_sample(x0, t, noise, self.schedule)
        out = model(build_inputs(x, x_t, target), t, days, treat, target)
        logits, eps = out[:, :S], out[:, S:]
        sq = (eps.float() - noise) ** 2
        wmap = noise_weight_map(lab) if cfg.noise_weight_map else None
        noise_loss = (sq * wmap).mean() if wmap is not None else sq.mean()
        lam_net = getattr(unwrap_model(model), "lam", None)
        lam = lambda_weight(cfg.schedule, ab, lambda0=cfg.lambda0, k=cfg.k, t=t, net=lam_net)
        oh = F.one_hot(target % S, S).to(ab.dtype)
        a = 1.0 + oh * (ab.sqrt()[:, None] - 1.0)                         # √ᾱ on the target session
        dice_term, dice_plain = self.dice_term(logits, lab, self.dice_weights(lam, a, oh))
        metrics = {"noise_loss": noise_loss.detach(), "noise_mse": sq.mean().detach(),
                   "dice_loss": dice_plain, "dice_term": dice_term.detach(),
                   "lambda_mean": lam.detach().mean()}
        if cfg.schedule == "learnable":                                    # Kendall's + s term
            n_lam = 1 if cfg.lambda_sessions == "target" else S
            reg = lam_net.regulariser(t).mean() * (n_lam / S)
            metrics["lambda_reg"] = reg.detach()
            dice_term = dice_term + reg
        return noise_loss + dice_term, metrics


# ---------------------------------------------------------------------------------------
# training and loading


def _prepared(config: TaDiffConfig, out_dir, resume) -> TaDiffConfig:
    if not isinstance(config, TaDiffConfig):
        raise TypeError(f"config must be a TaDiffConfig, got {type(config).__name__}")
    cfg = apply_run_flags(config, out_dir, resume, presets=TADIFF_PRESETS)
    cfg.train.validate()
    check_resume(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints")
    return cfg


def train_tadiff(config: TaDiffConfig, out_dir: str | os.PathLike | None = None,
                 resume: bool | str | None = None, *, datasets=None, until: int | None = None,
                 verbose: bool = True) -> Trainer:
    """Train (or continue) one tadiff run in ``out_dir`` (None: ``train.out_dir``) with the
    shared Trainer.

    ``resume`` (None: the ``train.resume`` key): ``"auto"`` / True, ``"latest"``, a checkpoint
    path, or False (fresh) — :mod:`dualdiff.experiments.run`.
    ``datasets``: ``(train, val)`` overriding ``config.data`` (a sweep shares them). ``until``
    stops at that step. Checkpoints store the whole config; returns the (closed) trainer.
    """
    cfg = _prepared(config, out_dir, resume)
    train_set, _ = datasets if datasets is not None else build_tadiff_datasets(cfg, cfg.train.out_dir)
    torch.manual_seed(derive_seed(cfg.train.seed, "tadiff-init"))  # same UNet for every schedule
    model = build_tadiff_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    log.info("tadiff %s model with %d parameters", cfg.schedule, n)
    if verbose:
        print(f"tadiff [{cfg.schedule}, {cfg.lambda_combine}]: {n:,} parameters, "
              f"{len(train_set):,} training slices")
    trainer = Trainer(model, TaDiffLoss(cfg), train_set, cfg.train, run_config=cfg)
    try:
        trainer.fit(until=until)
    finally:
        trainer.close()
    return trainer


def load_tadiff_model(checkpoint: str | os.PathLike, ema: bool = True,
                      map_location: Any = "cpu") -> tuple[TaDiffModel, TaDiffConfig]:
    """``(model in eval mode, config)`` from a checkpoint file or run directory of
    :func:`train_tadiff` (EMA weights when present and ``ema``)."""
    run = load_run(checkpoint, TaDiffConfig, writer="train_tadiff", map_location=map_location)
    model = load_weights(build_tadiff_model(run.config), run, ema=ema)
    return model.to(map_location).eval(), run.config


# ---------------------------------------------------------------------------------------
# evaluation


def _device(cfg: TaDiffConfig) -> torch.device:
    from dualdiff.train.distributed import default_device
    return default_device(cfg.train.device)


def _batches(dataset, n: int, batch_size: int, device) -> list[dict]:
    """The first ``n`` batches of ``dataset`` in a fixed (seeded) order."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(dataset), generator=g).tolist()
    out = []
    for i in range(n):
        idx = order[i * batch_size:(i + 1) * batch_size]
        if not idx:
            break
        items = [dataset[j] for j in idx]
        out.append({k: torch.stack([it[k] for it in items]).to(device) for k in items[0]})
    return out


@torch.no_grad()
def eval_losses(model: nn.Module, batches: list[dict], cfg: TaDiffConfig, seed: int = 0) -> dict[str, float]:
    """Mean loss, noise terms and Dice loss over ``batches`` with seeded draws (no training RNG touched)."""
    loss_fn = TaDiffLoss(cfg)
    sums: dict[str, float] = {}
    cuda = [b["image"].device for b in batches[:1] if b["image"].device.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for b in batches:
            loss, m = loss_fn(model, b)
            for k, v in {"loss": loss, **m}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}


@torch.no_grad()
def dice_vs_t(model: nn.Module, batches: list[dict], cfg: TaDiffConfig, seed: int = 0) -> dict[str, list[float]]:
    """Dice at 0.5 of the one-step mask head at ``eval_t_points`` timesteps (target = last
    session): ``{"t", "target", "reference"}`` (reference = mean over the other sessions)."""
    schedule = build_tadiff_schedule(cfg)
    S = cfg.model.sessions
    ts = np.linspace(0, cfg.T - 1, cfg.eval_t_points).round().astype(int).tolist()
    res = {"t": ts, "target": [], "reference": []}
    g = torch.Generator().manual_seed(seed)
    for tv in ts:
        tgt, ref = [], []
        for b in batches:
            x = b["image"].float() * 2 - 1
            B = x.shape[0]
            target = torch.full((B,), S - 1, dtype=torch.long, device=x.device)
            t = torch.full((B,), tv, dtype=torch.long, device=x.device)
            noise = torch.randn(x[:, -1].shape, generator=g).to(x.device)
            x_t = q_sample(x[:, -1], t, noise, schedule)
            logits = model(build_inputs(x, x_t, target), t, b["days"], b["treatments"], target)[:, :S]
            d = torch.stack([dice_at_threshold(torch.sigmoid(logits[:, s]), b["label"][:, s] > 0.5)
                             for s in range(S)], 1)                    # [B, S]
            tgt.append(d[:, -1])
            ref.append(d[:, :-1].mean(1))
        res["target"].append(float(torch.cat(tgt).mean()))
        res["reference"].append(float(torch.cat(ref).mean()))
    return res


@torch.no_grad()
def sample_target(model: nn.Module, batch: dict, cfg: TaDiffConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample the last session of each case ``num_samples`` times with the shared sampler.

    Returns CPU tensors: ``image`` [N, K, 3, H, W] and ``mask`` [N, K, H, W] (sigmoid of the
    mask head at the last step) in [0, 1], N cases x K samples.
    """
    schedule = build_tadiff_schedule(cfg)
    S, K = cfg.model.sessions, cfg.num_samples
    x = (batch["image"].float() * 2 - 1).repeat_interleave(K, 0)
    days, treat = batch["days"].repeat_interleave(K, 0), batch["treatments"].repeat_interleave(K, 0)
    N = x.shape[0]
    target = torch.full((N,), S - 1, dtype=torch.long, device=x.device)
    last: dict[str, torch.Tensor] = {}

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(build_inputs(x, x_t, target), t, days, treat, target)
        last["mask"] = out[:, S - 1]
        return out[:, S:]

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(x[:, -1].shape, generator=g).to(x.device)
    steps = ddim_timesteps(cfg.sample_steps, cfg.T).to(x.device)
    if cfg.sampler == "ddim":
        out = ddim_sample(model_fn, x_T, steps, DDIMScheduler(schedule.to(x.device)), clip_sample=True).sample
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed + 1)
        out = ddpm_sample(model_fn, x_T, schedule.to(x.device), steps, clip_sample=True, generator=gen).sample
    img = ((out.clamp(-1, 1) + 1) / 2).cpu()
    mask = torch.sigmoid(last["mask"]).cpu()
    n = N // K
    return {"image": img.reshape(n, K, *img.shape[1:]), "mask": mask.reshape(n, K, *mask.shape[1:])}


def sample_metrics(samples: dict[str, torch.Tensor], batch: dict) -> dict[str, float]:
    """Metrics of the sample means against the true last session: Dice at 0.25 / 0.5 / 0.75,
    RAVD (0.5), SSIM, PSNR, MAE (images in [0, 1])."""
    true_img = batch["image"][:, -1].float().cpu()
    true_mask = batch["label"][:, -1].cpu() > 0.5
    prob = samples["mask"].mean(1)
    img = samples["image"].mean(1)
    out = {f"dice@{th}": float(dice_at_threshold(prob, true_mask, th).mean()) for th in (0.25, 0.5, 0.75)}
    r = ravd(prob, true_mask, 0.5)
    out["ravd"] = float(r[torch.isfinite(r)].mean()) if torch.isfinite(r).any() else float("nan")
    out["ssim"] = float(ssim(img, true_img).mean())
    out["psnr"] = float(psnr(img, true_img).mean())
    out["mae"] = float(mae(img, true_img).mean())
    return out


#: what ``tadiff eval`` may change in a run's stored config: the evaluation keys, the batch size,
#: device and run folder, and where the patients are now. The rest made the run (the model, its
#: noise schedule, λ(t) and loss) or chooses the validation patients (a changed split could score
#: patients the run trained on).
EVAL_KEYS = ("eval_batches", "eval_t_points", "sample_cases", "num_samples", "sample_steps", "sampler",
             "eval_seed", "train.batch_size", "train.device", "train.out_dir", "train.resume",
             "data.path", "data.verify", "data.skip_bad")


def evaluate_tadiff(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                    overrides: list[str] | None = None, config: TaDiffConfig | None = None, datasets=None,
                    device: str | None = None, verbose: bool = True) -> dict:
    """Evaluate a trained run: validation losses, Dice vs t, sampled target session metrics.

    ``checkpoint``: file or run directory (:func:`dualdiff.experiments.run.load_run`). The
    stored config is used, or ``config`` (the stored one with the CLI's ``--config`` /
    ``key=value`` applied), with ``overrides`` (``key=value``); a change to a key outside
    :data:`EVAL_KEYS` is a ConfigError. ``device``: None = the config's ``train.device``.
    Writes ``eval.json`` and ``samples.pt`` to ``out_dir`` (default: the run directory) and
    returns the result dict.
    """
    from dualdiff.config import apply_overrides, refuse_changes
    from dualdiff.train.distributed import default_device

    run = load_run(checkpoint, TaDiffConfig, writer="train_tadiff")
    stored = run.config
    cfg = copy.deepcopy(config) if config is not None else stored
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    refuse_changes(stored, cfg, EVAL_KEYS, "eval scores the trained run on its own validation patients")
    device = str(default_device(device if device is not None else cfg.train.device))
    model = load_weights(build_tadiff_model(stored), run, ema=True).to(device).eval()
    ckpt = run.path
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = datasets if datasets is not None else build_tadiff_datasets(cfg, run_dir)
    bs = cfg.train.batch_size
    batches = _batches(val_set, cfg.eval_batches, bs, device)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"schedule": cfg.schedule, "lambda_combine": cfg.lambda_combine,
                           "checkpoint": str(ckpt)}
    res["val"] = eval_losses(model, batches, cfg, cfg.eval_seed)
    res["train"] = eval_losses(model, _batches(train_set, cfg.eval_batches, bs, device), cfg, cfg.eval_seed)
    res["dice_vs_t"] = dice_vs_t(model, batches, cfg, cfg.eval_seed)
    case = _batches(val_set, 1, cfg.sample_cases, device)[0]
    samples = sample_target(model, case, cfg, cfg.eval_seed)
    res["sample"] = sample_metrics(samples, case)
    if model.lam is not None:
        res["learned_lambda"] = model.lam.table().tolist()
    res["eval_seconds"] = time.perf_counter() - t0
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    torch.save({"samples": samples, "case": {k: v.cpu() for k, v in case.items()}}, out / "samples.pt")
    if verbose:
        v, s = res["val"], res["sample"]
        print(f"[{cfg.schedule}] val loss {v['loss']:.4f} (noise {v['noise_loss']:.4f}, dice {v['dice_loss']:.4f}); "
              f"sampled: dice@0.5 {s['dice@0.5']:.3f} ssim {s['ssim']:.3f} psnr {s['psnr']:.2f} mae {s['mae']:.4f}")
    return res


# ---------------------------------------------------------------------------------------
# sweep, plots, demo

_TABLE_KEYS = ("val/loss", "val/noise_mse", "val/dice_loss", "train/loss", "sample/dice@0.5",
               "sample/ravd", "sample/ssim", "sample/psnr", "sample/mae")


def _table(results: dict[str, dict]) -> str:
    head = "| schedule | " + " | ".join(_TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (len(_TABLE_KEYS) + 1)]
    for name, r in results.items():
        vals = []
        for key in _TABLE_KEYS:
            sec, k = key.split("/")
            vals.append(f"{r[sec][k]:.4g}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def sweep_tadiff(config: TaDiffConfig, out_dir: str | os.PathLike | None = None,
                 resume: bool | str | None = None, *, verbose: bool = True) -> dict[str, dict]:
    """Train and evaluate every schedule in ``config.schedules`` under ``out_dir/<schedule>``
    (None: ``train.out_dir``) with common random numbers (same data, initial UNet, seeds), then
    write ``comparison.json`` / ``comparison.md`` and the figures. ``resume`` (None: the
    ``train.resume`` key) applies to each run, as in :func:`train_tadiff`; a run that already
    reached ``train.steps`` is not retrained when resuming."""
    if not isinstance(config, TaDiffConfig):
        raise TypeError(f"config must be a TaDiffConfig, got {type(config).__name__}")
    base = apply_run_flags(config, out_dir, resume, presets=TADIFF_PRESETS)
    out = Path(base.train.out_dir)
    resume = base.train.resume
    out.mkdir(parents=True, exist_ok=True)
    datasets = build_tadiff_datasets(base, out)
    results = {}
    for s in base.schedules:
        cfg = copy.deepcopy(base)
        cfg.schedule = s
        run = out / s
        cfg.train.out_dir = str(run)
        done = latest_checkpoint(run / "checkpoints")
        if resume and done is not None and int(done.stem.split("_")[-1]) >= cfg.train.steps:
            if verbose:
                print(f"[{s}] already trained ({done.name})")
        else:
            train_tadiff(cfg, datasets=datasets, verbose=verbose)
        results[s] = evaluate_tadiff(run, run, datasets=datasets, device=str(_device(cfg)), verbose=verbose)
    (out / "comparison.json").write_text(json.dumps(results, indent=2))
    (out / "comparison.md").write_text(_table(results) + "\n")
    if verbose:
        print(_table(results))
    plot_tadiff(out)
    return results


def plot_tadiff(run_dir: str | os.PathLike) -> list[Path]:
    """Figures of a run or sweep directory: ``lambda_schedules.png``, ``loss_curves.png``,
    ``dice_vs_t.png``, ``samples_<schedule>.png``. Returns the written paths."""
    from dualdiff.analysis import tadiff_plots as tp
    from dualdiff.train import read_jsonl

    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    runs = {p.parent.name: p.parent for p in sorted(root.glob("*/eval.json"))}
    if (root / "eval.json").is_file():
        runs = {json.loads((root / "eval.json").read_text())["schedule"]: root}
    if not runs:
        raise FileNotFoundError(f"no eval.json in {str(root)!r} or its subfolders: run "
                                f"`dualdiff tadiff eval` (or sweep) first")
    evals = {k: json.loads((d / "eval.json").read_text()) for k, d in runs.items()}
    cfg_path = next((d / "config.yaml" for d in runs.values() if (d / "config.yaml").is_file()), None)
    T, lambda0, k = 1000, 0.01, 2.0
    if cfg_path is not None:
        from dualdiff.config import load_config
        c = load_config(TaDiffConfig, cfg_path, [])
        T, lambda0, k = c.T, c.lambda0, c.k
        schedule = build_tadiff_schedule(c)
    else:
        schedule = make_schedule("linear", T)
    learned = {n: e["learned_lambda"] for n, e in evals.items() if "learned_lambda" in e}
    files = [tp.plot_lambda_schedules(schedule, root / "lambda_schedules.png", lambda0=lambda0, k=k,
                                      learned=learned)]
    hist = {n: read_jsonl(d / "metrics.jsonl") for n, d in runs.items() if (d / "metrics.jsonl").is_file()}
    if hist:
        files.append(tp.plot_loss_curves(hist, root / "loss_curves.png"))
    files.append(tp.plot_dice_vs_t({n: e["dice_vs_t"] for n, e in evals.items()}, root / "dice_vs_t.png"))
    for n, d in runs.items():
        if (d / "samples.pt").is_file():
            s = torch.load(d / "samples.pt", weights_only=True)
            files.append(tp.plot_sample_grid(s["samples"], s["case"], root / f"samples_{n}.png", title=n))
    return files


def per_case_metrics(samples: dict[str, torch.Tensor], case: dict) -> dict[str, list[float]]:
    """Per validation case: Dice at 0.5 of the sample-mean mask, SSIM and PSNR of the sample-mean
    image against the true last session (the quantities :func:`sample_metrics` averages)."""
    true_img = case["image"][:, -1].float().cpu()
    true_mask = case["label"][:, -1].cpu() > 0.5
    img = samples["image"].mean(1)
    return {"dice": dice_at_threshold(samples["mask"].mean(1), true_mask, 0.5).tolist(),
            "ssim": ssim(img, true_img).tolist(), "psnr": psnr(img, true_img).tolist()}


def demo_summary(sweep_dir: str | os.PathLike, baseline: str = "fixed", headline: str = "power",
                 verbose: bool = True) -> dict[str, Any]:
    """The demo's answer: per schedule, the paired difference to ``baseline`` of Dice / SSIM /
    PSNR over the validation cases every schedule sampled (same cases, same sampling noise),
    with its 95 % Student-t interval over cases; "within noise" when the interval contains 0.
    Writes ``demo.md``, ``demo.json`` and the one figure ``demo.png`` (title: ``headline`` vs
    ``baseline`` Dice). The interval covers case-to-case variation at one training seed only;
    seed-to-seed variation needs ``dualdiff tadiff study``."""
    from dualdiff.analysis.tadiff_plots import plot_demo_summary
    from dualdiff.study.stats import t_interval

    root = Path(sweep_dir)
    runs = {p.parent.name: p for p in sorted(root.glob("*/samples.pt"))}
    if baseline not in runs:
        raise FileNotFoundError(f"no {baseline}/samples.pt in {str(root)!r}: run the sweep first")
    data = {n: torch.load(p, weights_only=True) for n, p in runs.items()}
    order = [baseline] + [n for n in runs if n != baseline]
    case = data[baseline]["case"]
    per = {n: per_case_metrics(data[n]["samples"], case) for n in order}
    rows, lines = {}, []
    for n in order:
        rows[n] = {}
        for m in ("dice", "ssim", "psnr"):
            entry: dict[str, Any] = {"mean": float(np.mean(per[n][m]))}
            if n != baseline:
                iv = t_interval(np.subtract(per[n][m], per[baseline][m]))
                within = not iv.excludes_zero()
                entry.update(diff=iv.to_dict(), within_noise=within)
            rows[n][m] = entry
    ncases = len(per[baseline]["dice"])
    lines.append(f"# tadiff demo: does λ(t) change the target session's segmentation and image?\n")
    lines.append(f"{ncases} validation cases, one training seed; every schedule saw the same data, "
                 f"initial weights, training draws and sampling noise. Differences are "
                 f"`schedule - {baseline}`, mean [95 % Student-t interval over the cases]; "
                 "**within noise** = the interval contains 0. The interval covers case-to-case "
                 "variation only, not training-seed variation: `dualdiff tadiff study` runs "
                 "several seeds.\n")
    lines.append("| schedule | Dice@0.5 | SSIM | PSNR | Δ Dice | Δ SSIM | Δ PSNR |")
    lines.append("|---|---|---|---|---|---|---|")
    for n in order:
        cells = [f"{rows[n][m]['mean']:.4g}" for m in ("dice", "ssim", "psnr")]
        for m in ("dice", "ssim", "psnr"):
            if n == baseline:
                cells.append("(baseline)")
                continue
            d = rows[n][m]["diff"]
            if d["low"] is None:
                cells.append(f"{d['mean']:+.3g} (no interval)")
            else:
                tag = "within noise" if rows[n][m]["within_noise"] else "beyond noise"
                cells.append(f"{d['mean']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}] {tag}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    plain = []
    for n in order[1:]:
        inside = [m for m in ("dice", "ssim", "psnr") if rows[n][m]["within_noise"]]
        outside = [f"{m} ({rows[n][m]['diff']['mean']:+.3g})" for m in ("dice", "ssim", "psnr")
                   if not rows[n][m]["within_noise"]]
        parts = ([f"within noise: {', '.join(inside)}"] if inside else []) + \
                ([f"beyond noise: {', '.join(outside)}"] if outside else [])
        plain.append(f"- {n} vs {baseline}: " + "; ".join(parts))
    lines += ["", "In plain words:", *plain, ""]
    head = headline if headline in rows and headline != baseline else (order[1] if len(order) > 1 else None)
    if head is not None:
        d = rows[head]["dice"]["diff"]
        verdict = "within noise" if rows[head]["dice"]["within_noise"] else "beyond noise"
        ci = "" if d["low"] is None else f" [{d['low']:+.3f}, {d['high']:+.3f}]"
        title = (f"target Dice@0.5: {head} {rows[head]['dice']['mean']:.3f} vs {baseline} "
                 f"{rows[baseline]['dice']['mean']:.3f}, Δ {d['mean']:+.3f}{ci} over {ncases} cases: {verdict}")
    else:
        title = f"target Dice@0.5: {baseline} {rows[baseline]['dice']['mean']:.3f} ({ncases} cases)"
    lines.insert(1, f"**{title}**\n")
    (root / "demo.md").write_text("\n".join(lines) + "\n")
    result = {"baseline": baseline, "cases": ncases, "per_case": per, "schedules": rows, "title": title}
    (root / "demo.json").write_text(json.dumps(result, indent=2))
    plot_demo_summary(case, {n: data[n]["samples"] for n in order}, per, root / "demo.png", title)
    if verbose:
        print("\n".join(lines[1:2] + plain))
        print(f"wrote {root / 'demo.md'} and {root / 'demo.png'}")
    return result


def demo_tadiff(out_dir: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                config: TaDiffConfig | None = None, verbose: bool = True) -> dict[str, dict]:
    """The whole experiment on the ``demo`` preset (tiny, fixed / power / learnable λ, 150 steps
    each) in a few CPU minutes: procedural data, sweep, evaluation, table and figures, ending
    with :func:`demo_summary` (``demo.md`` and the one figure ``demo.png``: which differences
    to ``fixed`` are within noise). ``config`` replaces the preset; ``overrides``
    (``key=value``) are applied to it. Returns the sweep's results plus ``"demo"``: the summary."""
    from dualdiff.config import apply_overrides

    cfg = config if config is not None else TaDiffConfig.from_name("demo")
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    t0 = time.perf_counter()
    res = sweep_tadiff(cfg, out_dir, verbose=verbose)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.out_dir)
    base = "fixed" if "fixed" in res else next(iter(res))
    res = dict(res, demo=demo_summary(out, baseline=base, verbose=verbose))
    if verbose:
        print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return res
