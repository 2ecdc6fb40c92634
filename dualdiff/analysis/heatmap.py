r"""LIFT discretization-error heatmap over (γ0, γ1): batched Hutchinson vHv per scale.

For every grid cell (γ0 = SNR of the 64x64 scale, γ1 = SNR of the 32x32 scale) real images
are noised to each scale's timestep, ``t_s = round(snr_to_timestep(γ_s))``::

    z64 = q_sample(x64, t64, n64),   z32 = q_sample(x32, t32, n32)

and, per scale s, the squared Jacobian of the denoiser is estimated with
:func:`dualdiff.ops.hutchinson_vhv`::

    error_s = 1/(SNR_s (1 + SNR_s)) · mean_b  vᵀ (J_s ⊙ J_s) v,     v = 1/(H_s W_s)

where ``J_s = ∂ x̂_s / ∂ z_s`` is the Jacobian of scale s's x0-prediction
``x̂_s = predict_start_from_noise(z_s, t_s, ε̂_s)`` with respect to *that scale's own input*,
the other scale's input held fixed (the cross-scale blocks are not part of the estimate).

What the public code does (fengsxy/Path_analyisi ``compute_error_heatmap.py`` /
``compute_heatmap_30.py``), and how we read it:

* the Jacobian is taken per scale over that scale's input only: ``f_64(z) = model(z, z_32)[0]``
  and ``f_32(z) = model(z_64, z)[1]`` -- as here;
* ``v`` is ``1/(H·W)`` per pixel (broadcast over channels) and enters twice: probes are scaled
  by ``√v`` (the input side) and the squared JVP is multiplied by ``v`` again before summing
  (the output side), i.e. a true ``vᵀ(J⊙J)v``. ``hutchinson_vhv(v=v)`` gives the input side
  ``Σ_i Σ_j J_ij² v_j``; we multiply by the constant ``v`` for the output side;
* the chain-rule factor ``1/(SNR(1+SNR))`` converts the Jacobian w.r.t. the DDPM input
  ``x_t`` into one w.r.t. ``z = SNR·x0 + √SNR·ε = √(SNR(1+SNR))·x_t``; the public code
  evaluates it at the nominal grid γ, we default to the SNR of the integer timestep actually
  used (``chain_rule_snr="grid"`` gives the public behaviour; the two differ by the rounding);
* the public code differentiates the model's raw noise prediction ε̂ although its docstrings
  reason about x̂ (``∂x̂/∂z ≈ I/SNR``). The issue asks for the x0-prediction, which is the
  default here (``target="x0"``); ``target="eps"`` reproduces the public code;
* the 32x32 clean images there are bilinear downsamples; here the caller's ``x32`` is used or,
  when only ``x64`` is given, the area (2x2 mean) downsample of the data contract.

Cells are batched: ``cells_per_batch`` cells' samples are stacked into one batch and go
through one ``hutchinson_vhv`` call per scale (probes ``[P, cells·N, ...]``, ``chunk_size``
probes per forward-mode pass). The noise and probes of cell ``c`` come from a generator seeded
with ``(seed, c)`` only, so results do not depend on ``cells_per_batch`` or on the
``shard=(rank, world)`` split of cells across processes; per-rank files are merged with
:func:`merge_heatmap_shards`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dualdiff.diffusion import NoiseSchedule, predict_start_from_noise, q_sample, snr_to_timestep
from dualdiff.ops.hutchinson import hutchinson_vhv

__all__ = [
    "HeatmapResult",
    "auto_cells_per_batch",
    "chain_rule_factor",
    "compute_error_heatmap",
    "gamma_grid",
    "heatmap_cell_seed",
    "merge_heatmap_shards",
    "shard_cells",
]

TARGETS = ("x0", "eps")
AMP_MODES = {"off": None, "bf16": torch.bfloat16}
CPU_SAMPLES_PER_PASS = 48  # the automatic cells_per_batch on the CPU keeps a jvp pass this small
CHAIN_RULE_SNR = ("timestep", "grid")


def chain_rule_factor(snr):
    """``1 / (SNR (1 + SNR))``: squared ``∂x_t/∂z`` for ``z = √(SNR(1+SNR)) x_t``."""
    return 1.0 / (snr * (1.0 + snr))


def gamma_grid(num_points: int = 15, gamma_min: float = 0.01, gamma_max: float = 100.0) -> torch.Tensor:
    """``num_points`` SNR values log-spaced in ``[gamma_min, gamma_max]`` (float64, increasing)."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be an int >= 1, got {num_points!r}")
    if not (0 < gamma_min <= gamma_max and math.isfinite(gamma_max)):
        raise ValueError(f"need 0 < gamma_min <= gamma_max, got {gamma_min!r}, {gamma_max!r}")
    if num_points > 1 and not gamma_min < gamma_max:
        raise ValueError("gamma_min must be < gamma_max for num_points > 1")
    g = torch.logspace(math.log10(gamma_min), math.log10(gamma_max), num_points, dtype=torch.float64)
    g[0] = gamma_min
    g[-1] = gamma_max
    return g


def auto_cells_per_batch(num_samples: int, probes: int, chunk_size: int | None,
                         device: torch.device | str) -> int:
    """``cells_per_batch=None``: 4 on CUDA; on the CPU as many cells as keep one jvp pass at
    most ``CPU_SAMPLES_PER_PASS`` samples (at least 1)."""
    if torch.device(device).type == "cuda":
        return 4
    return max(1, CPU_SAMPLES_PER_PASS // (num_samples * min(probes, chunk_size or probes)))


def heatmap_cell_seed(seed: int, cell: int) -> int:
    """The seed of cell ``cell``'s noise and probes (independent of batching and sharding)."""
    return (int(seed) * 1_000_003 + int(cell) * 7919 + 12345) % (2**63 - 1)


def shard_cells(num_cells: int, shard: tuple[int, int] | None) -> list[int]:
    """Flat cell indices handled by ``shard = (rank, world)``: ``rank, rank + world, ...``."""
    if shard is None:
        return list(range(num_cells))
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return list(range(rank, num_cells, world))


# --------------------------------------------------------------------------------------------
# result container
# --------------------------------------------------------------------------------------------


@dataclass
class HeatmapResult:
    """The error maps on a square (γ0, γ1) grid.

    gammas: float64 [N], the grid SNRs (axis 0 = γ0 of the 64x64 scale, axis 1 = γ1 of 32x32).
    timesteps: int64 [N], the integer timestep used for each grid SNR.
    snr: float64 [N], the schedule's SNR at those timesteps (what the chain rule uses by default).
    error_64, error_32: float64 [N, N]; NaN where a shard did not compute the cell.
    computed: bool [N, N], which cells hold values.
    meta: settings (num_samples, probes, target, seeds, schedule, ...), JSON-serialisable.
    """

    gammas: torch.Tensor
    timesteps: torch.Tensor
    snr: torch.Tensor
    error_64: torch.Tensor
    error_32: torch.Tensor
    computed: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def error_total(self) -> torch.Tensor:
        return self.error_64 + self.error_32

    @property
    def num_points(self) -> int:
        return int(self.gammas.shape[0])

    @property
    def complete(self) -> bool:
        return bool(self.computed.all())

    def to_dict(self) -> dict[str, Any]:
        return {
            "gammas": self.gammas, "timesteps": self.timesteps, "snr": self.snr,
            "error_64": self.error_64, "error_32": self.error_32, "error_total": self.error_total,
            "computed": self.computed, "meta": dict(self.meta),
        }

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.pt`` (tensors) and ``<stem>.json`` (lists); returns both paths."""
        p = Path(path)
        stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
        stem.parent.mkdir(parents=True, exist_ok=True)
        pt, js = stem.with_suffix(".pt"), stem.with_suffix(".json")
        torch.save(self.to_dict(), pt)

        def lst(t):
            a = t.detach().cpu().double().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
            return np.where(np.isfinite(a), a, None).tolist() if a.dtype.kind == "f" else a.tolist()

        js.write_text(json.dumps({
            "gammas": lst(self.gammas), "timesteps": lst(self.timesteps), "snr": lst(self.snr),
            "error_64": lst(self.error_64), "error_32": lst(self.error_32),
            "error_total": lst(self.error_total), "computed": lst(self.computed), "meta": self.meta,
        }, indent=1))
        return pt, js

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeatmapResult":
        """Read a result written by :meth:`save` (.pt or .json; a stem picks the .pt)."""
        p = Path(path)
        if p.suffix not in (".pt", ".json"):
            p = p.with_suffix(".pt") if p.with_suffix(".pt").exists() else p.with_suffix(".json")
        if not p.is_file():
            raise FileNotFoundError(f"no heatmap file {str(p)!r} (write one with `dualdiff lift heatmap`)")
        if p.suffix == ".pt":
            d = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raw = json.loads(p.read_text())
            f64 = lambda k: torch.tensor([[math.nan if v is None else v for v in row] for row in raw[k]]
                                         if isinstance(raw[k][0], list) else
                                         [math.nan if v is None else v for v in raw[k]], dtype=torch.float64)
            d = {"gammas": f64("gammas"), "timesteps": torch.tensor(raw["timesteps"], dtype=torch.int64),
                 "snr": f64("snr"), "error_64": f64("error_64"), "error_32": f64("error_32"),
                 "computed": torch.tensor(raw["computed"], dtype=torch.bool), "meta": raw.get("meta", {})}
        return cls(gammas=d["gammas"], timesteps=d["timesteps"], snr=d["snr"], error_64=d["error_64"],
                   error_32=d["error_32"], computed=d["computed"], meta=dict(d.get("meta", {})))


# --------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------


def _split_images(images) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(images, (tuple, list)):
        if len(images) != 2:
            raise ValueError("images must be x64 [N,3,64,64] or a pair (x64, x32)")
        x64, x32 = images
    else:
        x64, x32 = images, None
    if not isinstance(x64, torch.Tensor) or x64.dim() != 4:
        raise ValueError(f"images (x64) must be a 4-D tensor [N, C, H, W], got {getattr(x64, 'shape', type(x64))}")
    if x32 is None:
        if x64.shape[-1] % 2 or x64.shape[-2] % 2:
            raise ValueError(f"x64 spatial size must be even to derive x32, got {tuple(x64.shape)}")
        x32 = F.avg_pool2d(x64, 2)  # area downsampling by 2 (the data contract's dual_scale_views)
    if not isinstance(x32, torch.Tensor) or x32.dim() != 4 or x32.shape[0] != x64.shape[0]:
        raise ValueError("images x32 must be a 4-D tensor with as many samples as x64")
    if x64.numel() == 0:
        raise ValueError("images is empty")
    return x64, x32


class _ScaleFn:
    """``z_s -> x̂_s`` (or ``ε̂_s``) for one scale, the other scale's input fixed.

    Called by hutchinson_vhv on ``k`` probe-major repeats of the cell batch: the fixed input
    and timesteps are repeated to match. With ``amp_dtype`` the model runs under autocast and
    its output is cast back to ``z``'s dtype before the x0-prediction (so the squared JVPs are
    summed in full precision).
    """

    def __init__(self, model, scale: int, z_other, t64, t32, schedule, target, amp_dtype=None):
        self.model, self.scale, self.z_other = model, scale, z_other
        self.t64, self.t32, self.schedule, self.target = t64, t32, schedule, target
        self.amp_dtype = amp_dtype

    def __call__(self, z):
        b = self.z_other.shape[0]
        k = z.shape[0] // b
        rep = lambda x: x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
        other, t64, t32 = rep(self.z_other), rep(self.t64), rep(self.t32)
        with torch.autocast(z.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            if self.scale == 0:
                out = self.model(z, other, t64, t32)[0]
            else:
                out = self.model(other, z, t64, t32)[1]
        out = out.to(z.dtype)
        t = t64 if self.scale == 0 else t32
        if self.target == "eps":
            return out
        return predict_start_from_noise(z, t, out, self.schedule)


def _scale_vhv(model, scale: int, z, z_other, t64, t32, eps, v: float, chunk_size, schedule, target,
               amp_dtype):
    """``v · vhv`` of one scale for a batch of cells (what ``compile=True`` compiles)."""
    fn = _ScaleFn(model, scale, z_other, t64, t32, schedule, target, amp_dtype)
    return hutchinson_vhv(fn, z, probes=None, v=v, chunk_size=chunk_size, eps=eps) * v


def _cell_draws(cells: Sequence[int], seed: int, n: int, shape64, shape32, probes: int, device, dtype):
    """Noise [cells·n, ...] per scale and probes [P, cells·n, ...] per scale, cell by cell."""
    n64, n32, e64, e32 = [], [], [], []
    for c in cells:
        g = torch.Generator(device=device).manual_seed(heatmap_cell_seed(seed, c))
        n64.append(torch.randn((n, *shape64), generator=g, device=device, dtype=dtype))
        n32.append(torch.randn((n, *shape32), generator=g, device=device, dtype=dtype))
        e64.append(torch.randint(0, 2, (probes, n, *shape64), generator=g, device=device, dtype=torch.int8))
        e32.append(torch.randint(0, 2, (probes, n, *shape32), generator=g, device=device, dtype=torch.int8))
    pm = lambda es: torch.cat(es, dim=1).to(dtype).mul_(2).sub_(1)
    return torch.cat(n64), torch.cat(n32), pm(e64), pm(e32)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="cell")


def compute_error_heatmap(
    model: Callable,
    images,
    schedule: NoiseSchedule,
    gammas=None,
    *,
    num_points: int = 15,
    gamma_min: float = 0.01,
    gamma_max: float = 100.0,
    num_samples: int | None = None,
    probes: int = 8,
    chunk_size: int | None = None,
    cells_per_batch: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    target: str = "x0",
    chain_rule_snr: str = "timestep",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    amp: str = "off",
    compile: bool = False,
    partial: str | os.PathLike | None = None,
    save_every: float = 60.0,
) -> HeatmapResult:
    """Estimate the per-scale discretization error on a (γ0, γ1) grid (module docstring).

    Args:
        model: ``model(x64, x32, t64, t32) -> (eps64, eps32)``; put it in eval mode (the samples
            of a batch must be independent). Its device is taken from the images.
        images: clean images in [-1, 1]: x64 ``[N, 3, 64, 64]`` (x32 = 2x2 area downsample) or a
            pair ``(x64, x32)``; on the device the model runs on.
        schedule: the model's training noise schedule (γ -> timestep, q_sample, x̂).
        gammas: grid SNRs (increasing); default ``gamma_grid(num_points, gamma_min, gamma_max)``.
        num_samples: images per cell (the first ``num_samples``; None = all).
        probes: Rademacher probes K per sample; chunk_size: probes per forward-mode pass.
        cells_per_batch: cells stacked into one hutchinson_vhv call (memory ~ cells·N·chunk).
            None: 4 on CUDA; on the CPU as many as keep a pass at <= 48 samples (larger passes
            ran ~2.5x slower per cell there, measured on the tiny LIFT model).
        generator / seed: the base seed (an int drawn from ``generator``, or ``seed``, default 0);
            cell c's noise and probes come from ``heatmap_cell_seed(seed, c)``.
        target: "x0" (Jacobian of the x0-prediction, default) or "eps" (raw noise prediction,
            the public code's choice).
        chain_rule_snr: "timestep" (SNR of the integer timestep used) or "grid" (nominal γ).
        shard: ``(rank, world)``: compute only cells ``rank, rank + world, ...`` (flat index
            ``i·N + j``); the others stay NaN with ``computed`` False.
        dtype: compute dtype of the noised inputs (default: the images' dtype).
        amp: "off" (default) or "bf16": run the model under bfloat16 autocast (matmuls and
            convolutions in bf16, the squared JVP norms still summed in float32). On the same
            noise and probes it stays close to the fp32 map (the benchmark reports the largest
            per-cell difference); the estimator's own noise at K = 8 probes is far larger.
        partial: a file for the progress: the cells computed so far are written there (atomically)
            every ``save_every`` seconds, and when it exists at the start (same grid and
            estimator settings, else a ValueError) its cells are kept and only the rest are
            computed -- the same values as an uninterrupted run, since each cell's noise and
            probes depend only on (seed, cell).
        compile: ``torch.compile`` the batched jvp of each scale (one graph per scale, reused for
            every batch of cells; the last, smaller batch may compile once more). Models should
            use :class:`dualdiff.nn.GroupNorm` and :class:`dualdiff.nn.SelfAttention2d`.

    Returns a :class:`HeatmapResult` (float64 maps on the CPU).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if chain_rule_snr not in CHAIN_RULE_SNR:
        raise ValueError(f"chain_rule_snr must be one of {CHAIN_RULE_SNR}, got {chain_rule_snr!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {tuple(AMP_MODES)}, got {amp!r}")
    amp_dtype = AMP_MODES[amp]
    counts = {"probes": probes} if cells_per_batch is None else {"probes": probes, "cells_per_batch": cells_per_batch}
    for name, val in counts.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    x64, x32 = _split_images(images)
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1 or None, got {num_samples!r}")
        if num_samples > x64.shape[0]:
            raise ValueError(f"num_samples={num_samples} but only {x64.shape[0]} images were given")
        x64, x32 = x64[:num_samples], x32[:num_samples]
    dtype = dtype or x64.dtype
    x64, x32 = x64.to(dtype), x32.to(device=x64.device, dtype=dtype)
    device = x64.device
    n = x64.shape[0]
    if cells_per_batch is None:
        cells_per_batch = auto_cells_per_batch(n, probes, chunk_size, device)

    g = gamma_grid(num_points, gamma_min, gamma_max) if gammas is None else torch.as_tensor(gammas, dtype=torch.float64).cpu()
    if g.dim() != 1 or g.numel() < 1 or not bool((g > 0).all()) or (g.numel() > 1 and not bool((g[1:] > g[:-1]).all())):
        raise ValueError("gammas must be a 1-D strictly increasing tensor of positive SNRs")
    npts = g.shape[0]
    ts = snr_to_timestep(g, schedule.to("cpu"), clamp="warn").round().long()
    snr_t = schedule.snr.cpu()[ts]
    snr_factor = snr_t if chain_rule_snr == "timestep" else g
    factor = chain_rule_factor(snr_factor)  # [N] float64
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item()) if generator is not None else 0
    v64 = 1.0 / (x64.shape[-2] * x64.shape[-1])
    v32 = 1.0 / (x32.shape[-2] * x32.shape[-1])

    meta = {
        "num_samples": n, "probes": probes, "chunk_size": chunk_size, "cells_per_batch": cells_per_batch,
        "seed": seed, "target": target, "chain_rule_snr": chain_rule_snr, "image_size": int(x64.shape[-1]),
        "v": [v64, v32], "weighting": "v^T (J*J) v with v = 1/(H*W) on input and output, "
                                      "times 1/(SNR(1+SNR))",
        "schedule": schedule.name, "num_timesteps": schedule.num_timesteps,
        "shard": list(shard) if shard is not None else None, "dtype": str(dtype).replace("torch.", ""),
        "amp": amp, "compile": bool(compile),
        "images_sha1": hashlib.sha1(torch.cat([x64.flatten(), x32.flatten()]).cpu().numpy().tobytes()).hexdigest(),
    }
    e64 = torch.full((npts, npts), math.nan, dtype=torch.float64)
    e32 = torch.full((npts, npts), math.nan, dtype=torch.float64)
    done = torch.zeros((npts, npts), dtype=torch.bool)
    cells = shard_cells(npts * npts, shard)
    if partial is not None and Path(partial).is_file():
        prev = HeatmapResult.load(partial)
        _check_partial(prev, g, ts, meta, partial)
        e64[prev.computed], e32[prev.computed] = prev.error_64[prev.computed], prev.error_32[prev.computed]
        done |= prev.computed
        cells = [c for c in cells if not bool(done.view(-1)[c])]
    last_save, unsaved = time.monotonic(), False

    def result() -> HeatmapResult:
        return HeatmapResult(gammas=g, timesteps=ts, snr=snr_t, error_64=e64, error_32=e32, computed=done,
                             meta=dict(meta))
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    bar = _progress(len(cells), progress, "error heatmap")
    ts_dev = ts.to(device)
    sched_dev = schedule.to(device)
    scale_vhv = torch.compile(_scale_vhv, dynamic=False) if compile else _scale_vhv
    try:
        with torch.no_grad():
            for start in range(0, len(cells), cells_per_batch):
                batch = cells[start:start + cells_per_batch]
                c = len(batch)
                ii = torch.tensor([b // npts for b in batch])
                jj = torch.tensor([b % npts for b in batch])
                t64 = ts_dev[ii.to(device)].repeat_interleave(n)
                t32 = ts_dev[jj.to(device)].repeat_interleave(n)
                noise64, noise32, p64, p32 = _cell_draws(batch, seed, n, x64.shape[1:], x32.shape[1:],
                                                         probes, device, dtype)
                z64 = q_sample(x64.repeat(c, 1, 1, 1), t64, noise64, sched_dev)
                z32 = q_sample(x32.repeat(c, 1, 1, 1), t32, noise32, sched_dev)
                vhv64 = scale_vhv(model, 0, z64, z32, t64, t32, p64, v64, chunk_size, sched_dev, target,
                                  amp_dtype)
                vhv32 = scale_vhv(model, 1, z32, z64, t64, t32, p32, v32, chunk_size, sched_dev, target,
                                  amp_dtype)
                m64 = vhv64.double().reshape(c, n).mean(dim=1).cpu()
                m32 = vhv32.double().reshape(c, n).mean(dim=1).cpu()
                e64[ii, jj] = m64 * factor[ii]
                e32[ii, jj] = m32 * factor[jj]
                done[ii, jj] = True
                if bar is not None:
                    bar.update(c)
                unsaved = True
                if partial is not None and time.monotonic() - last_save >= save_every:
                    _save_partial(result(), partial)
                    last_save, unsaved = time.monotonic(), False
    finally:  # an error or Ctrl-C keeps what was computed
        if partial is not None and unsaved:
            _save_partial(result(), partial)
        if bar is not None:
            bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return result()


def _save_partial(res: HeatmapResult, path: str | os.PathLike) -> None:
    """Write the progress so far atomically (a crash never leaves a half-written file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(res.to_dict(), tmp)
    os.replace(tmp, p)


def _check_partial(prev: HeatmapResult, gammas, timesteps, meta: dict, path) -> None:
    """A partial file is reused only if it was made with the same grid and estimator settings."""
    same_grid = prev.gammas.shape == gammas.shape and torch.equal(prev.gammas, gammas) and \
        torch.equal(prev.timesteps, timesteps)
    keys = ("num_samples", "probes", "seed", "target", "chain_rule_snr", "amp", "schedule", "num_timesteps",
            "shard", "images_sha1")
    diff = [k for k in keys if prev.meta.get(k) != meta.get(k)]
    if not same_grid or diff:
        what = "the grid" if not same_grid else ", ".join(f"{k}={prev.meta.get(k)!r}" for k in diff)
        raise ValueError(f"partial heatmap {path} was computed with different settings ({what}); "
                         "delete it or pass the same settings to continue it")


def shard_path(out_dir: str | os.PathLike, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its partial heatmap."""
    return Path(out_dir) / f"heatmap_shard{rank:03d}of{world:03d}.pt"


def merge_heatmap_shards(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> HeatmapResult:
    """Combine per-rank partial results (files from :meth:`HeatmapResult.save` or a folder
    holding ``heatmap_shard*of*.pt``) into one; every cell must be computed exactly once."""
    if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
        files = sorted(Path(paths).glob("heatmap_shard*of*.pt"))
        if not files:
            raise FileNotFoundError(f"no heatmap_shard*of*.pt files in {paths}")
    elif isinstance(paths, (str, os.PathLike)):
        files = [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    parts = [HeatmapResult.load(f) for f in files]
    first = parts[0]
    e64, e32 = first.error_64.clone(), first.error_32.clone()
    done = first.computed.clone()
    for f, p in zip(files[1:], parts[1:]):
        if not torch.equal(p.gammas, first.gammas) or not torch.equal(p.timesteps, first.timesteps):
            raise ValueError(f"{f}: its grid differs from {files[0]}'s")
        for k in ("seed", "probes", "num_samples", "target", "chain_rule_snr"):
            if p.meta.get(k) != first.meta.get(k):
                raise ValueError(f"{f}: meta {k}={p.meta.get(k)!r} differs from {first.meta.get(k)!r}")
        overlap = done & p.computed
        if bool(overlap.any()):
            raise ValueError(f"{f}: {int(overlap.sum())} cell(s) were already computed by another shard")
        e64[p.computed] = p.error_64[p.computed]
        e32[p.computed] = p.error_32[p.computed]
        done |= p.computed
    if not bool(done.all()):
        raise ValueError(f"merged shards cover {int(done.sum())} of {done.numel()} cells; some ranks are missing")
    meta = dict(first.meta)
    meta["shard"] = None
    meta["merged_from"] = len(files)
    return HeatmapResult(gammas=first.gammas, timesteps=first.timesteps, snr=first.snr, error_64=e64,
                         error_32=e32, computed=done, meta=meta)
