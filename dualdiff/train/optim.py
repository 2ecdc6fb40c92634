"""Optimizer, LR schedule and mixed-precision choices of a :class:`TrainConfig`."""
from __future__ import annotations

import math

import torch

from dualdiff.train.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "resolve_amp", "WarmupDecay",
           "supports_found_inf"]

# torch.optim classes whose fused kernels take GradScaler's found_inf flag and then leave
# params and state (step counts included) untouched; fused SGD is left out: it leaves its
# momentum buffers uninitialised when its very first step is skipped
_FUSED_BY_DEFAULT = ("adam", "adamw")


def _optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    return {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.<cfg.optimizer>(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
    **cfg.optimizer_kwargs)``; adam/adamw get ``fused=True`` when the kwargs set neither
    ``fused`` nor ``foreach`` and every parameter is a floating CPU/CUDA tensor."""
    classes = _optimizer_classes()
    key = cfg.optimizer.lower()
    if key not in classes:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of "
                         f"{', '.join(sorted(classes))} or pass optimizer=")
    params = list(params)
    kwargs = {"lr": cfg.lr, **cfg.optimizer_kwargs}
    if cfg.weight_decay:
        kwargs["weight_decay"] = cfg.weight_decay
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if (key in _FUSED_BY_DEFAULT and "fused" not in kwargs and "foreach" not in kwargs
            and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)):
        kwargs["fused"] = True
    return classes[key](params, **kwargs)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step()`` honours a ``found_inf`` attribute (GradScaler's
    contract, e.g. fused Adam/AdamW/SGD): a step can then be skipped on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class WarmupDecay:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant / cosine / linear
    decay to ``min_ratio`` at ``total`` steps (``min_ratio = min_lr / lr``):

        lr(s) = lr * (min_ratio + (1 - min_ratio) * shape(p)),  p = (s - warmup) / (total - warmup)

    with ``shape = (1 + cos(pi p)) / 2`` (cosine) or ``1 - p`` (linear). Only primitive
    attributes, so LambdaLR's state dict stays loadable with weights_only=True."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        p = min(max((step - self.warmup) / max(1, self.total - self.warmup), 0.0), 1.0)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            shape = 1.0 - p
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """The LR scheduler of ``cfg.scheduler`` (None for 'none'); stepped once per optimizer
    step, skipped steps included."""
    s = cfg.scheduler
    kw = dict(cfg.scheduler_kwargs)
    if s == "none":
        return None
    if s in ("constant", "cosine", "linear"):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(s, cfg.warmup_steps, cfg.steps, cfg.min_lr / cfg.lr))
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                   total_steps=cfg.steps, **kw)
    if s == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, **kw)
    if s == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, **kw)
    raise ValueError(f"unknown scheduler {s!r}")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None = full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"amp must be auto|bf16|fp16|off, got {amp!r}")
