"""DDIM (Song et al. 2021) with per-sample timesteps.

One step from t to t_prev (per sample; ᾱ_prev = final_alpha_cumprod where t_prev < 0):

    x0   = prediction converted to x0 (eps / sample / v), optionally clipped to ±clip_range
    eps  = the matching noise prediction (from the *unclipped* x0 unless use_clipped_model_output)
    σ    = eta · sqrt((1-ᾱ_prev)/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_prev))
    x_prev = sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev - σ²) eps + σ z

This is diffusers' ``DDIMScheduler.step`` except that t_prev is given explicitly per sample
(diffusers derives t - T//N whatever the spacing), so each scale of a dual-scale model can
follow its own timestep sequence; t_prev == t is allowed (that sample stays where it is).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from dualdiff.diffusion.objectives import normalize_objective
from dualdiff.diffusion.schedules import (
    NoiseSchedule,
    _check_timesteps,
    _compute_dtype,
    _gather,
    _is_compiling,
    make_schedule,
)

__all__ = ["DDIMScheduler", "DDIMStepOutput", "SPACINGS", "ddim_timesteps", "previous_timesteps"]

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class DDIMStepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def ddim_timesteps(
    num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending int64 timesteps, exactly as diffusers' ``DDIMScheduler.set_timesteps``.

    * ``leading``:  ``arange(N) * (T // N)`` reversed, plus ``steps_offset``;
    * ``trailing``: ``round(arange(T, 0, -T/N)) - 1``;
    * ``linspace``: ``round(linspace(0, T-1, N))`` reversed.
    ``steps_offset`` applies to ``leading`` only (as in diffusers).
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={T}], got {n}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an int >= 0, got {steps_offset!r}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    ts = torch.from_numpy(ts.copy())
    if int(ts.max()) >= T or int(ts.min()) < 0:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps outside [0, {T - 1}] for N={n}")
    return ts


def previous_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """t_prev for each entry of a descending sequence: the next entry, and -1 after the last.

    Works along dim 0 for [S] or per-sample [S, B] sequences.
    """
    if not isinstance(timesteps, torch.Tensor) or timesteps.is_floating_point() or timesteps.dim() not in (1, 2):
        raise TypeError("timesteps must be an integer tensor of shape [S] or [S, B]")
    last = torch.full_like(timesteps[:1], -1)
    return torch.cat([timesteps[1:], last], dim=0)


class DDIMScheduler:
    """DDIM sampler over a :class:`NoiseSchedule`.

    Args:
        schedule: the training noise schedule (default: ``make_schedule("linear", 1000)``).
        set_alpha_to_one: at the final step (t_prev < 0) use ᾱ_prev = 1 (True, diffusers'
            default) or ᾱ_prev = ᾱ_0 (False).
        steps_offset: added to "leading" timesteps (diffusers' ``steps_offset``; SD uses 1).

    ``set_timesteps(n, spacing)`` fills ``timesteps`` and ``prev_timesteps``; ``step`` takes
    t and t_prev per sample and works with any sequence, not only those.
    """

    def __init__(self, schedule: NoiseSchedule | None = None, *, set_alpha_to_one: bool = True, steps_offset: int = 0):
        if schedule is None:
            schedule = make_schedule("linear", 1000)
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.steps_offset = steps_offset
        self.timesteps: torch.Tensor | None = None
        self.prev_timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        ac = self.schedule.alphas_cumprod
        return ac.new_ones(()) if self.set_alpha_to_one else ac[0]

    def to(self, device) -> "DDIMScheduler":
        self.schedule = self.schedule.to(device)
        return self

    def set_timesteps(self, num_inference_steps: int, spacing: str = "leading", device=None) -> torch.Tensor:
        """Descending timesteps as diffusers builds them (see :func:`ddim_timesteps`); also sets
        ``prev_timesteps`` (the next entry, -1 at the end) for use as ``t_prev``."""
        ts = ddim_timesteps(num_inference_steps, self.num_train_timesteps, spacing, self.steps_offset)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = ts.to(device) if device is not None else ts
        self.prev_timesteps = previous_timesteps(self.timesteps)
        return self.timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """q_sample: sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise (per-sample t)."""
        from dualdiff.diffusion.objectives import q_sample

        return q_sample(original_samples, timesteps, noise, self.schedule)

    def step(
        self,
        model_output: torch.Tensor,
        t,
        x_t: torch.Tensor,
        t_prev,
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        clip_sample: bool = False,
        clip_range: float = 1.0,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        use_clipped_model_output: bool = False,
    ) -> DDIMStepOutput:
        """One DDIM step from per-sample ``t`` [B] to ``t_prev`` [B] (negative = final step).

        Args:
            model_output: [B, ...] float, same shape/device as ``x_t``.
            t: int tensor [B] in [0, T-1] (or an int / 0-d tensor for all samples).
            x_t: [B, ...] current samples.
            t_prev: int tensor [B], ``t_prev <= t``; negative means the final step
                (ᾱ_prev = 1, or ᾱ_0 when ``set_alpha_to_one=False``).
            eta: 0 = deterministic DDIM, 1 = DDPM-like variance.
            prediction_type: "epsilon" | "sample" | "v_prediction" (or pred_noise/pred_x0/pred_v).
            clip_sample / clip_range: clamp the predicted x0 to [-clip_range, clip_range].
            generator / variance_noise: the noise z for eta > 0 (at most one of them).
            use_clipped_model_output: re-derive eps from the clipped x0 (diffusers' option).

        Returns:
            ``DDIMStepOutput(prev_sample, pred_original_sample)``, both in x_t's dtype.
        """
        obj = normalize_objective(prediction_type, "prediction_type")
        for name, v in (("model_output", model_output), ("x_t", x_t)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
            if not v.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {v.dtype}")
        if x_t.dim() < 1 or x_t.shape[0] == 0:
            raise ValueError(f"x_t must have a non-empty batch dimension, got shape {tuple(x_t.shape)}")
        if model_output.shape != x_t.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match x_t shape {tuple(x_t.shape)}")
        if model_output.device != x_t.device:
            raise ValueError(f"model_output is on {model_output.device} but x_t is on {x_t.device}")
        if isinstance(eta, torch.Tensor) or not eta >= 0:
            raise ValueError(f"eta must be a float >= 0, got {eta!r}")
        if clip_sample and not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        if generator is not None and variance_noise is not None:
            raise ValueError("pass at most one of generator and variance_noise")
        if variance_noise is not None:
            if not isinstance(variance_noise, torch.Tensor) or variance_noise.shape != x_t.shape:
                raise ValueError(
                    f"variance_noise must be a tensor of x_t's shape {tuple(x_t.shape)}, got "
                    f"{tuple(variance_noise.shape) if isinstance(variance_noise, torch.Tensor) else type(variance_noise).__name__}"
                )
        B, T = x_t.shape[0], self.num_train_timesteps
        t = _check_timesteps("t", t, B, T, x_t.device)
        t_prev = _check_timesteps("t_prev", t_prev, B, T, x_t.device, allow_negative=True)
        if not _is_compiling() and bool((t_prev > t).any()):
            raise ValueError("t_prev must be <= t for every sample (DDIM steps go towards t = 0)")

        ct = _compute_dtype(x_t)
        ac = self.schedule.alphas_cumprod
        if ac.device != x_t.device:
            ac = ac.to(x_t.device)
        a_t = _gather(ac, t, x_t).to(torch.float64)  # keep the coefficient algebra in float64
        final = self.final_alpha_cumprod.to(device=x_t.device, dtype=torch.float64)
        a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], final).reshape(a_t.shape)
        b_t = 1.0 - a_t

        x = x_t.to(ct)
        out = model_output.to(ct)
        sa, sb = a_t.sqrt().to(ct), b_t.sqrt().to(ct)
        if obj == "pred_noise":
            x0 = (x - sb * out) / sa
            eps = out
        elif obj == "pred_x0":
            x0 = out
            eps = (x - sa * x0) / sb
        else:
            x0 = sa * x - sb * out
            eps = sa * out + sb * x
        if clip_sample:
            x0 = x0.clamp(-clip_range, clip_range)
            if use_clipped_model_output:
                eps = (x - sa * x0) / sb

        variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
        std = eta * variance.clamp(min=0).sqrt()
        dir_coef = (1.0 - a_prev - std**2).clamp(min=0).sqrt()
        prev = a_prev.sqrt().to(ct) * x0 + dir_coef.to(ct) * eps
        if eta > 0:
            if variance_noise is None:
                gen_device = generator.device if generator is not None else x_t.device
                variance_noise = torch.randn(x_t.shape, generator=generator, device=gen_device, dtype=x_t.dtype)
            prev = prev + std.to(ct) * variance_noise.to(device=x_t.device, dtype=ct)
        return DDIMStepOutput(prev.to(x_t.dtype), x0.to(x_t.dtype))
