"""`dualdiff ops-check`: every fused op on every usable backend, against its reference.

For each op, the inputs are fresh random tensors on the chosen device; each usable backend is
forced in turn (DUALDIFF_BACKEND) and compared with the plain-PyTorch reference (forward and,
where the op has one, backward), then timed (median wall time, forward+backward). This is a
quick check of an installation; the full tests are `pytest`, the benchmarks `benchmarks/`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dualdiff._backend import BACKENDS, backend_status
from dualdiff.testing import forced_backend


@dataclass
class CheckRow:
    op: str
    backend: str
    shape: str
    max_abs_err: float
    ok: bool
    time_ms: float
    speedup_vs_torch: float | None = None


def _median_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_err(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _dice_case(device):
    from dualdiff.ops import weighted_dice_loss

    x = torch.randn(4, 3, 48, 48, device=device)
    g = (torch.rand_like(x) > 0.5).float()
    w = torch.rand(4, device=device)

    def run():
        xi = x.detach().requires_grad_()
        loss = weighted_dice_loss(xi, g, w)
        loss.backward()
        return loss.detach(), xi.grad

    return "weighted_dice_loss", str(tuple(x.shape)), run, ("triton", "cuda", "cpp", "torch")


def _vae_case(device):
    from dualdiff.ops import vae_loss

    logits = torch.randn(8, 3, 64, 64, device=device)
    x = torch.rand_like(logits)
    mu, logvar = torch.randn(8, 128, device=device), torch.randn(8, 128, device=device) * 0.1

    def run():
        li, m, lv = (t.detach().requires_grad_() for t in (logits, mu, logvar))
        total, rec, kl = vae_loss(li, x, m, lv, kl_weight=0.5)
        total.backward()
        return (total.detach(), rec.detach(), kl.detach(), li.grad, m.grad, lv.grad)

    return "vae_loss", f"{tuple(logits.shape)} latent {tuple(mu.shape)}", run, ("triton", "cuda", "cpp", "torch")


def _embedding_case(device):
    from dualdiff.ops import DualTimestepEmbedding

    torch.manual_seed(0)
    emb = DualTimestepEmbedding(64, 256).to(device)
    t0 = torch.randint(0, 1000, (64,), device=device)
    t1 = torch.randint(0, 1000, (64,), device=device)

    def run():
        with torch.no_grad():
            return emb(t0, t1)

    return "DualTimestepEmbedding", "B=64 freq 64 hidden 256", run, ("triton", "cuda", "torch")


CASES = (_dice_case, _vae_case, _embedding_case)


def run_checks(device: torch.device | str = "cpu", iters: int = 10) -> list[CheckRow]:
    device = torch.device(device)
    rows: list[CheckRow] = []
    for make in CASES:
        torch.manual_seed(0)
        op, shape, run, supported = make(device)
        with forced_backend("torch"):
            ref = run()
            t_ref = _median_ms(run, device, iters)
        for name in BACKENDS:
            if name not in supported or not backend_status(name, device.type)[0]:
                continue
            if name == "triton" and device.type != "cuda":
                continue  # the interpreter is for tests, not for timing
            with forced_backend(name):
                out = run()
                t = _median_ms(run, device, iters)
            err = _max_err(out, ref)
            rows.append(CheckRow(op, name, shape, err, err <= 1e-4, t, t_ref / t))
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    lines = ["| op | shape | backend | max abs err vs reference | ok | time (ms) | vs torch |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.shape} | {r.backend} | {r.max_abs_err:.2e} | "
                     f"{'yes' if r.ok else 'NO'} | {r.time_ms:.3f} | {r.speedup_vs_torch:.2f}x |")
    return "\n".join(lines)
