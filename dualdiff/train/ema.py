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


def _select(gate: torch.Tensor, on: list[torch.Tensor],
            off: list[torch.Tensor]) -> list[torch.Tensor]:
    """``on[i] if gate else off[i]`` for every i, on the device and exact for finite values
    (``x * 1 + y * 0 == x``), in a few foreach launches instead of one ``where`` per tensor."""
    if not all(t.is_floating_point() for t in on):
        return [torch.where(gate, a, b) for a, b in zip(on, off)]
    g = gate.to(torch.float32)
    out = torch._foreach_mul(on, g)
    torch._foreach_add_(out, torch._foreach_mul(off, 1.0 - g))
    return out


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
    def update(self, model: nn.Module, step: int, gate: torch.Tensor | None = None) -> bool:
        """Call after the optimizer step that made the weights of training step ``step``
        (1-based). Returns True when the average was (or, with ``gate``, may have been)
        updated.

        ``gate``: an optional 0-d bool tensor on the weights' device; where it is False the
        parameter average is left exactly as it was (the Trainer passes its device-side
        "this step was applied" flag, so a skipped step is not absorbed, without a host sync).
        """
        params, buffers = self._pairs(model)
        for e, b in buffers:
            e.copy_(b)
        warm = step <= self.warmup_steps
        if not warm and step % self.update_every != 0:
            return False
        es = [e for e, _ in params]
        ps = [p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype) for e, p in params]
        if gate is not None:
            ps = _select(gate, ps, es)
        if warm:
            torch._foreach_copy_(es, ps)
            return True
        floats = [(e, p) for e, p in zip(es, ps) if e.is_floating_point()]
        for e, p in zip(es, ps):
            if not e.is_floating_point():
                e.copy_(p)
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - self.decay)
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
