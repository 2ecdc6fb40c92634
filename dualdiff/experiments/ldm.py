"""ldm experiment: latent diffusion conditioned on a mask's class distribution, with
classifier-free guidance (lucidrains' ``classifier_free_guidance`` setup, the seed's model).

Pipeline, all in one run folder ``R``:

1. ``autoencoder`` — trains the vae experiment's ``conv_kl`` autoencoder on the tiles
   (:func:`train_autoencoder` -> ``R/autoencoder/``), or ``ae.source=diffusers`` loads an
   ``AutoencoderKL`` from a local folder (``local_files_only``).
2. ``encode`` — encodes the train / test tiles once (posterior mean) into ``R/latents_train.pt``
   and ``R/latents_test.pt`` (:mod:`dualdiff.data.latent_cache`), scale = the autoencoder's
   scaling factor or 1/std of the train latents. No ``2x - 1``, no clamping.
3. ``train`` — the shared Trainer on the cached latents: per sample t ~ U{0..T-1}, ε ~ N(0, I),
   z_t = q_sample(z0, t, ε); the null embedding replaces the condition with probability
   ``cond_drop_prob`` (always for tiles without a mask, :func:`drop_mask`); loss =
   mean_b w(t_b) · mean((f(z_t, t, d, null) - target)²) with target and w from
   :mod:`dualdiff.diffusion` (``objective`` pred_noise | pred_x0 | pred_v, ``loss_weighting``
   none | p2 | min_snr). Adam + OneCycleLR (LR logged), EMA every 10 steps. A non-finite
   loss is skipped and counted by the Trainer's guard (no nan_to_num).
4. ``sample`` — DDIM over lucidrains' timestep sequence (``sampling_timesteps``, ``ddim_eta``)
   with guidance (``cond_scale``, ``rescaled_phi``, ``remove_parallel``); the conditional and
   null predictions come from one batched forward (:func:`guided_model_fn`). Latents are
   decoded by the autoencoder (``z / scale``).
5. ``eval`` — conditioning error (the stain rule on decoded samples vs the requested
   distribution, total-variation distance, per cond_scale x rescaled_phi, with the
   unconditional and autoencoder-round-trip rows as references), the Fréchet distance on
   autoencoder-encoder features (pooled posterior means) against the test tiles, and the loss
   per t quartile for every objective (the model's prediction converted to each).
6. ``plot`` — training curves (loss, LR), loss per t quartile, conditioning error, grids.

Size (over ~500 lines): the six pipeline stages share one config and one run folder; the codec
is in :mod:`dualdiff.models.codec` and guidance in :mod:`dualdiff.diffusion.samplers`; the
evaluation metrics (conditioning error, AE-feature Fréchet distance, loss per t quartile) are
the next candidates for ``dualdiff.metrics``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualdiff.diffusion.samplers import guided_model_fn
from dualdiff.errors import CheckpointError, ConfigError
from dualdiff.models.codec import Codec, diffusers_codec, own_codec
from dualdiff.experiments.run import apply_run_flags, check_resume, from_name, load_run, load_weights
from dualdiff.models.cond_unet import ClassDistUNet, CondUNetConfig
from dualdiff.train import TrainConfig, Trainer
from dualdiff.utils.seed import derive_seed

__all__ = ["LDMDataConfig", "LDMAEConfig", "LDMConfig", "LDM_PRESETS", "drop_mask", "LDMLoss",
           "Codec", "load_codec", "train_autoencoder", "encode_latents", "build_trainer", "train_ldm",
           "load_ldm", "guided_model_fn", "sample_latents", "sample_ldm", "evaluate_ldm", "plot_ldm",
           "demo_ldm", "conditioning_error", "loss_per_quartile", "ema_step_shares", "LUCIDRAINS_EMA",
           "tiny_ema_update_after_step", "balanced_requests"]

log = logging.getLogger("dualdiff.train.ldm")  # shown with the Trainer's debug output


# ---------------------------------------------------------------------------------------
# config


@dataclass
class LDMDataConfig:
    """``source``: ``embedded`` (tiles of scikit-image's immunohistochemistry image,
    ``num_train`` / ``num_test`` crops, the right ``test_fraction`` of the columns held out) or
    ``folder`` (``path`` with images/, masks/, optional unlabelled/; ``val_fraction`` held out,
    the seed's 90/10). ``image_size``: tile side in pixels. ``sampling``: ``uniform`` or
    ``class_balanced`` (the seed's cutoffs with ``balance_p`` = the uniform share: 0 = fully
    balanced, the seed's *test* cutoffs [0, .25, .5, .75, 1]; 0.5 = the seed's *training* cutoffs;
    1 = uniform; :mod:`dualdiff.data.histology`).
    ``verify`` / ``skip_bad`` (folder source): images and masks are checked when the dataset is
    built (``verify``: fully decoded); a bad pair is an error naming the file, or with ``skip_bad``
    is skipped with a warning (:mod:`dualdiff.data.checks`)."""
    source: Literal["embedded", "folder"] = "embedded"
    path: str | None = None
    image_size: int = 128
    num_classes: int = 5
    num_train: int = 512
    num_test: int = 64
    test_fraction: float = 0.25
    val_fraction: float = 0.1
    sampling: Literal["uniform", "class_balanced"] = "uniform"
    balance_p: float = 0.5
    verify: bool = False
    skip_bad: bool = False
    seed: int = 0

    def validate(self) -> None:
        if self.source == "folder" and not self.path:
            raise ConfigError("data.path is required when data.source is 'folder'")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {self.image_size}")
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {self.num_classes}")
        if self.num_train < 1 or self.num_test < 1:
            raise ConfigError(f"data.num_train and data.num_test must be >= 1, got {self.num_train}, {self.num_test}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.balance_p <= 1.0:
            raise ConfigError(f"data.balance_p must be in [0, 1], got {self.balance_p}")


#: ``ae.train.out_dir``'s only value: the autoencoder stage writes to ``<run folder>/autoencoder``
AE_OUT_DIR = "<run folder>/autoencoder"


def _default_ae_train() -> TrainConfig:
    return TrainConfig(steps=3000, batch_size=16, lr=2e-4, optimizer="adam", out_dir=AE_OUT_DIR, log_every=50)


@dataclass
class LDMAEConfig:
    """``source``: ``own`` (the vae experiment's ``conv_kl``, trained by ``dualdiff ldm
    autoencoder``; ``path`` = its run folder or checkpoint, default ``<out-dir>/autoencoder``) or
    ``diffusers`` (``AutoencoderKL`` folder at ``path``, loaded with ``local_files_only``).
    ``scale``: ``auto`` | ``ae`` | ``std`` (:func:`dualdiff.data.latent_cache.latent_scale`).
    ``latent_channels`` ... ``kl_weight`` configure the own autoencoder (kl_weight in the vae
    experiment's per-latent-dim convention); ``train`` is the autoencoder stage's own full
    TrainConfig (``ae.train.lr``, ``ae.train.steps`` ...: ``dualdiff ldm autoencoder`` trains
    with it, ``--resume`` / ``--device`` of that command set its keys). ``ae.train.out_dir`` is
    not a key to set: the stage writes to ``<run folder>/autoencoder``."""
    source: Literal["own", "diffusers"] = "own"
    path: str | None = None
    scale: Literal["auto", "ae", "std"] = "auto"
    latent_channels: int = 4
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    downsample_factor: int = 8
    kl_weight: float = 1e-4
    train: TrainConfig = field(default_factory=_default_ae_train)

    def validate(self) -> None:
        if self.source == "diffusers" and not self.path:
            raise ConfigError("ae.path (a local AutoencoderKL folder) is required when ae.source is 'diffusers'")
        for name in ("latent_channels", "base_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ae.{name} must be >= 1, got {getattr(self, name)}")
        f = self.downsample_factor
        if f < 1 or f & (f - 1) or f > 2 ** len(self.channel_mults):
            raise ConfigError(f"ae.downsample_factor must be a power of two <= 2**len(ae.channel_mults), got {f}")
        if not self.kl_weight >= 0:
            raise ConfigError(f"ae.kl_weight must be >= 0, got {self.kl_weight}")
        if self.train.out_dir != AE_OUT_DIR:
            raise ConfigError(f"ae.train.out_dir is not a key to set (got {self.train.out_dir!r}): the autoencoder "
                              f"is written to <run folder>/autoencoder; choose the run folder with --out-dir "
                              f"(train.out_dir)")
        self.train.validate()


#: lucidrains' EMA (ema-pytorch as its Trainer uses it): decay ramp 1 - (1 + s/inv_gamma)^-power
#: capped at ema_decay, updated every 10 steps, the weights copied up to update_after_step
LUCIDRAINS_EMA = dict(ema_decay=0.995, ema_every=10, ema_update_after_step=100, ema_inv_gamma=1.0,
                      ema_power=2 / 3, ema_min_decay=0.0)


def _default_train() -> TrainConfig:
    """lucidrains' Trainer: Adam 1e-4, 100 000 steps, EMA as :data:`LUCIDRAINS_EMA`."""
    return TrainConfig(steps=100_000, batch_size=16, lr=1e-4, optimizer="adam", scheduler="onecycle",
                       **LUCIDRAINS_EMA, out_dir="runs/ldm", checkpoint_every=5000, log_every=50)


def tiny_ema_update_after_step(steps: int) -> int:
    """The tiny preset's EMA copy phase: 10 % of the run (60 of 600 steps). lucidrains' 100
    steps are 0.1 % of its Trainer's 100 000; 0.1 % of a 600-step run is under one EMA period
    (``ema_every`` = 10), so the copy phase is scaled to 10 % instead: no weights from the first
    tenth of the run (the random initial ones included) enter the average."""
    return max(0, steps // 10)


@dataclass
class LDMConfig:
    """The whole ldm run (module docstring). Diffusion: ``timesteps``, ``beta_schedule``,
    ``objective`` (pred_noise | pred_x0 | pred_v), ``loss_weighting`` (none | p2 | min_snr;
    ``p2_gamma``, ``p2_k``, ``min_snr_gamma``), ``cond_drop_prob``. The effective loss of each
    combination, as a weight λ(snr) on ‖x0 - x̂0‖², is the table in
    :mod:`dualdiff.diffusion.objectives` (:func:`~dualdiff.diffusion.objectives.x0_loss_weight`).
    Sampling: ``sampling_timesteps``, ``ddim_eta``, ``cond_scale``, ``rescaled_phi``,
    ``remove_parallel``, ``keep_parallel_frac``, ``num_samples``. ``cond_scale`` = 6 and
    ``rescaled_phi`` = 0.7 are lucidrains' ``classifier_free_guidance.py`` defaults
    (``GaussianDiffusion.sample(classes, cond_scale = 6., rescaled_phi = 0.7)``; its example
    samples at ``cond_scale = 6.``, "reportedly 3-8 is good empirically"). Evaluation: ``eval_cond_scales`` x
    ``eval_rescaled_phis``, ``eval_requests`` test masks, ``eval_samples`` per request,
    ``eval_loss_batches`` batches of the test latents per objective.
    Logging of shapes and values: ``train.debug`` (+ ``train.debug_batches``)."""
    model: CondUNetConfig = field(default_factory=CondUNetConfig)
    data: LDMDataConfig = field(default_factory=LDMDataConfig)
    ae: LDMAEConfig = field(default_factory=LDMAEConfig)
    train: TrainConfig = field(default_factory=_default_train)
    timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine", "scaled_linear", "sigmoid"] = "cosine"
    # objective: pred_v, not the seed's pred_noise: measured on the tiny preset with the fixed EMA
    # (seed 0, 600 steps), pred_noise sampling diverges without the latent clamp (sampled latent
    # std 3377 vs 1.06 for the data; conditioning error 0.49 at cond_scale 6 vs 0.52
    # unconditional) while pred_v does not (std 1.37; 0.093 vs 0.589): the x0 implied by an ε
    # prediction multiplies its error by 1/sqrt(ᾱ_t) (2e4 at t = 999 of the cosine schedule)
    objective: str = "pred_v"
    # the seed's weighting: p2 with γ = 0 (lucidrains v1.5's default) = no weighting, so the loss
    # is the plain v-MSE = (1 + snr)·‖x0 - x̂0‖² (objectives' table; γ = 1, k = 1 would be x0-MSE)
    loss_weighting: Literal["none", "p2", "min_snr"] = "p2"
    p2_gamma: float = 0.0
    p2_k: float = 1.0
    min_snr_gamma: float = 5.0
    cond_drop_prob: float = 0.5
    sampling_timesteps: int = 250
    ddim_eta: float = 1.0
    cond_scale: float = 6.0  # lucidrains' default (docstring)
    rescaled_phi: float = 0.7
    remove_parallel: bool = True
    keep_parallel_frac: float = 0.0
    num_samples: int = 16
    eval_cond_scales: list[float] = field(default_factory=lambda: [1.0, 3.0, 6.0])
    eval_rescaled_phis: list[float] = field(default_factory=lambda: [0.0, 0.7])
    eval_requests: int = 4
    eval_samples: int = 8
    eval_loss_batches: int = 4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from dualdiff.diffusion.objectives import OBJECTIVES, normalize_objective

        try:
            normalize_objective(self.objective)
        except ValueError:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}") from None
        self.model.validate()
        self.data.validate()
        self.ae.validate()
        if self.model.num_classes != self.data.num_classes:
            raise ConfigError(f"model.num_classes ({self.model.num_classes}) must equal data.num_classes "
                             f"({self.data.num_classes})")
        if self.ae.source == "own" and self.model.channels != self.ae.latent_channels:
            raise ConfigError(f"model.channels ({self.model.channels}) must equal ae.latent_channels "
                             f"({self.ae.latent_channels})")
        if self.ae.source == "own":
            lat = self.data.image_size // self.ae.downsample_factor
            if self.data.image_size % self.ae.downsample_factor or lat % 2 ** (len(self.model.dim_mults) - 1):
                raise ConfigError(f"data.image_size={self.data.image_size} must be divisible by "
                                 f"ae.downsample_factor={self.ae.downsample_factor} x "
                                 f"2**(len(model.dim_mults)-1)={2 ** (len(self.model.dim_mults) - 1)}")
        if not 1 <= self.sampling_timesteps <= self.timesteps:
            raise ConfigError(f"sampling_timesteps must be in [1, timesteps={self.timesteps}], got {self.sampling_timesteps}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        for name in ("rescaled_phi", "keep_parallel_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if any(not 0.0 <= p <= 1.0 for p in self.eval_rescaled_phis):
            raise ConfigError(f"eval_rescaled_phis must be in [0, 1], got {self.eval_rescaled_phis}")
        if self.ddim_eta < 0 or self.cond_scale < 0 or any(s < 0 for s in self.eval_cond_scales):
            raise ConfigError("ddim_eta, cond_scale and eval_cond_scales must be >= 0")
        for name in ("num_samples", "eval_requests", "eval_samples", "eval_loss_batches", "timesteps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.p2_gamma < 0 or self.p2_k <= 0 or self.min_snr_gamma <= 0:
            raise ConfigError("p2_gamma must be >= 0, p2_k and min_snr_gamma > 0")

    @classmethod
    def from_name(cls, name: str) -> "LDMConfig":
        """A fresh copy of the preset ``name`` (:data:`LDM_PRESETS`)."""
        return from_name(LDM_PRESETS, name, cls.__name__)


def ema_step_shares(train: TrainConfig, steps: int | None = None) -> Tensor:
    """``[steps + 1]`` float64: the coefficient of the weights after training step k (k = 0: the
    initial weights) in the EMA after ``steps`` (default ``train.steps``) steps of ``train``'s EMA
    schedule, computed by running :class:`dualdiff.train.ema.EMA` (built from the keys as the
    Trainer builds it) on one-hot weights. Sums to 1; ``[0]`` is the initial weights' share."""
    from dualdiff.train.ema import EMA

    if train.ema_decay is None:
        raise ConfigError("train.ema_decay is None: the run has no EMA")
    n = train.steps if steps is None else int(steps)
    net = nn.Linear(n + 1, 1, bias=False).double()
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
    ema = EMA(net, train.ema_decay, train.ema_every, train.ema_warmup,
              update_after_step=train.ema_update_after_step, inv_gamma=train.ema_inv_gamma,
              power=train.ema_power, min_decay=train.ema_min_decay)
    for k in range(1, n + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, k] = 1.0
        ema.update(net, k)
    return ema.model.weight.detach()[0].clone()


def _tiny() -> LDMConfig:
    """32² tiles, a 4x8x8 latent (f = 4), a 0.2M-parameter UNet: the CPU demo (~2 minutes)."""
    from dualdiff.models.cond_unet import COND_UNET_PRESETS

    ema = {**LUCIDRAINS_EMA, "ema_update_after_step": tiny_ema_update_after_step(600)}
    train = TrainConfig(steps=600, batch_size=32, lr=2e-3, optimizer="adam", scheduler="onecycle",
                        **ema, out_dir="runs/ldm-tiny", log_every=25, progress=False)
    return LDMConfig(model=copy.deepcopy(COND_UNET_PRESETS["tiny"]),
                     data=LDMDataConfig(image_size=32, num_train=512, num_test=64),
                     ae=LDMAEConfig(base_channels=16, channel_mults=[1, 2], downsample_factor=4,
                                    train=TrainConfig(steps=400, batch_size=32, lr=2e-3, optimizer="adam",
                                                      out_dir=AE_OUT_DIR, log_every=40, progress=False)),
                     train=train, sampling_timesteps=50, eval_requests=4, eval_samples=8, num_samples=8)


def _demo() -> LDMConfig:
    """The tiny preset writing to ``runs/ldm-demo``."""
    cfg = _tiny()
    cfg.train.out_dir = "runs/ldm-demo"
    return cfg


#: name -> zero-argument function building a fresh config (``preset=NAME``)
LDM_PRESETS: dict[str, Callable[[], LDMConfig]] = {"default": LDMConfig, "tiny": _tiny, "demo": _demo}


# ---------------------------------------------------------------------------------------
# schedule, conditioning, loss


def _schedule(cfg: LDMConfig):
    from dualdiff.diffusion import make_schedule

    return make_schedule(cfg.beta_schedule, cfg.timesteps)


def drop_mask(has_mask: Tensor, cond_drop_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """[B] bool: True where the sample gets the null embedding — every sample without a mask,
    and each masked one independently with probability ``cond_drop_prob``."""
    u = torch.rand(has_mask.shape, generator=generator, device=has_mask.device if generator is None else "cpu")
    return (~has_mask.bool()) | (u.to(has_mask.device) < cond_drop_prob)


class LDMLoss:
    """``loss_fn(model, batch, step) -> (loss, {mse})`` for the Trainer; ``batch = (z0 [B, C, h, w]
    scaled latents, dist [B, K], has_mask [B])`` (module docstring, step 3)."""

    def __init__(self, cfg: LDMConfig) -> None:
        from dualdiff.diffusion import normalize_objective

        self.cfg = cfg
        self.objective = normalize_objective(cfg.objective)
        self.schedule = _schedule(cfg)

    def __call__(self, model: nn.Module, batch, step: int):
        from dualdiff.diffusion import loss_weight, q_sample, training_target

        cfg = self.cfg
        z0, dist, has_mask = batch
        b = z0.shape[0]
        if self.schedule.betas.device != z0.device:
            self.schedule = self.schedule.to(z0.device)
        t = torch.randint(0, cfg.timesteps, (b,), device=z0.device)
        noise = torch.randn_like(z0)
        z_t = q_sample(z0, t, noise, self.schedule)
        null = drop_mask(has_mask, cfg.cond_drop_prob)
        out = model(z_t, t, dist, null)
        target = training_target(self.objective, z0, t, noise, self.schedule)
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        w = loss_weight(t, self.schedule, self.objective, cfg.loss_weighting, p2_gamma=cfg.p2_gamma,
                        p2_k=cfg.p2_k, min_snr_gamma=cfg.min_snr_gamma)
        loss = (per_sample * w).mean()
        if cfg.train.debug and step < cfg.train.debug_batches:
            log.info("debug step %d: z0 %s mean %.4g std %.4g | t min %d max %d | null %d/%d | "
                     "target std %.4g | output %s mean %.4g std %.4g | weight mean %.4g | loss %.4g",
                     step, tuple(z0.shape), float(z0.mean()), float(z0.std()), int(t.min()), int(t.max()),
                     int(null.sum()), b, float(target.std()), tuple(out.shape), float(out.detach().mean()),
                     float(out.detach().std()), float(w.mean()), float(loss.detach()))
        return loss, {"mse": per_sample.detach().mean()}


# ---------------------------------------------------------------------------------------
# data and autoencoder


def _datasets(cfg: LDMConfig):
    """``(train dataset, test dataset)`` of histology tile dicts."""
    from dualdiff.data.histology import EmbeddedHistology, HistologyFolder, split_indices

    d = cfg.data
    if d.source == "embedded":
        return (EmbeddedHistology("train", d.num_train, d.image_size, test_fraction=d.test_fraction, seed=d.seed),
                EmbeddedHistology("test", d.num_test, d.image_size, test_fraction=d.test_fraction, seed=d.seed))
    full = HistologyFolder(d.path, d.image_size, d.num_classes, verify=d.verify, skip_bad=d.skip_bad)
    train, val = split_indices(len(full), d.val_fraction, d.seed)
    return torch.utils.data.Subset(full, train), torch.utils.data.Subset(full, val)


class _VAETiles(torch.utils.data.Dataset):
    """Histology tiles as the vae experiment's items ``(normalised x, target, label 0, env 0)``."""
    classes = ("tile",)
    environments = ("histology",)

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from dualdiff.data.fundus import normalize

        img = self.base[i]["image"]
        return normalize(img), img, torch.tensor(0), torch.tensor(0)


def _vae_config(cfg: LDMConfig, out_dir: Path):
    """The vae experiment's config of the autoencoder stage: ``ae.*`` and its TrainConfig
    ``ae.train`` as given (only ``out_dir`` is the stage's folder)."""
    from dualdiff.experiments.vae import VAEConfig, VAEModelConfig

    a = cfg.ae
    model = VAEModelConfig(arch="conv_kl", image_size=cfg.data.image_size, latent_channels=a.latent_channels,
                           base_channels=a.base_channels, channel_mults=list(a.channel_mults),
                           downsample_factor=a.downsample_factor)
    train = dataclasses.replace(a.train, out_dir=str(out_dir))
    return VAEConfig(model=model, train=train, kl_weight=a.kl_weight, anneal="none", recon="bce",
                     eval_images=64, recon_images=8)


def train_autoencoder(cfg: LDMConfig, out_dir: str | Path | None = None, *,
                      resume: bool | str | None = None) -> dict[str, Any]:
    """Train the ``conv_kl`` autoencoder on the training tiles through the vae experiment's
    :func:`~dualdiff.experiments.vae.train_vae` into ``<run folder>/autoencoder`` (validation =
    the test tiles) with the stage's TrainConfig ``ae.train``. ``out_dir``: the run folder
    (None: ``train.out_dir``); ``resume`` (None: the ``ae.train.resume`` key) as in
    :mod:`dualdiff.experiments.run`. Returns train_vae's result."""
    from dualdiff.data.fundus import DomainSplit
    from dualdiff.experiments.vae import train_vae

    if not isinstance(cfg, LDMConfig):
        raise TypeError(f"cfg must be an LDMConfig, got {type(cfg).__name__}")
    cfg = apply_run_flags(cfg, out_dir, resume, presets=LDM_PRESETS, train_key="ae.train")
    if cfg.ae.source != "own":
        raise ConfigError("dualdiff ldm autoencoder trains ae.source=own only (diffusers is loaded as is)")
    ae_dir = Path(cfg.train.out_dir) / "autoencoder"
    check_resume(cfg.ae.train.resume, ae_dir / "checkpoints")
    train, test = _datasets(cfg)
    ds = torch.utils.data.ConcatDataset([_VAETiles(train), _VAETiles(test)])
    ds.classes, ds.environments = _VAETiles.classes, _VAETiles.environments
    split = DomainSplit(train=list(range(len(train))), val=list(range(len(train), len(ds))), test=[])
    return train_vae(_vae_config(cfg, ae_dir), data=(ds, split, None))


def load_codec(cfg: LDMConfig, out_dir: str | Path, device: torch.device | str = "cpu") -> Codec:
    """The autoencoder of ``cfg.ae`` (own: ``ae.path`` or ``out_dir/autoencoder``), in eval mode."""
    if cfg.ae.source == "diffusers":
        return diffusers_codec(cfg.ae.path, device)
    from dualdiff.experiments.vae import load_vae_model

    path = Path(cfg.ae.path) if cfg.ae.path else Path(out_dir) / "autoencoder"
    if not path.exists():
        raise CheckpointError(f"no autoencoder at {str(path)!r}: run `dualdiff ldm autoencoder` first "
                                f"or set ae.path")
    ae, vcfg = load_vae_model(path)
    if vcfg.model.arch != "conv_kl":
        raise ConfigError(f"ae.path {str(path)!r} holds a {vcfg.model.arch} model, not conv_kl")
    return own_codec(ae.to(device))


# ---------------------------------------------------------------------------------------
# encode, train


def _device(cfg: LDMConfig) -> torch.device:
    from dualdiff.train.distributed import default_device

    return default_device(cfg.train.device)


def encode_latents(cfg: LDMConfig, out_dir: str | Path | None = None, *, verbose: bool = True) -> dict[str, Path]:
    """Encode the train and test tiles once into ``<run folder>/latents_{train,test}.pt`` (scale
    from the train latents; ``out_dir`` None: ``train.out_dir``); prints the class counts.
    Returns the two paths."""
    from dualdiff.data.histology import describe_classes
    from dualdiff.data.latent_cache import LatentCache, encode_dataset, latent_scale

    cfg = apply_run_flags(cfg, out_dir, None, presets=LDM_PRESETS)
    out = Path(cfg.train.out_dir)
    device = _device(cfg)
    datasets = _datasets(cfg)  # data mistakes first: they need no autoencoder
    codec = load_codec(cfg, out, device)
    if codec.latent_channels != cfg.model.channels:
        raise ConfigError(f"the autoencoder has {codec.latent_channels} latent channels but model.channels="
                         f"{cfg.model.channels}")
    paths = {}
    scale = None
    for name, ds in zip(("train", "test"), datasets):
        z, d, m = encode_dataset(codec.encode, ds, batch_size=cfg.train.batch_size, device=device)
        if scale is None:
            scale = latent_scale(z, codec.scaling_factor, cfg.ae.scale)
        if verbose:
            print(f"{name}: {len(z)} tiles -> latents {tuple(z.shape[1:])}, scale {scale:.4g}")
            print(describe_classes(d, m))
        meta = {"split": name, "ae": codec.name, "image_size": cfg.data.image_size, "source": cfg.data.source}
        paths[name] = LatentCache(z, d, m, scale, meta).save(out / f"latents_{name}.pt")
    return paths


def _train_data(cfg: LDMConfig, cache):
    """The Trainer's data: a TensorDataset (uniform) or ``fn(index, generator)`` (class-balanced)."""
    z, d, m = cache.scaled, cache.dist, cache.has_mask
    if cfg.data.sampling == "uniform":
        return torch.utils.data.TensorDataset(z, d, m)
    from dualdiff.data.histology import balanced_indices

    def batch(index: int, g: torch.Generator):
        idx = balanced_indices(d, cfg.train.batch_size, cfg.data.balance_p, g)
        return z[idx], d[idx], m[idx]

    return batch


def build_trainer(cfg: LDMConfig, out_dir: str | Path | None = None, *, resume: bool | str | None = None,
                  cache=None, model: nn.Module | None = None) -> Trainer:
    """The Trainer of step 3 on ``cache`` (default: ``<run folder>/latents_train.pt``);
    ``out_dir`` / ``resume`` as in :mod:`dualdiff.experiments.run` (None: ``train.out_dir`` /
    ``train.resume``)."""
    from dualdiff.data.latent_cache import LatentCache

    if not isinstance(cfg, LDMConfig):
        raise TypeError(f"cfg must be an LDMConfig, got {type(cfg).__name__}")
    cfg = apply_run_flags(cfg, out_dir, resume, presets=LDM_PRESETS)
    out = Path(cfg.train.out_dir)
    check_resume(cfg.train.resume, out / "checkpoints")
    cache = cache if cache is not None else LatentCache.load(out / "latents_train.pt")
    if cache.latents.shape[1] != cfg.model.channels:
        raise ConfigError(f"the latent cache has {cache.latents.shape[1]} channels, model.channels="
                         f"{cfg.model.channels}")
    if model is None:
        with torch.random.fork_rng(devices=[]):  # initial weights depend on train.seed only
            torch.manual_seed(derive_seed(cfg.train.seed, "ldm-init"))
            model = ClassDistUNet(cfg.model)
    trainer = Trainer(model, LDMLoss(cfg), _train_data(cfg, cache), cfg.train, run_config=cfg)
    trainer.latent_scale = cache.scale
    return trainer


def train_ldm(cfg: LDMConfig, out_dir: str | Path | None = None, *,
              resume: bool | str | None = None) -> dict[str, Any]:
    """Train (step 3); writes ``<run folder>/{metrics.jsonl, checkpoints/, training.png}``
    (``out_dir`` / ``resume`` as in :func:`build_trainer`). Returns ``{"trainer", "history",
    "out_dir"}``."""
    from dualdiff.analysis.ldm_plots import plot_training

    trainer = build_trainer(cfg, out_dir, resume=resume)
    out_dir = trainer.out_dir
    try:
        trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        plot_training(trainer.history, Path(out_dir) / "training.png")
    return {"trainer": trainer, "history": trainer.history, "out_dir": Path(out_dir)}


def load_ldm(path: str | Path, *, ema: bool = True, map_location: Any = "cpu") -> tuple[nn.Module, LDMConfig]:
    """``(model in eval mode, config)`` from a checkpoint of :func:`train_ldm` (a file or a run
    folder: its newest checkpoint), EMA weights when present; ``torch.load(weights_only=True)``."""
    run = load_run(path, LDMConfig, writer="train_ldm", map_location=map_location)
    model = load_weights(ClassDistUNet(run.config.model), run, ema=ema)
    return model.eval(), run.config


# ---------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def sample_latents(model: nn.Module, dist: Tensor, cfg: LDMConfig, latent_shape: tuple[int, int, int], *,
                   cond_scale: float | None = None, rescaled_phi: float | None = None, null: Tensor | None = None,
                   generator: torch.Generator | None = None, batched: bool = True,
                   sampling_timesteps: int | None = None) -> Tensor:
    """DDIM samples ``[B, C, h, w]`` (scaled latent space) for the requested ``dist [B, K]``."""
    from dualdiff.diffusion import DDIMScheduler, ddim_sample
    from dualdiff.diffusion.samplers import lucidrains_timesteps

    device = dist.device
    sched = DDIMScheduler(_schedule(cfg)).to(device)
    ts = lucidrains_timesteps(sampling_timesteps or cfg.sampling_timesteps, cfg.timesteps).to(device)
    x_T = torch.randn((dist.shape[0], *latent_shape), generator=generator,
                      device=generator.device if generator is not None else device).to(device)
    fn = guided_model_fn(model, dist, cfg.cond_scale if cond_scale is None else cond_scale,
                         cfg.rescaled_phi if rescaled_phi is None else rescaled_phi,
                         remove_parallel=cfg.remove_parallel, keep_parallel_frac=cfg.keep_parallel_frac,
                         batched=batched, null=null)
    return ddim_sample(fn, x_T, ts, sched, eta=cfg.ddim_eta, prediction_type=cfg.objective,
                       clip_sample=False, generator=generator).sample


def balanced_requests(test_cache, n: int, p: float, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` requested distributions ``[n, K]`` drawn from the masked tiles of ``test_cache`` by
    the cutoff rule with uniform share ``p`` (``p = 0``: the seed's test cutoffs, fully
    class-balanced; :func:`dualdiff.data.histology.balanced_indices`), seeded; and their
    indices into the cache."""
    from dualdiff.data.histology import balanced_indices

    masked = torch.nonzero(test_cache.has_mask).flatten()
    if not len(masked):
        raise ConfigError("the test set has no masked tiles to take requested distributions from")
    g = torch.Generator().manual_seed(derive_seed(seed, "ldm-requests"))
    idx = masked[balanced_indices(test_cache.dist[masked], n, p, g)]
    return test_cache.dist[idx], idx


@torch.no_grad()
def guided_errors(model: nn.Module, decode: Callable[[Tensor], Tensor], dist: Tensor, cfg: LDMConfig,
                  latent_shape: tuple[int, int, int], settings: dict[str, tuple[float, float] | None],
                  seed: int) -> dict[str, dict[str, Tensor]]:
    """Per setting ``label -> (cond_scale, rescaled_phi)`` (None: unconditional, every row
    null), sample ``dist [B, K]`` with the same x_T and DDIM noise (common random numbers:
    ``seed``), decode (``decode(z) -> images in [0, 1]``) and return ``{label: {"cond_error":
    [B] TV distances, "latent_std": 0-d}}``."""
    out = {}
    null_all = torch.ones(len(dist), dtype=torch.bool)
    for label, setting in settings.items():
        g = torch.Generator().manual_seed(derive_seed(seed, "ldm-guided-errors"))
        scale, phi = (1.0, 0.0) if setting is None else setting
        z = sample_latents(model, dist, cfg, latent_shape, cond_scale=scale, rescaled_phi=phi,
                           null=null_all if setting is None else None, generator=g)
        images = decode(z).float().cpu()
        out[label] = {"cond_error": conditioning_error(dist.cpu(), images, cfg.data.num_classes),
                      "latent_std": z.float().std().cpu()}
    return out


def _latent_shape(cfg: LDMConfig, cache) -> tuple[int, int, int]:
    return tuple(cache.latents.shape[1:])


def _requests(test_cache, n: int) -> tuple[Tensor, list[int]]:
    """``n`` requested distributions: the masked test tiles spread over the test set."""
    idx = torch.nonzero(test_cache.has_mask).flatten().tolist()
    if not idx:
        raise ConfigError("the test set has no masked tiles to take requested distributions from")
    pick = [idx[round(i * (len(idx) - 1) / max(n - 1, 1))] for i in range(min(n, len(idx)))]
    return test_cache.dist[pick], pick


#: what ``sample`` / ``eval`` may change in a run's stored config: sampling and evaluation keys,
#: the seed and device, and where the data and autoencoder are now. The rest made the run (the
#: model, its diffusion and objective, the autoencoder that made the latents, the test split) or
#: only acts in training (loss weighting, cond_drop_prob).
SAMPLE_KEYS = ("sampling_timesteps", "ddim_eta", "cond_scale", "rescaled_phi", "remove_parallel",
               "keep_parallel_frac", "num_samples", "eval_cond_scales", "eval_rescaled_phis",
               "eval_requests", "eval_samples", "eval_loss_batches", "train.seed", "train.device",
               "train.out_dir", "data.path", "data.verify", "data.skip_bad", "ae.path")


def _load_run(out: Path, overrides: list[str] | None, device: str | None,
              config: LDMConfig | None = None) -> tuple[nn.Module, LDMConfig]:
    """The trained model (EMA) and its config (or ``config``, the stored one with the CLI's
    options applied) with ``key=value`` overrides (e.g. cond_scale=6); a change to a key outside
    :data:`SAMPLE_KEYS` is a ConfigError."""
    from dualdiff.config import apply_overrides, refuse_changes

    model, stored = load_ldm(out)
    cfg = stored if config is None else config
    ov = list(overrides or []) + ([f"train.device={device}"] if device else [])
    if ov:
        cfg = apply_overrides(cfg, ov)
    refuse_changes(stored, cfg, SAMPLE_KEYS, "sample / eval use the trained run as it was made")
    return model.to(_device(cfg)), cfg


def sample_ldm(out_dir: str | Path, overrides: list[str] | None = None, *,
               device: str | None = None, config: LDMConfig | None = None) -> dict[str, Any]:
    """Sample ``num_samples`` tiles for each of ``eval_requests`` test distributions at
    ``cond_scale`` / ``rescaled_phi``; writes ``out_dir/samples/grid.png`` and
    ``samples/samples.pt`` (images, requested and measured distributions)."""
    from dualdiff.analysis.ldm_plots import save_sample_grid
    from dualdiff.data.histology import StainRule, class_distribution
    from dualdiff.data.latent_cache import LatentCache

    out = Path(out_dir)
    model, cfg = _load_run(out, overrides, device, config)
    device = _device(cfg)
    codec = load_codec(cfg, out, device)
    test = LatentCache.load(out / "latents_test.pt")
    req, _ = _requests(test, cfg.eval_requests)
    dist = req.repeat_interleave(cfg.num_samples, 0).to(device)
    g = torch.Generator(device="cpu").manual_seed(derive_seed(cfg.train.seed, "ldm-sample"))
    z = sample_latents(model, dist, cfg, _latent_shape(cfg, test), generator=g)
    images = codec.decode(z / test.scale).cpu()
    measured = class_distribution(StainRule()(images), cfg.data.num_classes)
    k = req.shape[0]
    grid = save_sample_grid(images.reshape(k, cfg.num_samples, *images.shape[1:]), req,
                            out / "samples" / "grid.png",
                            title=f"cond_scale {cfg.cond_scale:g}, rescaled_phi {cfg.rescaled_phi:g}")
    torch.save({"images": images, "requested": dist.cpu(), "measured": measured}, out / "samples" / "samples.pt")
    return {"grid": grid, "images": images, "requested": dist.cpu(), "measured": measured}


# ---------------------------------------------------------------------------------------
# evaluation


def conditioning_error(requested: Tensor, images: Tensor, num_classes: int) -> Tensor:
    """Per sample total-variation distance ``0.5 · Σ_k |d̂_k - d_k|`` [B] between the requested
    distributions [B, K] and the stain-rule distributions of ``images`` [B, 3, S, S] in [0, 1]."""
    from dualdiff.data.histology import StainRule, class_distribution

    measured = class_distribution(StainRule()(images.float()), num_classes)
    return 0.5 * (measured - requested.to(measured)).abs().sum(1)


def _features(codec: Codec, images: Tensor, batch: int = 64) -> Tensor:
    """Autoencoder-encoder features: the posterior mean pooled to 4x4, flattened -> [N, C·16]."""
    out = []
    for i in range(0, len(images), batch):
        z = codec.encode(images[i:i + batch])
        out.append(F.adaptive_avg_pool2d(z.float(), 4).flatten(1).cpu())
    return torch.cat(out).double()


def _frechet(a: Tensor, b: Tensor) -> float:
    from dualdiff.ops import frechet_distance

    return float(frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))


@torch.no_grad()
def loss_per_quartile(model: nn.Module, cfg: LDMConfig, cache, *, batches: int = 4, batch_size: int = 64,
                      seed: int = 0, device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Unweighted MSE of the model's prediction, converted to each objective
    (``convert_prediction``), against that objective's target, per t quartile (conditional
    inputs) -> ``{objective: [q1, q2, q3, q4]}`` (q1 = the lowest t)."""
    from dualdiff.diffusion import OBJECTIVES, convert_prediction, q_sample, training_target

    sched = _schedule(cfg).to(device)
    g = torch.Generator().manual_seed(seed)
    T = cfg.timesteps
    sums = {o: torch.zeros(4, dtype=torch.float64) for o in OBJECTIVES}
    counts = torch.zeros(4, dtype=torch.float64)
    z_all = cache.scaled
    for _ in range(batches):
        idx = torch.randint(0, len(cache), (batch_size,), generator=g)
        z0, dist, has_mask = z_all[idx].to(device), cache.dist[idx].to(device), cache.has_mask[idx].to(device)
        t = torch.randint(0, T, (batch_size,), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        z_t = q_sample(z0, t, noise, sched)
        out = model(z_t, t, dist, ~has_mask)
        q = (t * 4 // T).cpu()
        counts += torch.bincount(q, minlength=4).double()
        for o in OBJECTIVES:
            pred = convert_prediction(out, cfg.objective, o, z_t, t, sched)
            err = (pred.float() - training_target(o, z0, t, noise, sched).float()).pow(2).flatten(1).mean(1).cpu()
            sums[o] += torch.zeros(4, dtype=torch.float64).index_add_(0, q, err.double())
    return {o: (sums[o] / counts.clamp_min(1)).tolist() for o in OBJECTIVES}


def evaluate_ldm(out_dir: str | Path, overrides: list[str] | None = None, *, device: str | None = None,
                 config: LDMConfig | None = None, verbose: bool = True,
                 return_images: bool = False) -> dict[str, Any]:
    """Step 5 on the run in ``out_dir`` (EMA weights); writes ``eval.json`` and a sample grid
    per cond_scale (``eval_grids/``). Returns the metrics (with ``return_images``, also
    ``"images": {"unconditional" | "<scale>/<phi>": [R, n, 3, S, S]}``, not written)."""
    from dualdiff.analysis.ldm_plots import save_sample_grid
    from dualdiff.data.latent_cache import LatentCache

    out = Path(out_dir)
    model, cfg = _load_run(out, overrides, device, config)
    device = _device(cfg)
    codec = load_codec(cfg, out, device)
    test = LatentCache.load(out / "latents_test.pt")
    req, pick = _requests(test, cfg.eval_requests)
    n = cfg.eval_samples
    dist = req.repeat_interleave(n, 0).to(device)
    shape = _latent_shape(cfg, test)
    seed = derive_seed(cfg.train.seed, "ldm-eval")
    K = cfg.data.num_classes

    per_sample: dict[str, list[float]] = {}
    kept: dict[str, Tensor] = {}

    def run(scale: float, phi: float, null: Tensor | None = None) -> tuple[Tensor, float, float]:
        g = torch.Generator().manual_seed(seed)  # the same x_T and noise for every setting
        z = sample_latents(model, dist, cfg, shape, cond_scale=scale, rescaled_phi=phi, null=null, generator=g)
        images = codec.decode(z / test.scale).float().cpu()
        errs = conditioning_error(dist.cpu(), images, K)
        label = "unconditional" if null is not None else f"{scale:g}/{phi:g}"
        per_sample[label] = errs.tolist()
        if return_images:
            kept[label] = images.reshape(len(req), n, *images.shape[1:])
        return images, float(errs.mean()), float(z.float().std())

    rows = []
    uncond_images, uncond_err, _ = run(1.0, 0.0, null=torch.ones(len(dist), dtype=torch.bool))
    ae_err = float(conditioning_error(req, codec.decode(test.latents[pick].to(device)).float().cpu(), K).mean())
    main_images = None
    for scale in cfg.eval_cond_scales:
        for phi in cfg.eval_rescaled_phis:
            images, err, z_std = run(scale, phi)
            rows.append({"cond_scale": scale, "rescaled_phi": phi, "cond_error": err, "latent_std": z_std})
            if verbose:
                print(f"cond_scale {scale:g} rescaled_phi {phi:g}: conditioning error {err:.4f}")
            if phi == cfg.eval_rescaled_phis[-1]:
                save_sample_grid(images.reshape(len(req), n, *images.shape[1:]), req,
                                 out / "eval_grids" / f"cond_scale_{scale:g}.png",
                                 title=f"cond_scale {scale:g}, rescaled_phi {phi:g}")
            if main_images is None or (scale == cfg.cond_scale and phi == cfg.rescaled_phi):
                main_images = images
    all_test = torch.stack(list(_test_images(cfg, list(range(len(test))))))
    real_feats = _features(codec, all_test.to(device))
    fd = _frechet(real_feats, _features(codec, main_images.to(device)))
    fd_uncond = _frechet(real_feats, _features(codec, uncond_images.to(device)))
    quart = loss_per_quartile(model, cfg, test, batches=cfg.eval_loss_batches, device=device, seed=seed)
    metrics = {"cond_error": rows, "cond_error_unconditional": uncond_err, "cond_error_ae_roundtrip": ae_err,
               "cond_error_per_sample": per_sample,  # "unconditional" | "<cond_scale>/<rescaled_phi>"
               "frechet_ae_features": fd, "frechet_ae_features_unconditional": fd_uncond,
               "loss_per_t_quartile": quart, "objective": cfg.objective, "requests": req.tolist(),
               "samples_per_request": n, "data_latent_std": float(test.scaled.std()), "real_test_tiles": len(all_test), "sampling_timesteps": cfg.sampling_timesteps}
    if verbose:
        print(f"unconditional: {uncond_err:.4f}; autoencoder round trip: {ae_err:.4f}; Fréchet (AE features) "
              f"{fd:.4g} (unconditional {fd_uncond:.4g})")
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return {**metrics, "images": kept} if return_images else metrics


def _test_images(cfg: LDMConfig, indices: list[int]):
    _, test = _datasets(cfg)
    for i in indices:
        yield test[i]["image"]


# ---------------------------------------------------------------------------------------
# plots, demo


def plot_ldm(out_dir: str | Path) -> list[Path]:
    """Redraw the figures of a run: training.png (loss, LR), loss_quartiles.png and
    cond_error.png (from eval.json). Returns the files written."""
    from dualdiff.analysis.ldm_plots import plot_cond_error, plot_loss_quartiles, plot_training
    from dualdiff.train import read_jsonl

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"--out-dir: no such folder: {str(out)!r}")
    written = []
    if (out / "metrics.jsonl").is_file():
        written.append(plot_training(read_jsonl(out / "metrics.jsonl"), out / "training.png"))
    if (out / "eval.json").is_file():
        ev = json.loads((out / "eval.json").read_text())
        written.append(plot_loss_quartiles(ev["loss_per_t_quartile"], out / "loss_quartiles.png"))
        written.append(plot_cond_error(ev, out / "cond_error.png"))
    if not written:
        raise FileNotFoundError(f"{str(out)!r} holds no ldm run (metrics.jsonl or eval.json)")
    return written


def demo_ldm(out_dir: str | Path | None = None, cfg: LDMConfig | None = None) -> dict[str, Any]:
    """The ``demo`` preset (tiny, ``runs/ldm-demo``) end to end on the CPU: autoencoder, encode,
    train, sample, eval, plot (``out_dir`` None: ``train.out_dir``)."""
    import time

    cfg = apply_run_flags(cfg or LDMConfig.from_name("demo"), out_dir, None, presets=LDM_PRESETS)
    out = Path(cfg.train.out_dir)
    times = {}
    t0 = time.perf_counter()
    train_autoencoder(cfg)
    times["autoencoder_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    encode_latents(cfg)
    times["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = train_ldm(cfg)
    times["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample_ldm(out)
    metrics = evaluate_ldm(out, return_images=True)
    images = metrics.pop("images")
    times["sample_eval_s"] = time.perf_counter() - t0
    files = plot_ldm(out)
    report = demo_report(metrics, cfg)
    files.append(_demo_figure(metrics, images, report, cfg, out / "demo.png"))
    (out / "demo.md").write_text(report["markdown"])
    files.append(out / "demo.md")
    print(report["markdown"])
    hist = res["history"]
    summary = {"times": times, "first_loss": hist[0]["loss"], "last_loss": hist[-1]["loss"], "eval": metrics,
               "differences": report["differences"], "headline": report["headline"],
               "files": [str(f) for f in files]}
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def demo_report(metrics: dict[str, Any], cfg: LDMConfig) -> dict[str, Any]:
    """The demo's answer from ``eval.json``'s per-sample conditioning errors: each guidance
    setting against unconditional sampling, rescaled_phi against 0 at each scale, and each scale
    against the next lower one, as paired differences over the samples (same x_T and noise) with
    95 % Student-t intervals, each called *outside noise* or *within noise*. Returns
    ``{"headline", "differences", "markdown"}``."""
    from dualdiff.study import paired_interval

    ps = {k: dict(enumerate(v)) for k, v in metrics["cond_error_per_sample"].items()}
    scales = sorted({r["cond_scale"] for r in metrics["cond_error"]})
    phis = sorted({r["rescaled_phi"] for r in metrics["cond_error"]})
    pairs = [(f"{s:g}/{p:g}", "unconditional") for s in scales for p in phis]
    pairs += [(f"{s:g}/{p:g}", f"{s:g}/0") for s in scales for p in phis if p != 0 and 0 in phis and s != 1]
    pairs += [(f"{b:g}/{p:g}", f"{a:g}/{p:g}") for a, b in zip(scales, scales[1:]) for p in phis]
    diffs = []
    for a, b in pairs:
        if a not in ps or b not in ps:
            continue
        iv = paired_interval(ps[a], ps[b])
        diffs.append({"setting": a, "baseline": b, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n,
                      "outside_noise": bool(iv.excludes_zero())})
    main = f"{cfg.cond_scale:g}/{cfg.rescaled_phi:g}"
    if main not in ps:
        main = f"{scales[-1]:g}/{phis[0]:g}"
    head = next(d for d in diffs if d["setting"] == main and d["baseline"] == "unconditional")
    mean = lambda k: sum(ps[k].values()) / len(ps[k])  # noqa: E731
    headline = (f"conditioning error (TV) {mean('unconditional'):.2f} unconditional -> {mean(main):.2f} at "
                f"cond_scale {main.replace('/', ', phi ')} ({head['mean']:+.2f} [{head['low']:+.2f}, "
                f"{head['high']:+.2f}], n={head['n']})")
    L = ["# ldm demo: does guidance on the class distribution steer generation?", "", headline + ".", "",
         f"Conditioning error = total-variation distance between the requested class distribution and the "
         f"stain-rule distribution of the decoded sample ({metrics['samples_per_request']} samples for each of "
         f"{len(metrics['requests'])} requests, the same x_T and noise for every setting). Autoencoder round "
         f"trip (the measurement's floor): {metrics['cond_error_ae_roundtrip']:.3f}.", "",
         "| setting | vs | difference, mean [95 % CI] (n) | |", "|---|---|---|---|"]
    for d in diffs:
        verdict = "**outside noise**" if d["outside_noise"] else "within noise"
        L.append(f"| {d['setting']} | {d['baseline']} | {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                 f"({d['n']}) | {verdict} |")
    within = [f"{d['setting']} vs {d['baseline']}" for d in diffs if not d["outside_noise"]]
    L += ["", "Settings are `cond_scale/rescaled_phi`. Within noise (the 95 % interval contains 0): "
          + (", ".join(within) if within else "none") + ".",
          "", "The intervals are over the samples of one trained model: they cover sampling noise only, and "
          "samples of one request are not independent. Training noise (other seeds) is what "
          "`dualdiff ldm study` measures.", "", "![demo](demo.png)", ""]
    return {"headline": headline, "differences": diffs, "markdown": "\n".join(L)}


def _demo_figure(metrics: dict[str, Any], images: dict[str, Tensor], report: dict[str, Any], cfg: LDMConfig,
                 path: Path) -> Path:
    """demo.png: requested distribution beside one sample per guidance scale (rescaled_phi of
    the config when evaluated, else 0), the headline in the title."""
    from dualdiff.analysis.ldm_plots import plot_demo
    from dualdiff.data.histology import CLASS_NAMES

    phis = sorted({r["rescaled_phi"] for r in metrics["cond_error"]})
    phi = cfg.rescaled_phi if cfg.rescaled_phi in phis else phis[0]
    labels = ["unconditional"] + [f"{r['cond_scale']:g}/{phi:g}" for r in metrics["cond_error"]
                                  if r["rescaled_phi"] == phi]
    n = metrics["samples_per_request"]
    req = torch.tensor(metrics["requests"])
    errs = {lab: metrics["cond_error_per_sample"][lab][::n] for lab in labels}
    shown = {("unconditional" if lab == "unconditional" else "cond_scale " + lab.replace("/", ", phi ")):
             images[lab][:, 0] for lab in labels}
    errs = {new: errs[old] for new, old in zip(shown, labels)}
    return plot_demo(req, shown, errs, path, title=report["headline"], class_names=CLASS_NAMES)
