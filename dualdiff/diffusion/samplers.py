"""Sampling loops: DDIM over explicit (per-sample) timestep sequences, DDPM ancestral sampling,
and classifier-free guidance.

DDPM posterior between t and t_prev < t (Ho et al. 2020, eqs. 6-7; the general form diffusers'
``DDPMScheduler`` uses for skipped steps), with α_cur = ᾱ_t / ᾱ_prev and β_cur = 1 - α_cur:

    mean     = sqrt(ᾱ_prev) β_cur / (1-ᾱ_t) · x0  +  sqrt(α_cur) (1-ᾱ_prev) / (1-ᾱ_t) · x_t
    variance = (1-ᾱ_prev) / (1-ᾱ_t) · β_cur            ("fixed_small", the true posterior)
             = β_cur                                    ("fixed_large")

With t_prev = t - 1 this is DDPM's posterior (β_cur = β_t). At the final step (t_prev < 0)
ᾱ_prev = 1: the mean is x0 and no noise is added.

Structures: ``x_T`` may be a tensor or a tuple of tensors (e.g. the 64x64 and 32x32 images of a
dual-scale model), with ``timesteps`` a matching tensor or tuple; ``model_fn(x, t)`` receives
and returns the same structure. Timestep sequences are [S] (shared by the batch) or [S, B]
(one column per sample).

Random draws: the DDPM functions take ``generator`` as one ``torch.Generator`` or a list of
them. With a list of G generators the batch is G equal chunks and chunk g's noise comes from
``generator[g]`` (e.g. one generator per stacked model or per run, so each run's samples do not
depend on what else is sampled beside it); :func:`randn_chunks` draws x_T the same way.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from dualdiff.diffusion.ddim import DDIMScheduler, previous_timesteps
from dualdiff.diffusion.objectives import model_output_to_x0_eps, normalize_objective
from dualdiff.diffusion.schedules import NoiseSchedule, _check_timesteps, _compute_dtype, _gather, _is_compiling

__all__ = [
    "cfg_combine",
    "cfg_model_fn",
    "guided_model_fn",
    "ddim_sample",
    "lucidrains_timesteps",
    "ddpm_sample",
    "ddpm_step",
    "q_posterior",
    "randn_chunks",
    "SampleOutput",
]



# --------------------------------------------------------------------------- guidance


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale_phi: float = 0.0, *,
                remove_parallel: bool = False, keep_parallel_frac: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``.

    ``scale`` is a float or a tensor broadcastable to the outputs (e.g. [B, 1, 1, 1]); scale=1
    gives ``cond``, 0 gives ``uncond``. ``rescale_phi`` > 0 blends in the std-rescaled result of
    Lin et al. 2023 (as lucidrains' ``rescaled_phi``): rescaled = g · std(cond)/std(g) per
    sample, out = phi · rescaled + (1 - phi) · g.

    ``remove_parallel`` (lucidrains' default since 2024, Sadat et al. 2024 "APG"): per sample,
    split the update u = cond - uncond into its component parallel to ``cond`` (flattened,
    computed in float64), u_par = (u·ĉ) ĉ with ĉ = cond/|cond|, and the rest u_orth; the
    guided output is ``cond + (scale - 1) · (u_orth + keep_parallel_frac · u_par)`` (then the
    rescale as above). Without removal that is the classic formula.
    """
    for name, v in (("uncond", uncond), ("cond", cond)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if uncond.shape != cond.shape:
        raise ValueError(f"cond shape {tuple(cond.shape)} does not match uncond shape {tuple(uncond.shape)}")
    if not 0.0 <= rescale_phi <= 1.0:
        raise ValueError(f"rescale_phi must be in [0, 1], got {rescale_phi}")
    if not 0.0 <= keep_parallel_frac <= 1.0:
        raise ValueError(f"keep_parallel_frac must be in [0, 1], got {keep_parallel_frac}")
    if remove_parallel:
        update = (cond - uncond).flatten(1).double()
        unit = torch.nn.functional.normalize(cond.flatten(1).double(), dim=1)
        parallel = (update * unit).sum(dim=1, keepdim=True) * unit
        update = (update - parallel) + keep_parallel_frac * parallel
        guided = cond + (scale - 1.0) * update.reshape(cond.shape).to(cond.dtype)
    else:
        guided = uncond + scale * (cond - uncond)
    if rescale_phi == 0.0:
        return guided
    dims = tuple(range(1, cond.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale_phi * rescaled + (1.0 - rescale_phi) * guided


def cfg_model_fn(
    cond_fn: Callable, uncond_fn: Callable, scale: float, rescale_phi: float = 0.0, *,
    remove_parallel: bool = False, keep_parallel_frac: float = 0.0,
) -> Callable:
    """A ``model_fn(x, t)`` returning ``cfg_combine(uncond_fn(x, t), cond_fn(x, t), scale, ...)``
    (tuple outputs are combined element by element)."""
    kw = dict(remove_parallel=remove_parallel, keep_parallel_frac=keep_parallel_frac)

    def fn(x, t):
        c, u = cond_fn(x, t), uncond_fn(x, t)
        if isinstance(c, (tuple, list)):
            return type(c)(cfg_combine(ui, ci, scale, rescale_phi, **kw) for ui, ci in zip(u, c))
        return cfg_combine(u, c, scale, rescale_phi, **kw)

    return fn


def lucidrains_timesteps(sampling_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending int64 DDIM timesteps as lucidrains' ``ddim_sample`` builds them:
    ``linspace(-1, T-1, S+1)`` truncated to int, reversed, without the final -1 (the step after
    the last entry goes to the clean sample, t_prev = -1). S=T gives T-1, ..., 0."""
    S, T = int(sampling_timesteps), int(num_train_timesteps)
    if not 1 <= S <= T:
        raise ValueError(f"sampling_timesteps must be in [1, num_train_timesteps={T}], got {sampling_timesteps}")
    times = torch.linspace(-1, T - 1, S + 1, dtype=torch.float64).int().long().flip(0)
    return times[:-1].contiguous()


# --------------------------------------------------------------------------- helpers


class SampleOutput(NamedTuple):
    sample: torch.Tensor | tuple
    trajectory: list | None  # x after each step (CPU copies) when asked for


def _as_tuple(name: str, v) -> tuple[tuple, bool]:
    if isinstance(v, torch.Tensor):
        return (v,), True
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, torch.Tensor) for e in v):
        return tuple(v), False
    raise TypeError(f"{name} must be a tensor or a non-empty tuple of tensors, got {type(v).__name__}")


def _per_sample_sequence(name: str, ts: torch.Tensor, batch: int, T: int) -> torch.Tensor:
    """[S] or [S, B] integer sequence -> [S, B] long, values in [0, T-1], non-increasing."""
    if not isinstance(ts, torch.Tensor) or ts.is_floating_point() or ts.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape [S] or [S, B]")
    if ts.dim() == 1:
        ts = ts[:, None].expand(ts.shape[0], batch)
    elif ts.dim() != 2 or ts.shape[1] != batch:
        raise ValueError(f"{name} must have shape [S] or [S, {batch}], got {tuple(ts.shape)}")
    if ts.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    ts = ts.long()
    if int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"{name} values must be in [0, {T - 1}], got min {int(ts.min())}, max {int(ts.max())}")
    if ts.shape[0] > 1 and bool((ts[1:] > ts[:-1]).any()):
        raise ValueError(f"{name} must be non-increasing along the step dimension (sampling goes towards t = 0)")
    return ts


def _progress(iterable, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def _call_model(model_fn, xs: tuple, ts: tuple, single: bool, n: int) -> tuple:
    out = model_fn(xs[0], ts[0]) if single else model_fn(tuple(xs), tuple(ts))
    outs, _ = _as_tuple("model_fn output", out)
    if len(outs) != n:
        raise ValueError(f"model_fn returned {len(outs)} tensors, expected {n}")
    for o, x in zip(outs, xs):
        if o.shape != x.shape:
            raise ValueError(f"model_fn output shape {tuple(o.shape)} does not match its input shape {tuple(x.shape)}")
    return outs


# --------------------------------------------------------------------------- DDIM


@torch.no_grad()
def ddim_sample(
    model_fn: Callable,
    x_T,
    timesteps,
    scheduler: DDIMScheduler,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_range: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    use_clipped_model_output: bool = False,
) -> SampleOutput:
    """Run DDIM along explicit timestep sequences.

    Step k takes every sample from ``timesteps[k]`` to ``timesteps[k+1]`` (and the last step to
    t_prev = -1, the clean sample). ``timesteps`` is [S] or per-sample [S, B], non-increasing
    (repeats allowed: a sample whose t does not change keeps its x when eta = 0); for a tuple
    ``x_T`` give a tuple of sequences with the same S. ``model_fn(x, t)`` gets the current x
    and long t [B] (tuples for tuple inputs). ``use_clipped_model_output``: re-derive ε from the
    clipped x0 in every step (:meth:`DDIMScheduler.step`). Returns ``SampleOutput(sample, trajectory)``.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"scheduler must be a DDIMScheduler, got {type(scheduler).__name__}")
    xs, single = _as_tuple("x_T", x_T)
    tss, single_t = _as_tuple("timesteps", timesteps)
    if single != single_t or len(tss) != len(xs):
        raise ValueError(f"timesteps must match the structure of x_T ({len(xs)} tensor(s)), got {len(tss)}")
    T = scheduler.num_train_timesteps
    seqs = [_per_sample_sequence("timesteps", s.to(x.device), x.shape[0], T) for s, x in zip(tss, xs)]
    S = seqs[0].shape[0]
    if any(s.shape[0] != S for s in seqs):
        raise ValueError("all timestep sequences must have the same number of steps")
    prevs = [previous_timesteps(s) for s in seqs]
    xs = tuple(xs)
    traj = [] if return_trajectory else None
    for k in _progress(range(S), progress, S, "DDIM"):
        ts = tuple(s[k] for s in seqs)
        outs = _call_model(model_fn, xs, ts, single, len(xs))
        new = []
        for x, o, t, p in zip(xs, outs, ts, (pv[k] for pv in prevs)):
            new.append(
                scheduler.step(
                    o, t, x, p, eta=eta, prediction_type=prediction_type, clip_sample=clip_sample,
                    clip_range=clip_range, generator=generator,
                    use_clipped_model_output=use_clipped_model_output,
                ).prev_sample
            )
        xs = tuple(new)
        if traj is not None:
            traj.append(tuple(x.detach().cpu() for x in xs) if not single else xs[0].detach().cpu())
    return SampleOutput(xs[0] if single else xs, traj)


# --------------------------------------------------------------------------- DDPM


def randn_chunks(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal tensor of ``shape`` on ``device`` from one generator or one per chunk.

    ``generator``: None (the global RNG), a ``torch.Generator`` (drawn on its own device, then
    moved), or a non-empty list of G generators: ``shape[0]`` must be divisible by G and rows
    ``g*shape[0]/G .. (g+1)*shape[0]/G - 1`` come from ``generator[g]`` (``torch.cat`` of the
    chunks, each drawn as ``torch.randn((shape[0]/G, *shape[1:]), generator=generator[g])``).
    """
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else None
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        out = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return out if device is None else out.to(device)
    if isinstance(generator, (str, bytes)) or not isinstance(generator, Sequence):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    gens = list(generator)
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError("generator: a list of generators must be non-empty and hold only torch.Generator")
    if not shape or shape[0] % len(gens):
        raise ValueError(f"generator: {len(gens)} generators need a batch size divisible by {len(gens)}, "
                         f"got shape {shape}")
    chunk = (shape[0] // len(gens), *shape[1:])
    parts = [torch.randn(chunk, generator=g, device=g.device, dtype=dtype) for g in gens]
    if device is not None:
        parts = [p.to(device) for p in parts]
    return torch.cat(parts)



def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, t, schedule: NoiseSchedule, t_prev=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t_prev} | x_t, x0), per sample.

    ``t_prev`` defaults to t - 1 (negative = final step, ᾱ_prev = 1). Variance and log-variance
    are [B, 1, ..., 1]; the log is clamped at log(1e-20) as in DDPM/lucidrains.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    for name, v in (("x0", x0), ("x_t", x_t)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if x0.shape != x_t.shape:
        raise ValueError(f"x_t shape {tuple(x_t.shape)} does not match x0 shape {tuple(x0.shape)}")
    B, T = x_t.shape[0], schedule.num_timesteps
    t = _check_timesteps("t", t, B, T, x_t.device)
    t_prev = t - 1 if t_prev is None else _check_timesteps("t_prev", t_prev, B, T, x_t.device, allow_negative=True)
    if not _is_compiling() and bool((t_prev >= t).any()):
        raise ValueError("t_prev must be < t for every sample")
    ct = _compute_dtype(x_t)
    ac = schedule.alphas_cumprod.to(x_t.device)
    a_t = _gather(ac, t, x_t).to(torch.float64)
    a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.ones_like(ac[t])).reshape(a_t.shape)
    alpha_cur = a_t / a_prev
    beta_cur = 1.0 - alpha_cur
    coef_x0 = a_prev.sqrt() * beta_cur / (1.0 - a_t)
    coef_xt = alpha_cur.sqrt() * (1.0 - a_prev) / (1.0 - a_t)
    var = (1.0 - a_prev) / (1.0 - a_t) * beta_cur
    mean = coef_x0.to(ct) * x0.to(ct) + coef_xt.to(ct) * x_t.to(ct)
    log_var = torch.log(var.clamp(min=1e-20))
    return mean.to(x_t.dtype), var.to(ct), log_var.to(ct)


def ddpm_step(
    model_output: torch.Tensor,
    t,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    t_prev=None,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_range: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    variance_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t_prev} ~ N(posterior mean, variance); per-sample t, t_prev.

    ``t_prev`` defaults to t - 1. Samples whose t_prev < 0 get no noise. ``variance_type``:
    "fixed_small" (posterior variance) or "fixed_large" (β_cur). ``generator``: one generator
    or one per equal batch chunk (:func:`randn_chunks`); no draw is made when no sample gets
    noise. Returns (x_prev, pred_x0).
    """
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
    if generator is not None and variance_noise is not None:
        raise ValueError("pass at most one of generator and variance_noise")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(x_t, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("model_output and x_t must be torch.Tensors")
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match x_t shape {tuple(x_t.shape)}")
    if variance_noise is not None and (not isinstance(variance_noise, torch.Tensor) or variance_noise.shape != x_t.shape):
        raise ValueError(f"variance_noise must be a tensor of x_t's shape {tuple(x_t.shape)}")
    obj = normalize_objective(prediction_type, "prediction_type")
    B, T = x_t.shape[0], schedule.num_timesteps
    t = _check_timesteps("t", t, B, T, x_t.device)
    t_prev = t - 1 if t_prev is None else _check_timesteps("t_prev", t_prev, B, T, x_t.device, allow_negative=True)
    x0, _ = model_output_to_x0_eps(obj, model_output, x_t, t, schedule)
    if clip_sample:
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        x0 = x0.clamp(-clip_range, clip_range)
    mean, var, _ = q_posterior(x0, x_t, t, schedule, t_prev)
    if variance_type == "fixed_large":
        ac = schedule.alphas_cumprod.to(x_t.device)
        a_t = ac[t]
        a_prev = torch.where(t_prev >= 0, ac[t_prev.clamp(min=0)], torch.ones_like(a_t))
        var = (1.0 - a_t / a_prev).to(var.dtype).reshape(var.shape)
    noisy = (t_prev >= 0).reshape(var.shape)
    if bool(noisy.any()) or variance_noise is not None:
        if variance_noise is None:
            variance_noise = randn_chunks(x_t.shape, generator, x_t.device, x_t.dtype)
        ct = var.dtype
        std = torch.where(noisy, var.sqrt(), torch.zeros_like(var))
        mean = (mean.to(ct) + std * variance_noise.to(device=x_t.device, dtype=ct)).to(x_t.dtype)
    return mean, x0


@torch.no_grad()
def ddpm_sample(
    model_fn: Callable,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int] | None = None,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_range: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
) -> SampleOutput:
    """DDPM ancestral sampling from ``x_T``.

    ``timesteps``: descending [S] or per-sample [S, B] sequence (default T-1, ..., 0, the full
    chain); step k goes to ``timesteps[k+1]`` (the last to the clean sample). ``generator``:
    one ``torch.Generator`` or a list of G (the batch is G equal chunks, chunk g's step noise
    comes from ``generator[g]``: :func:`randn_chunks`); draw x_T with :func:`randn_chunks` and
    the same generators to make every chunk's samples depend on its generator only.
    """
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a torch.Tensor, got {type(x_T).__name__}")
    T = schedule.num_timesteps
    if timesteps is None:
        timesteps = torch.arange(T - 1, -1, -1, device=x_T.device)
    elif not isinstance(timesteps, torch.Tensor):
        timesteps = torch.as_tensor(list(timesteps), dtype=torch.long)
    seq = _per_sample_sequence("timesteps", timesteps.to(x_T.device), x_T.shape[0], T)
    if seq.shape[0] > 1 and bool((seq[1:] == seq[:-1]).any()):
        raise ValueError("timesteps must be strictly decreasing for DDPM sampling")
    prev = previous_timesteps(seq)
    x = x_T
    traj = [] if return_trajectory else None
    for k in _progress(range(seq.shape[0]), progress, seq.shape[0], "DDPM"):
        out = model_fn(x, seq[k])
        x, _ = ddpm_step(
            out, seq[k], x, schedule, prev[k], prediction_type=prediction_type, variance_type=variance_type,
            clip_sample=clip_sample, clip_range=clip_range, generator=generator,
        )
        if traj is not None:
            traj.append(x.detach().cpu())
    return SampleOutput(x, traj)


def guided_model_fn(model: torch.nn.Module, dist: torch.Tensor, cond_scale: float, rescaled_phi: float = 0.0, *,
                    remove_parallel: bool = False, keep_parallel_frac: float = 0.0, batched: bool = True,
                    null: torch.Tensor | None = None):
    """``model_fn(x, t)`` for :func:`dualdiff.diffusion.ddim_sample`: classifier-free guidance
    of the conditional and null predictions (``cfg_combine``). ``batched``: one forward on
    ``cat([x, x])`` with the second half nulled (else two forwards). ``cond_scale == 1`` gives
    the conditional prediction alone (one forward, as lucidrains). ``null`` [B] bool: these rows
    are unconditional whatever the scale."""
    b = dist.shape[0]
    null_rows = torch.zeros(b, dtype=torch.bool, device=dist.device) if null is None else null.to(dist.device)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cond_scale == 1.0:
            return model(x, t, dist, null_rows)
        if batched:
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([dist, dist]),
                        torch.cat([null_rows, torch.ones_like(null_rows)]))
            cond, uncond = out.chunk(2)
        else:
            cond, uncond = model(x, t, dist, null_rows), model(x, t, dist, torch.ones_like(null_rows))
        return cfg_combine(uncond, cond, cond_scale, rescaled_phi, remove_parallel=remove_parallel,
                           keep_parallel_frac=keep_parallel_frac)

    return fn
