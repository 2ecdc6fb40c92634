"""Noise schedules and the SNR <-> timestep maps.

Discrete-time DDPM convention (the one diffusers and the LIFT seed code use): timestep
indices ``t = 0 .. T-1``; ``betas[t]`` is the variance added at step ``t``;

    alphas[t]         = 1 - betas[t]
    alphas_cumprod[t] = prod_{s <= t} alphas[s]                    (written ᾱ_t)
    snr[t]            = ᾱ_t / (1 - ᾱ_t),     log_snr[t] = log(snr[t])
    x_t               = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε

``snr`` decreases strictly with ``t`` (every beta is in (0, 1)), so ``log_snr`` is a strictly
monotone table over the integers and the continuous maps below interpolate it linearly.

Schedules (:func:`make_schedule`):

* ``linear``        betas = linspace(beta_start, beta_end, T), default 1e-4 .. 0.02 (DDPM).
* ``scaled_linear`` betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2 (latent diffusion;
                    Stable Diffusion uses beta_start=0.00085, beta_end=0.012).
* ``cosine``        Nichol & Dhariwal: f(u) = cos²((u + s)/(1 + s) · π/2), ᾱ(u) = f(u)/f(0) on
                    u = t/T, betas_t = 1 - ᾱ((t+1)/T)/ᾱ(t/T) clipped to [min_beta, max_beta]
                    (s = 0.008, max_beta = 0.999: diffusers' "squaredcos_cap_v2").
* ``sigmoid``       Chen 2023 / Jabri et al. (lucidrains' ``sigmoid_beta_schedule``): ᾱ(u) ∝
                    σ(-(u(end-start)+start)/τ) shifted to hit 1 at u=0 and 0 at u=1, start=-3,
                    end=3, τ=1, betas clipped to max 0.999.
* ``lift_cosine``   the cosine schedule exactly as the LIFT seed's public code builds it: its
                    ``cosine_beta_schedule(T, beta_start, beta_end)`` receives the DDIM defaults
                    1e-4 and 0.02 as the *clip bounds*, so betas are clipped to [1e-4, 0.02].
                    This is the schedule that reproduces the seed's γ <-> t anchors
                    (see :func:`snr_to_timestep`).

Float64 throughout: the tables are tiny and the SNR <-> t maps need the precision.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

__all__ = [
    "SCHEDULES",
    "NoiseSchedule",
    "ScheduleRangeWarning",
    "cosine_betas",
    "linear_betas",
    "make_schedule",
    "scaled_linear_betas",
    "sigmoid_betas",
    "snr_to_timestep",
    "log_snr_to_timestep",
    "timestep_to_snr",
    "timestep_to_log_snr",
]

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "lift_cosine")
ClampMode = Literal["warn", "error", "silent"]
_F64 = torch.float64


class ScheduleRangeWarning(UserWarning):
    """A timestep or SNR outside the schedule's range was clamped to the nearest end."""


# --------------------------------------------------------------------------- beta schedules


def _check_T(num_timesteps: int) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int):
        raise TypeError(f"num_timesteps must be an int, got {type(num_timesteps).__name__}")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    return num_timesteps


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear schedule: ``linspace(beta_start, beta_end, T)`` (float64).

    Not rescaled with T (diffusers' convention); for lucidrains' rescaling pass
    ``beta_start=1e-4 * 1000 / T`` and ``beta_end=0.02 * 1000 / T``.
    """
    T = _check_T(num_timesteps)
    return torch.linspace(beta_start, beta_end, T, dtype=_F64)


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Latent-diffusion schedule: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
    T = _check_T(num_timesteps)
    if beta_start < 0 or beta_end < 0:
        raise ValueError(f"beta_start and beta_end must be >= 0, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=_F64) ** 2


def cosine_betas(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, min_beta: float = 0.0
) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule; betas clipped to ``[min_beta, max_beta]``."""
    T = _check_T(num_timesteps)
    if not 0.0 <= min_beta < max_beta < 1.0:
        raise ValueError(f"need 0 <= min_beta < max_beta < 1, got min_beta={min_beta}, max_beta={max_beta}")
    u = torch.arange(T + 1, dtype=_F64) / T
    f = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min_beta, max_beta)


def sigmoid_betas(
    num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> torch.Tensor:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling", Fig. 8)."""
    T = _check_T(num_timesteps)
    if not end > start:
        raise ValueError(f"sigmoid schedule needs end > start, got start={start}, end={end}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    u = torch.arange(T + 1, dtype=_F64) / T
    v_start = 1.0 / (1.0 + math.exp(-start / tau))
    v_end = 1.0 / (1.0 + math.exp(-end / tau))
    alpha_bar = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(0.0, max_beta)


# --------------------------------------------------------------------------- the schedule


class NoiseSchedule:
    """A discrete noise schedule's tables, all float64 tensors of shape [T].

    Attributes: ``betas``, ``alphas``, ``alphas_cumprod`` (ᾱ_t), ``alphas_cumprod_prev``
    (ᾱ_{t-1}, with ᾱ_{-1} = 1), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``snr`` (ᾱ/(1-ᾱ)), ``log_snr``; ``num_timesteps`` (T) and ``name``.

    Build with :func:`make_schedule` or ``NoiseSchedule(betas)``; ``.to(device)`` returns a copy
    whose tables live on ``device`` (still float64).
    """

    _TABLES = (
        "betas",
        "alphas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "snr",
        "log_snr",
    )

    def __init__(self, betas: torch.Tensor, name: str = "custom"):
        if not isinstance(betas, torch.Tensor):
            betas = torch.as_tensor(betas)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not betas.is_floating_point():
            raise TypeError(f"betas must be floating point, got {betas.dtype}")
        betas = betas.detach().to(_F64)
        if not bool(torch.isfinite(betas).all()) or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                "every beta must be finite and in the open interval (0, 1) "
                f"(got min {betas.min().item():.3g}, max {betas.max().item():.3g}); "
                "zero-terminal-SNR schedules are not supported"
            )
        self.name = name
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        self.log_snr = torch.log(self.snr)
        if not bool((self.log_snr[1:] < self.log_snr[:-1]).all()):  # cannot happen with betas in (0,1) unless underflow
            raise ValueError("log-SNR of this schedule is not strictly decreasing (ᾱ underflowed?)")

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.num_timesteps}, device={self.device})"

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy with every table on ``device`` (values copied, not recomputed)."""
        new = object.__new__(NoiseSchedule)
        new.name = self.name
        for k in self._TABLES:
            setattr(new, k, getattr(self, k).to(device))
        return new

    @property
    def snr_range(self) -> tuple[float, float]:
        """(smallest SNR = snr[T-1], largest SNR = snr[0])."""
        return float(self.snr[-1]), float(self.snr[0])


def make_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` by name (one of ``SCHEDULES``).

    ``kwargs`` go to the beta function: ``linear``/``scaled_linear``: beta_start, beta_end;
    ``cosine``: s, max_beta, min_beta; ``sigmoid``: start, end, tau, max_beta;
    ``lift_cosine``: s (clip bounds fixed at [1e-4, 0.02] as in the LIFT code).
    """
    if name == "linear":
        betas = linear_betas(num_timesteps, **kwargs)
    elif name == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, **kwargs)
    elif name == "cosine":
        betas = cosine_betas(num_timesteps, **kwargs)
    elif name == "sigmoid":
        betas = sigmoid_betas(num_timesteps, **kwargs)
    elif name == "lift_cosine":
        betas = cosine_betas(num_timesteps, min_beta=1e-4, max_beta=0.02, **kwargs)
    else:
        raise ValueError(f"schedule name must be one of {SCHEDULES}, got {name!r}")
    return NoiseSchedule(betas, name=name)


# --------------------------------------------------------------------------- SNR <-> timestep


def _check_clamp(clamp: str) -> None:
    if clamp not in ("warn", "error", "silent"):
        raise ValueError(f"clamp must be one of ('warn', 'error', 'silent'), got {clamp!r}")


def _as_float64(name: str, value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        x = value.detach().to(device=device, dtype=_F64)
    else:
        try:
            x = torch.as_tensor(value, dtype=_F64, device=device)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a number, sequence or tensor, got {type(value).__name__}") from e
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _clamp_to(name: str, x: torch.Tensor, lo: float, hi: float, clamp: str, what: str) -> torch.Tensor:
    out = (x < lo) | (x > hi)
    if bool(out.any()):
        n = int(out.sum())
        bad = x[out]
        msg = (
            f"{n} {name} value(s) outside the schedule's {what} range [{lo:.6g}, {hi:.6g}] "
            f"(min {bad.min().item():.6g}, max {bad.max().item():.6g})"
        )
        if clamp == "error":
            raise ValueError(msg)
        if clamp == "warn":
            warnings.warn(msg + "; clamped to the range", ScheduleRangeWarning, stacklevel=3)
        x = x.clamp(lo, hi)
    return x


def timestep_to_log_snr(t, schedule: NoiseSchedule, *, clamp: ClampMode = "warn") -> torch.Tensor:
    """log-SNR at (possibly fractional) timesteps ``t``, linear in t between integers.

    Returns float64 with ``t``'s shape on the schedule's device; exact table values at integers.
    ``clamp`` handles t outside [0, T-1]: "warn" (clamp + :class:`ScheduleRangeWarning`),
    "error" (ValueError), "silent" (clamp).
    """
    _check_clamp(clamp)
    ls = schedule.log_snr
    T = ls.shape[0]
    x = _as_float64("t", t, ls.device)
    x = _clamp_to("t", x, 0.0, float(T - 1), clamp, "timestep")
    i = x.floor().clamp(0, T - 2).to(torch.long)
    frac = x - i.to(_F64)
    lo, hi = ls[i], ls[i + 1]
    out = lo + frac * (hi - lo)
    return torch.where(frac == 0, lo, torch.where(frac == 1, hi, out))


def timestep_to_snr(t, schedule: NoiseSchedule, *, clamp: ClampMode = "warn") -> torch.Tensor:
    """SNR at (possibly fractional) timesteps: ``exp`` of the log-SNR interpolated linearly in t.

    At integer t this is exactly ``schedule.snr[t]`` (table value, no exp/log round trip), so
    ``snr_to_timestep(timestep_to_snr(k)) == k`` exactly. Float64, ``t``'s shape. See
    :func:`timestep_to_log_snr` for ``clamp``.
    """
    _check_clamp(clamp)
    T = schedule.num_timesteps
    x = _as_float64("t", t, schedule.device)
    x = _clamp_to("t", x, 0.0, float(T - 1), clamp, "timestep")
    snr = timestep_to_log_snr(x, schedule, clamp="silent").exp()
    is_int = x == x.round()
    exact = schedule.snr[x.round().clamp(0, T - 1).to(torch.long)]
    return torch.where(is_int, exact, snr)


def log_snr_to_timestep(log_snr, schedule: NoiseSchedule, *, clamp: ClampMode = "warn") -> torch.Tensor:
    """Inverse of :func:`timestep_to_log_snr` (continuous, monotone decreasing, float64)."""
    _check_clamp(clamp)
    ls = schedule.log_snr
    T = ls.shape[0]
    x = _as_float64("log_snr", log_snr, ls.device)
    x = _clamp_to("log_snr", x, float(ls[-1]), float(ls[0]), clamp, "log-SNR")
    a = -ls  # ascending
    v = -x
    i = (torch.searchsorted(a, v.reshape(-1), right=True) - 1).clamp(0, T - 2).reshape(v.shape)
    frac = (v - a[i]) / (a[i + 1] - a[i])
    return i.to(_F64) + frac


def snr_to_timestep(snr, schedule: NoiseSchedule, *, clamp: ClampMode = "warn") -> torch.Tensor:
    """Continuous timestep at which the schedule's SNR equals ``snr``.

    Linear interpolation of t in log-SNR between the integer timesteps (the exact inverse of
    :func:`timestep_to_snr`; ``snr_to_timestep(schedule.snr[k]) == k`` exactly for every k).
    Vectorised (any shape; float, list, ndarray or tensor), float64, strictly decreasing in
    ``snr``. ``snr`` must be >= 0 and not NaN. SNRs outside [snr[T-1], snr[0]] (0 and inf
    included) are handled by ``clamp``: "warn" (default) clamps to t in [0, T-1] and emits a
    :class:`ScheduleRangeWarning`, "error" raises ValueError, "silent" clamps quietly. Round
    with ``.round().long()`` for an integer timestep.

    The LIFT seed's anchors, γ = 0.01 <-> t ≈ 943 and γ = 100 <-> t ≈ 54 with T = 1000,
    checked numerically for every schedule (continuous t from this function; the LIFT code's
    own rule, argmin_t |ᾱ_t - γ/(1+γ)|, gives the same integers):

    ============================  =============  =============
    schedule (T = 1000)           t(γ = 0.01)    t(γ = 100)
    ============================  =============  =============
    ``lift_cosine``               943.01 -> 943  54.22 -> 54    matches both
    ``cosine`` (max_beta 0.999)   935.05 -> 935  55.46 -> 55
    ``scaled_linear`` 1e-4..0.02  850.59 -> 851  52.66 -> 53
    ``linear`` 1e-4..0.02         673.67 -> 674  26.41 -> 26
    ``sigmoid`` (-3, 3, τ=1)      968.57 -> 969  29.43 -> 29
    ============================  =============  =============

    So the anchors come from the cosine schedule *as the LIFT public code builds it*: its
    ``DDIMScheduler(beta_schedule="cosine")`` passes its defaults beta_start=1e-4,
    beta_end=0.02 into ``cosine_beta_schedule`` as the clip bounds, so the cosine betas are
    clipped to [1e-4, 0.02] (schedule ``"lift_cosine"``). The textbook cosine schedule (betas
    capped at 0.999) is off by 8 steps at γ = 0.01 and 1 step at γ = 100. With the clipping
    SNR spans [3.2e-3, 9999] instead of [2.4e-9, 2.4e4].
    """
    _check_clamp(clamp)
    x = _as_float64("snr", snr, schedule.device)
    if (x < 0).any():
        raise ValueError(f"snr must be >= 0, got min {x.min().item():.6g}")
    lo, hi = schedule.snr_range
    _clamp_to("snr", x, lo, hi, clamp, "SNR")  # range check/warning in the caller's units
    return log_snr_to_timestep(torch.log(x), schedule, clamp="silent")


# --------------------------------------------------------------------------- shared helpers (private)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def _check_timesteps(
    name: str, t, batch: int, num_timesteps: int, device: torch.device, *, allow_negative: bool = False
) -> torch.Tensor:
    """Per-sample integer timesteps as a long tensor [batch] on ``device``.

    Accepts an int tensor of shape [batch], or (explicitly, for convenience) a Python int or a
    0-d int tensor, which is expanded to [batch]. Values must lie in [0, T-1]; with
    ``allow_negative`` any negative value is also allowed (it means "final step" in DDIM/DDPM).
    The value-range check syncs with the device and is skipped under torch.compile.
    """
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        t = torch.full((batch,), t, dtype=torch.long, device=device)
    elif isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (per-sample timesteps), got {t.dtype}")
        if t.dim() == 0:
            t = t.reshape(1).expand(batch)
        elif t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must have shape [{batch}] (one timestep per sample), got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.long)
    else:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if not _is_compiling():
        hi = int(t.max())
        lo = int(t.min())
        if hi >= num_timesteps or (lo < 0 and not allow_negative):
            allowed = f"[0, {num_timesteps - 1}]" + (" or negative (final step)" if allow_negative else "")
            raise ValueError(f"{name} values must be in {allowed}, got min {lo}, max {hi}")
    return t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _gather(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to [B, 1, ..., 1] (x's rank) in x's compute dtype, on x's device."""
    if table.device != x.device:
        table = table.to(x.device)
    vals = table[t.to(x.device)]
    return vals.to(_compute_dtype(x)).reshape(t.shape[0], *([1] * (x.dim() - 1)))
