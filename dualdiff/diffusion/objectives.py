"""Training objectives: forward noising, prediction targets, conversions, loss weights.

With ᾱ = ᾱ_t (per sample), x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε and v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0:

    predict_start_from_noise:  x0 = x_t / sqrt(ᾱ) - sqrt(1/ᾱ - 1) ε
    predict_noise_from_start:  ε  = (x_t / sqrt(ᾱ) - x0) / sqrt(1/ᾱ - 1)
    predict_start_from_v:      x0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v
    predict_noise_from_v:      ε  = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t

Objectives: ``pred_noise`` (target ε), ``pred_x0`` (target x0), ``pred_v`` (target v).
diffusers' names are accepted as aliases: ``epsilon``, ``sample``, ``v_prediction``.

Loss weights per sample, with snr = ᾱ/(1-ᾱ):

* p2 (Choi et al. 2022, lucidrains' ``p2_loss_weight``): ``(k + snr) ** -gamma``
  (gamma = 0 gives 1; the paper uses gamma = 1, k = 1). Independent of the objective.
* min-SNR-γ (Hang et al. 2023, lucidrains' ``loss_weight``): with c = min(snr, γ),
  ``pred_noise: c / snr``, ``pred_x0: c``, ``pred_v: c / (snr + 1)``. These make the three
  objectives' weighted losses equal to min(snr, γ)·‖x0 - x̂0‖².

Effective loss: every objective's error is a multiple of the x0 error of the same prediction
(ε - ε̂ = sqrt(snr)·(x̂0 - x0), v - v̂ = (x̂0 - x0)/sqrt(1 - ᾱ), 1/(1 - ᾱ) = 1 + snr), so
``w(t)·‖target - pred‖² = λ(snr)·‖x0 - x̂0‖²`` with λ (:func:`x0_loss_weight`):

==============  =====================  ==================  ================  ===============
objective       none = p2 γ=0          p2 (γ, k)           p2 γ=1, k=1       min_snr (γ_m)
==============  =====================  ==================  ================  ===============
pred_noise      snr  (ε-MSE)           snr/(k+snr)^γ       snr/(1+snr) = ᾱ   min(snr, γ_m)
pred_x0         1    (x0-MSE)          (k+snr)^-γ          1/(1+snr) = 1-ᾱ   min(snr, γ_m)
pred_v          1+snr (v-MSE)          (1+snr)/(k+snr)^γ   1    (x0-MSE)     min(snr, γ_m)
==============  =====================  ==================  ================  ===============

The seed (lucidrains v1.5 defaults) is pred_noise with p2 γ = 0: λ = snr, the plain ε-MSE.
pred_v with p2 γ = 1, k = 1 is the unweighted x0-MSE.

Every function takes per-sample integer timesteps ``t`` of shape [B] (or an int, expanded),
broadcasts the coefficients over the trailing dims of ``x``, computes in float32 or wider
(float64 stays float64), and returns ``x``'s dtype.
"""
from __future__ import annotations

import torch

from dualdiff.diffusion.schedules import (
    NoiseSchedule,
    _check_timesteps,
    _compute_dtype,
    _gather,
)

__all__ = [
    "OBJECTIVES",
    "convert_prediction",
    "loss_weight",
    "min_snr_loss_weight",
    "model_output_to_x0_eps",
    "normalize_objective",
    "p2_loss_weight",
    "predict_noise_from_start",
    "predict_noise_from_v",
    "predict_start_from_noise",
    "predict_start_from_v",
    "predict_v",
    "q_sample",
    "training_target",
    "x0_loss_weight",
]

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
_ALIASES = {
    "pred_noise": "pred_noise",
    "epsilon": "pred_noise",
    "pred_x0": "pred_x0",
    "sample": "pred_x0",
    "pred_v": "pred_v",
    "v_prediction": "pred_v",
}


def normalize_objective(objective: str, name: str = "objective") -> str:
    """Canonical objective name (pred_noise | pred_x0 | pred_v) from it or a diffusers alias."""
    if not isinstance(objective, str) or objective not in _ALIASES:
        raise ValueError(f"{name} must be one of {tuple(_ALIASES)}, got {objective!r}")
    return _ALIASES[objective]


def _check_x(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    return x


def _check_pair(name_a: str, a, name_b: str, b) -> None:
    _check_x(name_a, a)
    _check_x(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_b} shape {tuple(b.shape)} does not match {name_a} shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")


def _check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def _lin(x: torch.Tensor, t, a_table, a_x, b_table, b_y, schedule: NoiseSchedule) -> torch.Tensor:
    """a[t] * a_x + b[t] * b_y in the compute dtype, returned in a_x's dtype."""
    _check_schedule(schedule)
    t = _check_timesteps("t", t, x.shape[0], schedule.num_timesteps, x.device)
    ct = _compute_dtype(x)
    a = _gather(a_table, t, x)
    b = _gather(b_table, t, x)
    return (a * a_x.to(ct) + b * b_y.to(ct)).to(x.dtype)


def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) noise  (diffusers' ``add_noise``)."""
    _check_schedule(schedule)
    _check_pair("x0", x0, "noise", noise)
    return _lin(x0, t, schedule.sqrt_alphas_cumprod, x0, schedule.sqrt_one_minus_alphas_cumprod, noise, schedule)


def predict_v(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """v = sqrt(ᾱ_t) noise - sqrt(1-ᾱ_t) x0  (diffusers' ``get_velocity``)."""
    _check_schedule(schedule)
    _check_pair("x0", x0, "noise", noise)
    return _lin(x0, t, schedule.sqrt_alphas_cumprod, noise, -schedule.sqrt_one_minus_alphas_cumprod, x0, schedule)


def predict_start_from_noise(x_t: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x0 = sqrt(1/ᾱ_t) x_t - sqrt(1/ᾱ_t - 1) noise."""
    _check_pair("x_t", x_t, "noise", noise)
    ac = _check_schedule(schedule).alphas_cumprod
    return _lin(x_t, t, (1.0 / ac).sqrt(), x_t, -(1.0 / ac - 1.0).sqrt(), noise, schedule)


def predict_noise_from_start(x_t: torch.Tensor, t, x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """noise = (sqrt(1/ᾱ_t) x_t - x0) / sqrt(1/ᾱ_t - 1)."""
    _check_pair("x_t", x_t, "x0", x0)
    ac = _check_schedule(schedule).alphas_cumprod
    d = (1.0 / ac - 1.0).sqrt()
    return _lin(x_t, t, (1.0 / ac).sqrt() / d, x_t, -1.0 / d, x0, schedule)


def predict_start_from_v(x_t: torch.Tensor, t, v: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """x0 = sqrt(ᾱ_t) x_t - sqrt(1-ᾱ_t) v."""
    _check_schedule(schedule)
    _check_pair("x_t", x_t, "v", v)
    return _lin(x_t, t, schedule.sqrt_alphas_cumprod, x_t, -schedule.sqrt_one_minus_alphas_cumprod, v, schedule)


def predict_noise_from_v(x_t: torch.Tensor, t, v: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """noise = sqrt(ᾱ_t) v + sqrt(1-ᾱ_t) x_t."""
    _check_schedule(schedule)
    _check_pair("x_t", x_t, "v", v)
    return _lin(x_t, t, schedule.sqrt_alphas_cumprod, v, schedule.sqrt_one_minus_alphas_cumprod, x_t, schedule)


def training_target(objective: str, x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The regression target of ``objective``: noise, x0 or v."""
    obj = normalize_objective(objective)
    _check_pair("x0", x0, "noise", noise)
    if obj == "pred_noise":
        _check_timesteps("t", t, x0.shape[0], _check_schedule(schedule).num_timesteps, x0.device)
        return noise
    if obj == "pred_x0":
        _check_timesteps("t", t, x0.shape[0], _check_schedule(schedule).num_timesteps, x0.device)
        return x0
    return predict_v(x0, t, noise, schedule)


def model_output_to_x0_eps(
    objective: str, model_output: torch.Tensor, x_t: torch.Tensor, t, schedule: NoiseSchedule
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) implied by a model output of type ``objective`` at (x_t, t)."""
    obj = normalize_objective(objective)
    _check_pair("x_t", x_t, "model_output", model_output)
    if obj == "pred_noise":
        return predict_start_from_noise(x_t, t, model_output, schedule), model_output
    if obj == "pred_x0":
        return model_output, predict_noise_from_start(x_t, t, model_output, schedule)
    return predict_start_from_v(x_t, t, model_output, schedule), predict_noise_from_v(x_t, t, model_output, schedule)


def convert_prediction(
    model_output: torch.Tensor, from_objective: str, to_objective: str, x_t: torch.Tensor, t, schedule: NoiseSchedule
) -> torch.Tensor:
    """Re-express a model output of type ``from_objective`` as ``to_objective`` (given x_t, t)."""
    src = normalize_objective(from_objective, "from_objective")
    dst = normalize_objective(to_objective, "to_objective")
    if src == dst:
        _check_pair("x_t", x_t, "model_output", model_output)
        return model_output
    x0, eps = model_output_to_x0_eps(src, model_output, x_t, t, schedule)
    if dst == "pred_x0":
        return x0
    if dst == "pred_noise":
        return eps
    return predict_v(x0, t, eps, schedule)


# --------------------------------------------------------------------------- loss weights


def _snr_at(t, schedule: NoiseSchedule, device) -> torch.Tensor:
    _check_schedule(schedule)
    if isinstance(t, torch.Tensor):
        if t.dim() != 1:
            raise ValueError(f"t must have shape [B] (one timestep per sample), got {tuple(t.shape)}")
        batch = t.shape[0]
        device = t.device if device is None else device
    else:
        raise TypeError(f"t must be an integer tensor of shape [B], got {type(t).__name__}")
    t = _check_timesteps("t", t, batch, schedule.num_timesteps, device)
    return schedule.snr.to(device)[t]


def p2_loss_weight(
    t: torch.Tensor, schedule: NoiseSchedule, gamma: float = 0.0, k: float = 1.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-sample P2 weight ``(k + snr_t) ** -gamma`` [B] (Choi et al. 2022; gamma=0 gives ones)."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if k <= 0 and gamma != 0:
        raise ValueError(f"k must be > 0, got {k}")
    snr = _snr_at(t, schedule, None)
    return ((k + snr) ** -gamma).to(dtype)


def min_snr_loss_weight(
    t: torch.Tensor, schedule: NoiseSchedule, objective: str, gamma: float = 5.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-sample min-SNR-γ weight [B] for ``objective`` (Hang et al. 2023), c = min(snr, γ):
    pred_noise c/snr, pred_x0 c, pred_v c/(snr+1). ``gamma=float('inf')`` gives the un-clipped
    weights that make every objective equal to snr·‖x0 - x̂0‖² (lucidrains without min-SNR)."""
    obj = normalize_objective(objective)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    snr = _snr_at(t, schedule, None)
    c = snr.clamp(max=gamma)
    if obj == "pred_noise":
        w = c / snr
    elif obj == "pred_x0":
        w = c
    else:
        w = c / (snr + 1.0)
    return w.to(dtype)


def loss_weight(
    t: torch.Tensor,
    schedule: NoiseSchedule,
    objective: str = "pred_noise",
    weighting: str = "none",
    *,
    p2_gamma: float = 0.0,
    p2_k: float = 1.0,
    min_snr_gamma: float = 5.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample loss weight [B]: ``weighting`` is "none" (ones), "p2" or "min_snr"."""
    if weighting == "none":
        normalize_objective(objective)
        snr = _snr_at(t, schedule, None)
        return torch.ones_like(snr, dtype=dtype)
    if weighting == "p2":
        normalize_objective(objective)
        return p2_loss_weight(t, schedule, p2_gamma, p2_k, dtype=dtype)
    if weighting == "min_snr":
        return min_snr_loss_weight(t, schedule, objective, min_snr_gamma, dtype=dtype)
    raise ValueError(f"weighting must be one of ('none', 'p2', 'min_snr'), got {weighting!r}")


def x0_loss_weight(
    snr: torch.Tensor,
    objective: str = "pred_noise",
    weighting: str = "none",
    *,
    p2_gamma: float = 0.0,
    p2_k: float = 1.0,
    min_snr_gamma: float = 5.0,
) -> torch.Tensor:
    """λ(snr): the weight the loss ``loss_weight(...)·‖target - pred‖²`` of ``objective`` puts on
    the x0 error ``‖x0 - x̂0‖²`` of the same prediction (module docstring's table), elementwise."""
    obj = normalize_objective(objective)
    if not isinstance(snr, torch.Tensor):
        raise TypeError(f"snr must be a torch.Tensor, got {type(snr).__name__}")
    snr = snr.double()
    if weighting == "min_snr":
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        return snr.clamp(max=min_snr_gamma)
    base = {"pred_noise": snr, "pred_x0": torch.ones_like(snr), "pred_v": 1.0 + snr}[obj]
    if weighting == "none":
        return base
    if weighting == "p2":
        if p2_gamma < 0 or (p2_k <= 0 and p2_gamma != 0):
            raise ValueError(f"p2_gamma must be >= 0 and p2_k > 0, got {p2_gamma}, {p2_k}")
        return base * (p2_k + snr) ** -p2_gamma
    raise ValueError(f"weighting must be one of ('none', 'p2', 'min_snr'), got {weighting!r}")
