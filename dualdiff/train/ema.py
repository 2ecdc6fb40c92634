"""Exponential moving average of model weights.

After a warm-up of ``warmup_steps`` training steps during which the average simply tracks
the weights (``ema = w``), every ``update_every``-th step applies

    ema <- decay * ema + (1 - decay) * w

to every floating-point parameter; buffers (e.g. BatchNorm statistics) and integer
tensors are copied. With constant ``decay`` the average after updates with weights
w_1..w_n starting from ema_0 is ``decay**n * ema_0 + (1-decay) * sum_k decay**(n-k) w_k``.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


class EMA:
    """EMA copy of a model: ``ema.model`` is a frozen module usable for eval and sampling."""

    def __init__(self, model: nn.Module, decay: float = 0.999, update_every: int = 1,
                 warmup_steps: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"ema update_every must be >= 1, got {update_every}")
        if warmup_steps < 0:
            raise ValueError(f"ema warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.warmup_steps = int(warmup_steps)
        self.num_updates = 0
        src = unwrap_model(model)
        self.model = copy.deepcopy(src).eval()
        self.model.requires_grad_(False)

    def _pairs(self, model: nn.Module):
        src = unwrap_model(model)
        ema_p = dict(self.model.named_parameters())
        ema_b = dict(self.model.named_buffers())
        params = [(ema_p[n], p) for n, p in src.named_parameters()]
        buffers = [(ema_b[n], b) for n, b in src.named_buffers()]
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Call after the optimizer step that made the weights of training step ``step``
        (1-based). Returns True when the average changed."""
        params, buffers = self._pairs(model)
        for e, b in buffers:
            e.copy_(b)
        if step <= self.warmup_steps:
            for e, p in params:
                e.copy_(p.detach())
            return True
        if step % self.update_every != 0:
            return False
        float_pairs = [(e, p.detach()) for e, p in params if e.is_floating_point()]
        for e, p in params:
            if not e.is_floating_point():
                e.copy_(p)
        if float_pairs:
            es = [e for e, _ in float_pairs]
            ps = [p.to(e.dtype) for e, p in float_pairs]
            torch._foreach_lerp_(es, ps, 1.0 - self.decay)
        self.num_updates += 1
        return True

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (restored on exit)."""
        src = unwrap_model(model)
        backup = {k: v.detach().clone() for k, v in src.state_dict().items()}
        src.load_state_dict(self.model.state_dict())
        try:
            yield model
        finally:
            src.load_state_dict(backup)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay,
                "update_every": self.update_every, "warmup_steps": self.warmup_steps,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state.get("num_updates", 0))
