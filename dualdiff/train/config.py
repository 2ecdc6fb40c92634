"""The training loop's configuration (:class:`TrainConfig`) and its stop error."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from dualdiff.config import ConfigError

__all__ = ["TrainConfig", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Raised at a log step when the last ``max_consecutive_nonfinite`` steps or more were all
    skipped because the loss or the gradient norm was non-finite."""


# keys of optimizer_kwargs / scheduler_kwargs that a TrainConfig field already sets
_OPTIMIZER_KEYS = {"lr": "lr", "weight_decay": "weight_decay"}
_ONECYCLE_KEYS = {"max_lr": "lr", "total_steps": "steps"}


@dataclass
class TrainConfig:
    """Everything the loop needs; load/override with :mod:`dualdiff.config`.

    Sizes: ``batch_size`` samples per process per micro-batch; ``grad_accum`` micro-batches
    per optimizer step; ``steps`` optimizer steps in total (skipped steps count).
    ``validate()`` (run on construction) only checks; nothing rewrites a field.
    """
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    # optimizer: any torch.optim class by (case-insensitive) name, e.g. adamw, adam, sgd.
    # adam/adamw run fused unless optimizer_kwargs sets fused or foreach: the non-finite
    # guard then skips steps on the device (optimizer_kwargs={fused: false} reads the guard
    # flag on the host every step instead)
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)  # may not repeat lr/weight_decay
    # scheduler: none | constant | cosine | linear (these three with warmup_steps; cosine and
    # linear decay from lr to min_lr at `steps`) | onecycle (max_lr=lr, total_steps=steps,
    # kwargs e.g. pct_start) | step (StepLR kwargs) | exponential (ExponentialLR kwargs)
    scheduler: Literal["none", "constant", "cosine", "linear", "onecycle", "step",
                       "exponential"] = "none"
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    min_lr: float = 0.0  # absolute final LR of cosine / linear decay, 0 <= min_lr <= lr
    grad_clip: float | None = None  # max global L2 norm; None or 0 = no clipping
    # (a model defining clip_grad_norm_(max_norm) -> scalar norm tensor clips itself instead,
    # e.g. dualdiff.models.StackedModels clips each stacked member separately)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = False
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    # EMA: None disables it; else ema <- decay*ema + (1-decay)*w every ema_every steps after
    # ema_warmup steps during which ema = w
    ema_decay: float | None = None
    ema_every: int = 1
    ema_warmup: int = 0
    # ema-pytorch (lucidrains) semantics, see dualdiff.train.ema: ema_update_after_step set
    # (an int >= 0) = count steps from 0, act only every ema_every-th, copy the weights up to
    # update_after_step, average after (replaces ema_warmup, which must then be 0); ema_power
    # set = decay ramp min(ema_decay, max(ema_min_decay, 1 - (1 + s/ema_inv_gamma)^-ema_power))
    # at s steps after the copy phase. The defaults (None, None) keep the constant decay
    # above. ema-pytorch's own defaults: update_after_step=100, inv_gamma=1, power=2/3,
    # min_decay=0, every=10
    ema_update_after_step: int | None = None
    ema_inv_gamma: float = 1.0
    ema_power: float | None = None
    ema_min_decay: float = 0.0
    # checkpoints under out_dir/checkpoints: every checkpoint_every steps (0 = never
    # periodically) and at the end of fit() when save_final; keep the newest keep_last (0 = all)
    out_dir: str = "runs/train"
    checkpoint_every: int = 0
    keep_last: int = 3
    save_final: bool = True
    # resume: None (fresh start) | 'auto' (latest if any, else fresh) | 'latest' (must
    # exist) | a checkpoint file path
    resume: str | None = None
    # values are read back from the device only every log_every steps (and at the end)
    log_every: int = 1
    eval_every: int = 0
    # stop when this many steps in a row were non-finite (checked at log steps; 0 = never)
    max_consecutive_nonfinite: int = 10
    debug: bool = False
    debug_batches: int = 2
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    num_workers: int = 0
    shuffle: bool = True
    progress: bool = True
    log_grad_norm: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_kwargs: dict[str, Any] = field(default_factory=dict)
    ddp_find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`dualdiff.config.ConfigError` (a ValueError) naming the bad key(s)."""
        for name in ("steps", "batch_size", "grad_accum", "ema_every", "log_every",
                     "debug_batches"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "keep_last", "eval_every",
                     "max_consecutive_nonfinite", "num_workers", "ema_warmup"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive finite float, got {self.lr}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 or None, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1] or None, got {self.ema_decay}")
        if self.ema_update_after_step is not None:
            if not self.ema_update_after_step >= 0:
                raise ConfigError(f"ema_update_after_step must be >= 0 or None, got "
                                  f"{self.ema_update_after_step}")
            if self.ema_warmup:
                raise ConfigError("ema_warmup and ema_update_after_step both set: "
                                  "ema_update_after_step replaces ema_warmup (set it to 0)")
        if not (self.ema_inv_gamma > 0 and math.isfinite(self.ema_inv_gamma)):
            raise ConfigError(f"ema_inv_gamma must be a positive finite float, got "
                              f"{self.ema_inv_gamma}")
        if self.ema_power is not None and not (self.ema_power > 0
                                               and math.isfinite(self.ema_power)):
            raise ConfigError(f"ema_power must be a positive finite float or None, got "
                              f"{self.ema_power}")
        if not 0.0 <= self.ema_min_decay <= 1.0:
            raise ConfigError(f"ema_min_decay must be in [0, 1], got {self.ema_min_decay}")
        for key, owner in _OPTIMIZER_KEYS.items():
            if key in self.optimizer_kwargs:
                raise ConfigError(f"optimizer_kwargs.{key} conflicts with {owner}: set {owner} "
                                  f"only")
        if self.scheduler == "onecycle":
            for key, owner in _ONECYCLE_KEYS.items():
                if key in self.scheduler_kwargs:
                    raise ConfigError(f"scheduler_kwargs.{key} conflicts with {owner} (onecycle "
                                      f"uses {key}={owner}): set {owner} only")
        if self.scheduler == "step" and "step_size" not in self.scheduler_kwargs:
            raise ConfigError("scheduler 'step' needs scheduler_kwargs.step_size")
        if self.scheduler == "exponential" and "gamma" not in self.scheduler_kwargs:
            raise ConfigError("scheduler 'exponential' needs scheduler_kwargs.gamma")
