"""The LIFT seed's noise-prediction MSE tests (public code: fengsxy/Path_analyisi ``test.py``).

For clean images x64 (and x32 = their 32x32 view) and a test timestep t (default 500):

* test 1, both noisy:        inputs (q(x64, t), q(x32, t)), timesteps (t, t);
* test 2a, clean 32 + noisy 64: inputs (q(x64, t), x32), timesteps (t, 0);
* test 2b, clean 64 + noisy 32: inputs (x64, q(x32, t)), timesteps (0, t).

"Clean" means the clean image itself with timestep 0, and the target of a clean scale is
zero noise (as the public code). Per scale, ``mse_s`` is the mean squared error of the
predicted noise against that target over all elements of ``num_samples`` images;
``total_mse = (mse_64 + mse_32) / 2`` (the public code's definition). Unlike the public loop,
which stops after the batch that reaches num_samples, exactly ``num_samples`` images are used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dualdiff.data.images import scale_labels
from dualdiff.diffusion import NoiseSchedule, q_sample

__all__ = ["MSE_TESTS", "format_mse_table", "run_mse_tests", "save_mse_results"]

MSE_TESTS = {
    "test1_both_noisy": "Test 1: both noisy",
    "test2a_clean32_noisy64": "Test 2a: clean 32 + noisy 64",
    "test2b_clean64_noisy32": "Test 2b: clean 64 + noisy 32",
}


@torch.no_grad()
def run_mse_tests(model: Callable, images, schedule: NoiseSchedule, *, timestep: int = 500,
                  num_samples: int | None = None, batch_size: int = 32, seed: int = 0, device=None) -> dict:
    """Run the three tests; returns ``{test: {"mse_64", "mse_32", "total_mse"}, "timestep",
    "num_samples", "image_size"}`` ("64" / "32" name the large and the small scale).

    images: x64 ``[N, 3, S, S]`` in [-1, 1] (S = 64 in the paper; x32 = 2x2 area downsample) or
    a pair (x64, x32).
    The noise of batch k comes from ``torch.Generator().manual_seed(seed + k)`` (CPU), the same
    draws for every test.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < schedule.num_timesteps:
        raise ValueError(f"timestep must be an int in [0, {schedule.num_timesteps - 1}], got {timestep!r}")
    if isinstance(images, (tuple, list)):
        x64, x32 = images
    else:
        x64, x32 = images, F.avg_pool2d(images, 2)
    n = x64.shape[0] if num_samples is None else num_samples
    if not 1 <= n <= x64.shape[0]:
        raise ValueError(f"num_samples must be in [1, {x64.shape[0]}] (the number of images), got {num_samples!r}")
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else x64.device
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    sums = {k: [0.0, 0.0] for k in MSE_TESTS}
    try:
        for k, s in enumerate(range(0, n, batch_size)):
            a = x64[s:min(n, s + batch_size)].to(device)
            b = x32[s:min(n, s + batch_size)].to(device)
            bs = a.shape[0]
            g = torch.Generator().manual_seed(seed + k)
            n64 = torch.randn(a.shape, generator=g).to(device=device, dtype=a.dtype)
            n32 = torch.randn(b.shape, generator=g).to(device=device, dtype=b.dtype)
            t = torch.full((bs,), timestep, dtype=torch.long, device=device)
            zero = torch.zeros_like(t)
            q64, q32 = q_sample(a, t, n64, schedule), q_sample(b, t, n32, schedule)
            cases = {
                "test1_both_noisy": ((q64, q32, t, t), (n64, n32)),
                "test2a_clean32_noisy64": ((q64, b, t, zero), (n64, torch.zeros_like(n32))),
                "test2b_clean64_noisy32": ((a, q32, zero, t), (torch.zeros_like(n64), n32)),
            }
            for name, (inp, (tgt64, tgt32)) in cases.items():
                p64, p32 = model(*inp)
                sums[name][0] += float((p64.float() - tgt64.float()).square().mean(dim=(1, 2, 3)).sum())
                sums[name][1] += float((p32.float() - tgt32.float()).square().mean(dim=(1, 2, 3)).sum())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    out: dict = {"timestep": timestep, "num_samples": n, "image_size": int(x64.shape[-1])}
    for name, (s64, s32) in sums.items():
        m64, m32 = s64 / n, s32 / n
        out[name] = {"mse_64": m64, "mse_32": m32, "total_mse": (m64 + m32) / 2}
    return out


def format_mse_table(results: dict) -> str:
    """A plain-text table of the three tests (columns titled with the two scales' sizes)."""
    big, small = scale_labels(results)
    lines = [f"MSE tests (t = {results['timestep']}, {results['num_samples']} samples)",
             f"{'test':32s} {'MSE ' + big:>10s} {'MSE ' + small:>10s} {'total':>10s}"]
    for key, label in MSE_TESTS.items():
        r = results[key]
        lines.append(f"{label:32s} {r['mse_64']:10.5f} {r['mse_32']:10.5f} {r['total_mse']:10.5f}")
    return "\n".join(lines)


def save_mse_results(results: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(results, indent=1))
    return p
