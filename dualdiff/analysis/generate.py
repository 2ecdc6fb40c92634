"""DDIM generation for the LIFT dual-timestep model along a (γ64, γ32) path.

A :class:`GenerationPath` holds the per-scale SNR sequence (non-decreasing: high noise first)
and the integer timesteps it maps to, ``t = round(snr_to_timestep(γ))``. Sampling starts from
N(0, I) at both scales, evaluates the model at every path point and takes one DDIM step to
the next point (each scale to its own next timestep), the last step to the clean sample.

Path kinds (:func:`make_path`):

* ``diagonal``: γ32 = γ64, log-spaced from gamma_min to gamma_max (``diagonal_schedule``);
* ``ddim``: both scales on the DDIM scheduler's own "leading" timesteps (the seed's
  ``generate_batch_diagonal``);
* ``dp_total`` / ``dp_64``: the seed DP path through a heatmap (total or 64x64-only error),
  γ64 log-spaced over num_steps, γ32 interpolated along the path (the seed's ``--mode dp`` and
  ``dp_64``);
* ``fixed_total`` / ``fixed_64``: the fixed-step DP (num_steps - 1 moves, one model evaluation
  per path point);
* a path file written by :meth:`GenerationPath.save` (JSON).

The public code's sampler uses ``clip_sample=True`` (x0 clipped to [-1, 1]) and eta = 0: the
defaults here. ``clipped_model_output=True`` re-derives ε from the clipped x0 in every step
(diffusers' ``use_clipped_model_output``; off in the public code), so a step never mixes a
clipped x0 with the ε of the unclipped one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dualdiff.analysis.paths import (
    diagonal_schedule,
    fixed_step_path,
    fixed_step_schedule,
    seed_dp_path,
    seed_path_schedule,
)
from dualdiff.diffusion import (
    DDIMScheduler,
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    make_schedule,
    snr_to_timestep,
)

__all__ = [
    "PATH_KINDS",
    "GenerationPath",
    "generate",
    "generate_for_fid",
    "make_path",
    "save_image_grid",
    "save_pngs",
]

PATH_KINDS = ("diagonal", "ddim", "dp_total", "dp_64", "fixed_total", "fixed_64")


@dataclass
class GenerationPath:
    """Per-scale SNRs and timesteps of a sampling path (float64 / int64 arrays of length S)."""

    name: str
    gamma_64: np.ndarray
    gamma_32: np.ndarray
    t64: np.ndarray
    t32: np.ndarray
    schedule_name: str = "lift_cosine"
    num_timesteps: int = 1000

    def __post_init__(self):
        self.gamma_64 = np.asarray(self.gamma_64, dtype=np.float64)
        self.gamma_32 = np.asarray(self.gamma_32, dtype=np.float64)
        self.t64 = np.asarray(self.t64, dtype=np.int64)
        self.t32 = np.asarray(self.t32, dtype=np.int64)
        n = len(self.t64)
        if n < 1 or not (len(self.t32) == len(self.gamma_64) == len(self.gamma_32) == n):
            raise ValueError("gamma_64, gamma_32, t64 and t32 must be non-empty and of equal length")
        for name, t in (("t64", self.t64), ("t32", self.t32)):
            if (t < 0).any() or (t >= self.num_timesteps).any():
                raise ValueError(f"{name} must lie in [0, {self.num_timesteps - 1}]")
            if (np.diff(t) > 0).any():
                raise ValueError(f"{name} must be non-increasing (sampling goes towards t = 0)")

    @property
    def num_steps(self) -> int:
        return int(len(self.t64))

    @classmethod
    def from_gammas(cls, name: str, gamma_64, gamma_32, schedule: NoiseSchedule) -> "GenerationPath":
        g64 = np.asarray(gamma_64, dtype=np.float64)
        g32 = np.asarray(gamma_32, dtype=np.float64)
        s = schedule.to("cpu")
        t64 = snr_to_timestep(torch.from_numpy(g64), s).round().long().numpy()
        t32 = snr_to_timestep(torch.from_numpy(g32), s).round().long().numpy()
        return cls(name, g64, g32, t64, t32, schedule.name, schedule.num_timesteps)

    def timesteps(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(self.t64, device=device), torch.as_tensor(self.t32, device=device))

    def schedule(self) -> NoiseSchedule:
        return make_schedule(self.schedule_name, self.num_timesteps)

    def to_dict(self) -> dict:
        return {"name": self.name, "gamma_64": self.gamma_64.tolist(), "gamma_32": self.gamma_32.tolist(),
                "t64": self.t64.tolist(), "t32": self.t32.tolist(), "schedule_name": self.schedule_name,
                "num_timesteps": self.num_timesteps}

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GenerationPath":
        d = json.loads(Path(path).read_text())
        return cls(**{k: d[k] for k in ("name", "gamma_64", "gamma_32", "t64", "t32", "schedule_name",
                                        "num_timesteps") if k in d})


def make_path(kind: str, schedule: NoiseSchedule, *, heatmap=None, num_steps: int = 50,
              gamma_min: float | None = None, gamma_max: float | None = None, max_jump: int = 5) -> GenerationPath:
    """Build a :class:`GenerationPath` (module docstring); ``kind`` may also be a path file.

    heatmap: a :class:`dualdiff.analysis.heatmap.HeatmapResult` (or a file it was saved to),
    required for the dp / fixed kinds; its grid also gives the default gamma_min/gamma_max.
    """
    if kind not in PATH_KINDS:
        if Path(str(kind)).is_file():
            return GenerationPath.load(kind)
        raise ValueError(f"path kind must be one of {PATH_KINDS} or an existing path file, got {kind!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if heatmap is not None and not hasattr(heatmap, "error_64"):
        from dualdiff.analysis.heatmap import HeatmapResult

        heatmap = HeatmapResult.load(heatmap)
    if heatmap is not None:
        g = heatmap.gammas.double().numpy()
        gamma_min = float(g[0]) if gamma_min is None else gamma_min
        gamma_max = float(g[-1]) if gamma_max is None else gamma_max
    gamma_min = 0.01 if gamma_min is None else gamma_min
    gamma_max = 100.0 if gamma_max is None else gamma_max
    if kind == "diagonal":
        s = diagonal_schedule(gamma_min, gamma_max, num_steps)
        return GenerationPath.from_gammas(kind, s.gamma_64, s.gamma_32, schedule)
    if kind == "ddim":
        ts = ddim_timesteps(num_steps, schedule.num_timesteps, "leading").numpy()
        snr = schedule.snr.cpu().numpy()[ts]
        return GenerationPath(kind, snr, snr.copy(), ts, ts.copy(), schedule.name, schedule.num_timesteps)
    if heatmap is None:
        raise ValueError(f"path kind {kind!r} needs a heatmap")
    if not heatmap.complete:
        raise ValueError("the heatmap has uncomputed cells (merge the shards first)")
    objective = "total" if kind.endswith("total") else "64"
    e64, e32 = heatmap.error_64.numpy(), heatmap.error_32.numpy()
    g = heatmap.gammas.double().numpy()
    if kind.startswith("dp"):
        gp = seed_dp_path(e64, e32, objective=objective)
        s = seed_path_schedule(gp, g, num_steps=num_steps)
    else:
        if num_steps < 2:
            raise ValueError("fixed-step paths need num_steps >= 2 (num_steps - 1 moves)")
        gp = fixed_step_path(e64, e32, g, num_steps=num_steps - 1, max_jump=max_jump, objective=objective,
                             on_infeasible="grow")
        s = fixed_step_schedule(gp, g)
    return GenerationPath.from_gammas(kind, s.gamma_64, s.gamma_32, schedule)


def _model_fn(model: Callable):
    def fn(x, t):
        return tuple(model(x[0], x[1], t[0], t[1]))
    return fn


@torch.no_grad()
def generate(model: Callable, path: GenerationPath, n: int, *, schedule: NoiseSchedule | None = None,
             device=None, generator: torch.Generator | None = None, eta: float = 0.0, clip_sample: bool = True,
             size: int | None = None, channels: int = 3, progress: bool = False,
             clipped_model_output: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` images along ``path``; returns ``(x64 [n, C, S, S], x32 [n, C, S/2, S/2])`` in
    [-1, 1] (clamped). ``size`` S: the large side; None = ``model.config.image_size`` (64 for a
    model without one)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if size is None:
        size = int(getattr(getattr(model, "config", None), "image_size", 64))
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    schedule = schedule or path.schedule()
    if schedule.num_timesteps != path.num_timesteps:
        raise ValueError(f"path was built for T={path.num_timesteps}, schedule has T={schedule.num_timesteps}")
    gen_device = generator.device if generator is not None else device
    x64 = torch.randn((n, channels, size, size), generator=generator, device=gen_device).to(device)
    x32 = torch.randn((n, channels, size // 2, size // 2), generator=generator, device=gen_device).to(device)
    t64, t32 = path.timesteps(device)
    sched = DDIMScheduler(schedule)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        out = ddim_sample(_model_fn(model), (x64, x32), (t64, t32), sched, eta=eta, clip_sample=clip_sample,
                          generator=generator if eta > 0 else None, progress=progress,
                          use_clipped_model_output=clipped_model_output)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    y64, y32 = out.sample
    return y64.clamp(-1, 1), y32.clamp(-1, 1)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2) -> Path:
    """Save images in [-1, 1] ``[B, C, H, W]`` as one PNG grid (torchvision.utils.save_image)."""
    from torchvision.utils import save_image

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_image(((images.detach().float().cpu() + 1) * 0.5).clamp(0, 1), p, nrow=nrow, padding=padding)
    return p


def save_pngs(images: torch.Tensor, out_dir: str | os.PathLike, start: int = 0) -> list[Path]:
    """Write images in [-1, 1] as ``{index:05d}.png`` (8-bit RGB), one file each."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    files = []
    for k, a in enumerate(arr):
        f = out / f"{start + k:05d}.png"
        Image.fromarray(a if a.shape[-1] != 1 else a[..., 0]).save(f)
        files.append(f)
    return files


def generate_for_fid(model: Callable, path: GenerationPath, n: int, out_dir: str | os.PathLike,
                     batch_size: int = 64, *, schedule: NoiseSchedule | None = None, seed: int = 0, device=None,
                     eta: float = 0.0, clip_sample: bool = True, progress: bool = True,
                     clipped_model_output: bool = False) -> list[Path]:
    """Generate ``n`` images along ``path`` (the large scale, side ``model.config.image_size``)
    and write them as PNGs to ``out_dir``.

    Batch k uses ``torch.Generator().manual_seed(seed + k)`` (CPU), so the images do not
    depend on the device; a progress bar counts images. Returns the file paths.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"generate ({path.name})", unit="img")
    files: list[Path] = []
    try:
        for k, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            g = torch.Generator().manual_seed(seed + k)
            x64, _ = generate(model, path, b, schedule=schedule, device=device, generator=g, eta=eta,
                              clip_sample=clip_sample, clipped_model_output=clipped_model_output)
            files += save_pngs(x64, out_dir, start)
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
    return files
