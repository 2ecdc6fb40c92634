"""Exponential moving average of model weights.

Two schedules decide when the average moves; ``t`` is the 1-based training step passed to
:meth:`EMA.update` (the Trainer calls it after every step, skipped ones included).

dualdiff's (``update_after_step=None``, the default): while ``t <= warmup_steps`` the
average tracks the weights (``ema = w``); after that every step with ``t % update_every
== 0`` applies

    ema <- d * ema + (1 - d) * w

to every floating-point parameter, ``s = t - warmup_steps`` steps after the warm-up.

lucidrains/ema-pytorch's (``update_after_step`` an int): its step counter is ``c = t - 1``
(the number of earlier ``update`` calls); only calls with ``c % update_every == 0`` do
anything; while ``c <= update_after_step`` they copy the weights; after that they average
with ``s = c - update_after_step`` (so ``s >= 1``).

The decay ``d`` is ``decay`` (constant, ``power=None``), or with ``power`` set the ramp of
ema-pytorch (after @crowsonkb)

    d(s) = min(decay, max(min_decay, 1 - (1 + s / inv_gamma) ** -power))

(ema-pytorch's defaults: update_after_step=100, update_every=10, inv_gamma=1, power=2/3,
min_value=0). With ``update_after_step`` and ``power`` set this is ema-pytorch's schedule
exactly; the differences from ``ema_pytorch.EMA`` are: (1) buffers (e.g. BatchNorm
statistics) and integer tensors are copied from the model on every call, not averaged;
(2) the average is ``torch.lerp(ema, w, 1 - d)`` rather than ``ema - (ema - w) * (1 - d)``
(equal up to float rounding); (3) a step skipped by the Trainer's non-finite guard (the
``gate``) leaves the average unchanged but still advances the step count; (4) the step
comes from the caller (restored from checkpoints with the Trainer's step) instead of an
internal counter buffer.

With constant ``decay`` the average after updates with weights w_1..w_n starting from
ema_0 is ``decay**n * ema_0 + (1-decay) * sum_k decay**(n-k) w_k``.
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
                 warmup_steps: int = 0, *, update_after_step: int | None = None,
                 inv_gamma: float = 1.0, power: float | None = None, min_decay: float = 0.0):
        if update_after_step is not None:
            if update_after_step < 0:
                raise ValueError(f"ema update_after_step must be >= 0, got {update_after_step}")
            if warmup_steps:
                raise ValueError("ema warmup_steps and update_after_step are alternatives: "
                                 "set one")
        if not inv_gamma > 0:
            raise ValueError(f"ema inv_gamma must be > 0, got {inv_gamma}")
        if power is not None and not power > 0:
            raise ValueError(f"ema power must be > 0 or None, got {power}")
        if not 0.0 <= min_decay <= 1.0:
            raise ValueError(f"ema min_decay must be in [0, 1], got {min_decay}")
        self.update_after_step = None if update_after_step is None else int(update_after_step)
        self.inv_gamma = float(inv_gamma)
        self.power = None if power is None else float(power)
        self.min_decay = float(min_decay)
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

    def decay_at(self, s: int) -> float:
        """The decay of an average ``s >= 1`` steps after the copy phase (see the module
        docstring): ``decay``, or the ramp when ``power`` is set."""
        if self.power is None:
            return self.decay
        value = 1.0 - (1.0 + s / self.inv_gamma) ** -self.power
        return min(self.decay, max(self.min_decay, value))

    def plan(self, step: int) -> tuple[str, float | None]:
        """What :meth:`update` does at training step ``step`` (1-based): ``("skip", None)``,
        ``("copy", None)`` or ``("average", decay)``."""
        if self.update_after_step is None:
            if step <= self.warmup_steps:
                return "copy", None
            if step % self.update_every != 0:
                return "skip", None
            return "average", self.decay_at(step - self.warmup_steps)
        c = step - 1
        if c % self.update_every != 0:
            return "skip", None
        if c <= self.update_after_step:
            return "copy", None
        return "average", self.decay_at(c - self.update_after_step)

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
        action, decay = self.plan(step)
        if action == "skip":
            return False
        warm = action == "copy"
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
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)
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
                "update_after_step": self.update_after_step, "inv_gamma": self.inv_gamma,
                "power": self.power, "min_decay": self.min_decay,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state.get("num_updates", 0))
