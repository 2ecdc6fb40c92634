"""dualdiff.compat swaps side by side with the modules they replace, forward + backward.

    python benchmarks/bench_compat.py [--iters 20]       # table with ratios (CPU, or CUDA if present)

The table's sides alternate call by call (:func:`time_pair`): ``speed-up`` is the ratio of the
medians, ``paired`` the median of the per-call ratios.
    pytest benchmarks/bench_compat.py --benchmark-only   # pytest-benchmark, one row per (case, side)

Cases, at the public code's shapes:
  dice   TaDiff-Net's loss, MONAI ``DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True,
         sigmoid=True, reduction="none")`` on [B, 4 sessions, 192, 192] masks (B = 16 on CUDA,
         4 on the CPU) vs ``dualdiff.compat.DiceLoss`` with the same arguments;
  embed  two diffusers ``Timesteps(320, True, 0)`` + ``TimestepEmbedding(320, 1280)`` and a
         ``Linear(2560, 1280)`` on SiLU of the concatenation (SD-UNet widths; B = 64) vs
         ``dualdiff.compat.DualTimestepEmbedding.from_diffusers`` of the same modules;
  vae    VAE-DG's loss terms (BCE on probabilities, KLD, CE) on [B, 3, 224, 224] images, latent
         256, B = 32 (8 on the CPU) vs ``dualdiff.compat.VAELoss(logits=True)``.
Under plain ``pytest`` (smoke mode, benchmarks/conftest.py) each body runs once on tiny sizes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.testing import require

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"


def _sizes(device: torch.device) -> dict:
    if SMOKE:
        return {"dice": (2, 4, 16, 16), "embed": (4, 32, 64), "vae": (2, 3, 16, 16, 8)}
    gpu = device.type == "cuda"
    return {"dice": (16 if gpu else 4, 4, 192, 192), "embed": (64, 320, 1280),
            "vae": (32 if gpu else 8, 3, 224, 224, 256)}


def dice_pair(device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    import monai

    from dualdiff.compat import DiceLoss

    shape = _sizes(device)["dice"]
    x = torch.randn(shape, device=device, requires_grad=True)
    y = (torch.rand(shape, device=device) > 0.7).float()
    kw = dict(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, reduction="none")
    theirs, ours = monai.losses.DiceLoss(**kw), DiceLoss(**kw)

    def step(fn):
        def run():
            x.grad = None
            fn(x, y).mean().backward()
        return run
    return step(theirs), step(ours)


def embed_pair(device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    from dualdiff.compat import DualTimestepEmbedding

    B, C, H = _sizes(device)["embed"]
    mods = [Timesteps(C, True, 0), TimestepEmbedding(C, H), Timesteps(C, True, 0), TimestepEmbedding(C, H),
            nn.Linear(2 * H, H)]
    mods = [m.to(device) for m in mods]
    ts0, e0, ts1, e1, comb = mods
    ours = DualTimestepEmbedding.from_diffusers(*mods)
    t0 = torch.randint(0, 1000, (B,), device=device)
    t1 = torch.randint(0, 1000, (B,), device=device)

    def theirs_run():
        for p in (*e0.parameters(), *e1.parameters(), *comb.parameters()):
            p.grad = None
        out = comb(F.silu(torch.cat([e0(ts0(t0)), e1(ts1(t1))], 1)))
        out.sum().backward()

    def ours_run():
        ours.zero_grad(set_to_none=True)
        ours(t0, t1).sum().backward()
    return theirs_run, ours_run


def vae_pair(device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    from dualdiff.compat import VAELoss

    B, C, S, _, D = _sizes(device)["vae"]
    logits = torch.randn(B, C, S, S, device=device, requires_grad=True)
    x = torch.randn(B, C, S, S, device=device)
    mu = torch.randn(B, D, device=device, requires_grad=True)
    logvar = (0.1 * torch.randn(B, D, device=device)).requires_grad_(True)
    y_hat, y = torch.randn(B, 5, device=device, requires_grad=True), torch.randint(0, 5, (B,), device=device)
    target = torch.rand(B, C, S, S, device=device)  # VAE-DG's BCE needs a target in [0, 1]
    ours = VAELoss(1.0, 1.0, logits=True)

    def theirs_run():
        for t in (logits, mu, logvar, y_hat):
            t.grad = None
        recon = F.binary_cross_entropy(torch.sigmoid(logits), target, reduction="sum")
        kld = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        (recon + kld + F.cross_entropy(y_hat, y, reduction="sum")).backward()

    def ours_run():
        for t in (logits, mu, logvar, y_hat):
            t.grad = None
        ours(logits, x, mu, logvar, y_hat, y)[0].backward()
    return theirs_run, ours_run


PAIRS = {"dice": (dice_pair, "monai"), "embed": (embed_pair, "diffusers"), "vae": (vae_pair, None)}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("side", ["replaced", "dualdiff"])
@pytest.mark.parametrize("case", list(PAIRS))
def test_compat_swap(benchmark, case, side):
    make, lib = PAIRS[case]
    if lib is not None:
        require(lib)  # a skip without it, a failure under CI=true
    theirs, ours = make(_device())
    fn = theirs if side == "replaced" else ours
    for _ in range(2):
        fn()
    benchmark.group = f"compat {case}"
    benchmark(fn)


def time_pair(replaced: Callable[[], None], ours: Callable[[], None], device: torch.device,
              iters: int) -> tuple[float, float, float]:
    """Seconds per call of each side (median over ``iters`` calls) and the median of the
    per-iteration ratio replaced / ours. The sides alternate (A B, then B A, ...) after 3 warm-up
    calls each, so a drifting load hits both alike."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fns = {"replaced": replaced, "ours": ours}
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(iters):
        for name in (("replaced", "ours") if i % 2 == 0 else ("ours", "replaced")):
            t = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(samples["replaced"], samples["ours"]))
    return statistics.median(samples["replaced"]), statistics.median(samples["ours"]), ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cases", default=",".join(PAIRS))
    args = parser.parse_args(argv)
    device = _device()
    print(f"device {device}, torch threads {torch.get_num_threads()}, sizes {_sizes(device)}")
    print(f"{'case':6s} {'replaced ms':>12s} {'dualdiff ms':>12s} {'speed-up':>9s} {'paired':>7s}")
    for case in args.cases.split(","):
        theirs, ours = PAIRS[case][0](device)
        a, b, paired = time_pair(theirs, ours, device, args.iters)
        print(f"{case:6s} {a * 1e3:12.3f} {b * 1e3:12.3f} {a / b:8.2f}x {paired:6.2f}x")


def test_table_smoke(capsys):
    """The side-by-side table (main) at smoke sizes: one row per case, positive times and ratios."""
    for lib in {lib for _, lib in PAIRS.values() if lib is not None}:
        require(lib)
    main(["--iters", "2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == list(PAIRS)
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and r[3].endswith("x") and r[4].endswith("x")
               for r in rows)


if __name__ == "__main__":
    main()
