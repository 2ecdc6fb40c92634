"""LIFT (issue 4): one error-heatmap cell, the full heatmap, generation and the training step.

    python benchmarks/bench_lift.py [--device cpu|cuda] [--model tiny|default] [--samples 16]
                                    [--probes 8] [--batch 64] [--what cell,train,heatmap,generate]
        prints one table; every ratio is measured side by side in that run.
    gpu_rows(timeit, device)   (benchmarks/gpu_report.py, on CUDA): the issue's measurements with
        the default 58.5 M model: the cell (B = 16, K = 8), the training step (B = 64), the full
        15 x 15 heatmap and 1000 images x 50 DDIM steps.

One heatmap cell = both scales' Hutchinson estimates at (γ0, γ1) = (1, 1). Variants, so that
batching, compilation and bf16 are credited separately:
  seed loop          one ``torch.func.jvp`` per probe (``hutchinson_vhv_reference``), eager fp32:
                     the seed's code path, the baseline
  loop+compile       one jvp per probe, each through the compiled step, fp32
  loop+bf16          one jvp per probe, eager, the model under bfloat16 autocast
  batched            all K probes folded into one jvp, eager fp32
  batched+compile    the same step under ``torch.compile`` (hand-written GroupNorm, math attention)
  batched+compile+bf16   and the model under bfloat16 autocast
Each row reports the largest relative difference of its per-scale cell value (the mean over the
B samples) from the seed loop's, on the same noise and probes.

Training step (B images, LIFT ε-loss on both scales, AdamW, grad clip 1.0), one change per row:
  eager fp32         a plain loop: zero_grad, forward, backward, clip, step
  compile fp32       the same loop, model under torch.compile
  compile+bf16       and bfloat16 autocast
  dualdiff Trainer   ``dualdiff.train.Trainer.train_step`` with amp=bf16, compile=True and, on
                     CUDA, fused AdamW (``dualdiff lift train train.compile=true
                     train.optimizer_kwargs={fused: true}``; also the EMA update and logging)

Every variant is warmed the same way before it is timed (compilation happens there); the full
heatmap's eager row gets the same small-grid warm-up as the compiled rows.

    pytest benchmarks/bench_lift.py --benchmark-only   # the same rows, CPU sizes (tiny model)
Under plain ``pytest`` (smoke mode, see benchmarks/conftest.py) each eager body runs once on the
smallest sizes; the compiled variants are left to ``--benchmark-only``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from dualdiff.analysis.generate import generate, make_path
from dualdiff.analysis.heatmap import _scale_vhv, _ScaleFn, auto_cells_per_batch, compute_error_heatmap
from dualdiff.data.images import ProceduralDualScaleImages
from dualdiff.diffusion import make_schedule, q_sample, snr_to_timestep
from dualdiff.experiments.lift import LIFTLoss
from dualdiff.models.lift import LIFTDualTimestepModel, LIFTModelConfig
from dualdiff.ops.hutchinson import hutchinson_vhv_reference
from dualdiff.train import TrainConfig, Trainer


def cpu_timeit(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3) -> float:
    """Median wall time of ``fn`` in microseconds (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """One timed call of a long job (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build_model(size: str, device: torch.device) -> LIFTDualTimestepModel:
    cfg = LIFTModelConfig() if size == "default" else LIFTModelConfig.tiny()
    torch.manual_seed(0)
    return LIFTDualTimestepModel(cfg).to(device).eval()


def real_images(n: int, device: torch.device) -> torch.Tensor:
    return ProceduralDualScaleImages(n=n, seed=0).tensors().to(device)


class _ImageTensors(torch.utils.data.Dataset):
    """Pre-rendered images, so the Trainer's data loading costs no rendering."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


# ---------------------------------------------------------------------------------------------
# one heatmap cell
# ---------------------------------------------------------------------------------------------
def cell_inputs(n: int, probes: int, device: torch.device, gamma: float = 1.0):
    """Noised inputs, timesteps and probes of the cell (γ0, γ1) = (gamma, gamma)."""
    sched = make_schedule("lift_cosine", 1000)
    t = int(round(float(snr_to_timestep(torch.tensor([gamma], dtype=torch.float64), sched)[0])))
    sched = sched.to(device)
    x64 = real_images(n, device)
    x32 = F.avg_pool2d(x64, 2)
    g = torch.Generator(device=device).manual_seed(0)
    tt = torch.full((n,), t, device=device, dtype=torch.long)
    z64 = q_sample(x64, tt, torch.randn(x64.shape, generator=g, device=device), sched)
    z32 = q_sample(x32, tt, torch.randn(x32.shape, generator=g, device=device), sched)
    e64 = torch.randint(0, 2, (probes, *x64.shape), generator=g, device=device).float() * 2 - 1
    e32 = torch.randint(0, 2, (probes, *x32.shape), generator=g, device=device).float() * 2 - 1
    return dict(z64=z64, z32=z32, t=tt, e64=e64, e32=e32, sched=sched)


def cell_variants(model, inp) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """name -> a call returning the per-sample (v·vhv_64, v·vhv_32) of the cell."""
    z64, z32, t, e64, e32, sched = (inp[k] for k in ("z64", "z32", "t", "e64", "e32", "sched"))
    v64, v32 = 1.0 / (64 * 64), 1.0 / (32 * 32)

    def loop():
        with torch.no_grad():
            f64 = _ScaleFn(model, 0, z32, t, t, sched, "x0")
            f32 = _ScaleFn(model, 1, z64, t, t, sched, "x0")
            return (hutchinson_vhv_reference(f64, z64, e64, v=v64) * v64,
                    hutchinson_vhv_reference(f32, z32, e32, v=v32) * v32)

    def batched(step, amp_dtype=None):
        def run():
            with torch.no_grad():
                return (step(model, 0, z64, z32, t, t, e64, v64, None, sched, "x0", amp_dtype),
                        step(model, 1, z32, z64, t, t, e32, v32, None, sched, "x0", amp_dtype))
        return run

    def per_probe(step, amp_dtype=None):
        """The batched step called once per probe (K = 1 each), averaged: the loop, through ``step``."""
        def run():
            with torch.no_grad():
                k = e64.shape[0]
                return (sum(step(model, 0, z64, z32, t, t, e64[i:i + 1], v64, None, sched, "x0", amp_dtype)
                            for i in range(k)) / k,
                        sum(step(model, 1, z32, z64, t, t, e32[i:i + 1], v32, None, sched, "x0", amp_dtype)
                            for i in range(k)) / k)
        return run

    compiled = torch.compile(_scale_vhv, dynamic=False)
    return {"seed loop": loop,
            "loop+compile": per_probe(compiled),
            "loop+bf16": per_probe(_scale_vhv, torch.bfloat16),
            "batched": batched(_scale_vhv),
            "batched+compile": batched(compiled),
            "batched+compile+bf16": batched(compiled, torch.bfloat16)}


def cell_rows(timeit, device, size: str = "default", n: int = 16, probes: int = 8, names=None):
    """Yields one row per cell variant (all of them, or those in ``names``)."""
    model = build_model(size, device)
    inp = cell_inputs(n, probes, device)
    variants = cell_variants(model, inp)
    ref = [r.double().mean() for r in variants["seed loop"]()]
    for name, fn in variants.items():
        if names is not None and name not in names:
            continue
        us = timeit(fn, warmup=2, iters=5)
        out = [r.double().mean() for r in fn()]
        rel = max(abs(float(a / b) - 1.0) for a, b in zip(out, ref))
        yield {"op": "lift heatmap cell", "variant": "eager" if name == "seed loop" else name,
               "shape": f"{size} B={n} K={probes}", "time_us": us, "bytes": None,
               "note": f"{name}; max rel. diff of the cell value vs seed loop {rel:.1e}"}


# ---------------------------------------------------------------------------------------------
# training step
# ---------------------------------------------------------------------------------------------
def train_steps(device, size: str = "default", batch: int = 64) -> dict[str, Callable[[], Callable[[], None]]]:
    """name -> a maker of one training-step call; each row changes one thing from the previous."""
    loss_fn = LIFTLoss(make_schedule("lift_cosine", 1000))
    data = real_images(4 * batch, torch.device("cpu"))
    x_dev = data[:batch].to(device)

    def plain_loop(compile_model: bool, amp_dtype):
        model = build_model(size, device).train()
        run_model = torch.compile(model) if compile_model else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss, _ = loss_fn(run_model, x_dev)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return step

    def trainer_step():
        model = build_model(size, device).train()
        cfg = TrainConfig(steps=10**6, batch_size=batch, lr=1e-4, weight_decay=0.01, grad_clip=1.0,
                          optimizer_kwargs={"fused": True} if device.type == "cuda" else {},
                          amp="bf16", compile=True, ema_decay=0.9999, device=str(device),
                          checkpoint_every=0, save_final=False, log_every=10**6, progress=False,
                          out_dir=tempfile.mkdtemp(prefix="bench_lift_"))
        tr = Trainer(model, loss_fn, _ImageTensors(data), cfg)
        return tr.train_step

    return {"eager fp32": lambda: plain_loop(False, None),
            "compile fp32": lambda: plain_loop(True, None),
            "compile+bf16": lambda: plain_loop(True, torch.bfloat16),
            "dualdiff Trainer": trainer_step}


def train_rows(timeit, device, size: str = "default", batch: int = 64, names=None):
    """Yields one row per training-step variant (all of them, or those in ``names``)."""
    for name, make in train_steps(device, size, batch).items():
        if names is not None and name not in names:
            continue
        yield {"op": "lift train step", "variant": "eager" if name == "eager fp32" else name,
               "shape": f"{size} B={batch}", "time_us": timeit(make(), warmup=3, iters=10),
               "bytes": None, "note": name}


# ---------------------------------------------------------------------------------------------
# full heatmap, generation
# ---------------------------------------------------------------------------------------------
HEATMAP_VARIANTS = {"eager": {}, "compile": dict(compile=True), "compile+bf16": dict(compile=True, amp="bf16")}


def heatmap_case(device, size: str, num_points: int, n: int, probes: int):
    """(run, warm_points, cells_per_batch): ``run(points, **variant_kwargs)`` computes the
    heatmap; ``warm_points`` is the smallest grid with the same batch shapes as the full one
    (full batches of cells and the smaller last one), the warm-up of every variant."""
    model = build_model(size, device)
    sched = make_schedule("lift_cosine", 1000)
    x = real_images(n, device)
    cpb = auto_cells_per_batch(n, probes, None, device)
    cells = num_points * num_points
    warm = next((k for k in range(2, num_points + 1) if k * k >= cpb and k * k % cpb == cells % cpb), num_points)
    kw = dict(probes=probes, seed=0, cells_per_batch=cpb, progress=False)

    def run(points: int = num_points, **extra):
        return compute_error_heatmap(model, x, sched, num_points=points, **kw, **extra)
    return run, warm, cpb


def heatmap_rows(device, size: str = "default", num_points: int = 15, n: int = 16,
                 probes: int = 8, names=None):
    """Yields the whole grid's rows: eager fp32, compiled fp32, compiled bf16 (largest per-cell
    difference from eager; eager always runs, as their reference). Every variant is first run
    on the warm-up grid: compilation and first-call costs stay outside the timing, for all alike."""
    run, warm, cpb = heatmap_case(device, size, num_points, n, probes)
    maps = {}
    for name, extra in HEATMAP_VARIANTS.items():
        if names is not None and name != "eager" and name not in names:
            continue
        run(warm, **extra)
        res = {}
        sec = wall_seconds(lambda: res.setdefault("r", run(**extra)), device)
        maps[name] = res["r"]
        note = f"{num_points}x{num_points} cells, {cpb} per batch"
        if name != "eager":
            ref = maps["eager"]
            rel = max(float(((maps[name].error_64 - ref.error_64).abs() / ref.error_64).max()),
                      float(((maps[name].error_32 - ref.error_32).abs() / ref.error_32).max()))
            note += f"; max per-cell rel. diff vs eager fp32 {rel:.1e}"
        yield {"op": "lift heatmap", "variant": name, "shape": f"{size} B={n} K={probes}",
               "time_us": sec * 1e6, "bytes": None, "note": note}


def generate_rows(device, size: str = "default", n: int = 1000, steps: int = 50, batch: int = 250):
    """Yields the row of n images x steps DDIM steps along the diagonal path (warmed once)."""
    model = build_model(size, device)
    sched = make_schedule("lift_cosine", 1000)
    path = make_path("diagonal", sched, num_steps=steps)
    generate(model, path, min(batch, n), schedule=sched, device=device)  # warm-up

    def run():
        g = torch.Generator(device=device).manual_seed(0)
        for lo in range(0, n, batch):
            generate(model, path, min(batch, n - lo), schedule=sched, device=device, generator=g)
    sec = wall_seconds(run, device)
    yield {"op": "lift generate", "variant": "eager", "shape": f"{size} {n} images x {steps} steps",
           "time_us": sec * 1e6, "bytes": None, "note": f"batches of {batch}"}


def gpu_rows(timeit, device, smoke: bool = False):
    """Yields the issue's rows with the default 58.5 M model (with smoke: the tiny model, tiny
    sizes, eager variants only — compiling on the CPU takes minutes)."""
    device = torch.device(device)
    if smoke:
        eager = {"seed loop", "loop+bf16", "batched", "eager fp32", "eager"}
        yield from cell_rows(timeit, device, "tiny", 1, 2, names=eager)
        yield from train_rows(timeit, device, "tiny", 2, names=eager)
        yield from heatmap_rows(device, "tiny", 2, 1, 2, names=eager)
        yield from generate_rows(device, "tiny", 2, 2, 2)
        return
    yield from cell_rows(timeit, device, "default", 16, 8)
    yield from train_rows(timeit, device, "default", 64)
    yield from heatmap_rows(device, "default", 15, 16, 8)
    yield from generate_rows(device, "default", 1000, 50)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark (CPU, tiny model; smoke mode: smallest sizes, no warm-up, compiled variants
# skipped by benchmarks/conftest.py)
# ---------------------------------------------------------------------------------------------
SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
CPU = (dict(samples=1, probes=2, batch=2, points=2, images=2, steps=2, rounds=1, warmup=0) if SMOKE else
       dict(samples=4, probes=8, batch=16, points=4, images=32, steps=50, rounds=3, warmup=2))
CPU_DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def cell_case():
    model = build_model("tiny", CPU_DEVICE)
    variants = cell_variants(model, cell_inputs(CPU["samples"], CPU["probes"], CPU_DEVICE))
    return variants, [r.double().mean() for r in variants["seed loop"]()]


@pytest.mark.parametrize("variant", ["seed loop", "loop+compile", "loop+bf16", "batched", "batched+compile",
                                     "batched+compile+bf16"])
def test_cell(benchmark, cell_case, variant):
    variants, ref = cell_case
    fn = variants[variant]
    for _ in range(CPU["warmup"]):
        fn()
    benchmark.group = f"lift heatmap cell tiny B={CPU['samples']} K={CPU['probes']}"
    out = benchmark.pedantic(fn, rounds=CPU["rounds"], iterations=1)
    rel = max(abs(float(r.double().mean() / b) - 1.0) for r, b in zip(out, ref))
    assert rel < (1e-2 if "bf16" in variant else 1e-4), rel


@pytest.mark.parametrize("variant", ["eager fp32", "compile fp32", "compile+bf16",
                                     pytest.param("dualdiff Trainer", marks=pytest.mark.compiled)])
def test_train_step(benchmark, variant):
    step = train_steps(CPU_DEVICE, "tiny", CPU["batch"])[variant]()
    for _ in range(CPU["warmup"] + 1):
        step()
    benchmark.group = f"lift train step tiny B={CPU['batch']}"
    benchmark.pedantic(step, rounds=CPU["rounds"], iterations=1)


@pytest.mark.parametrize("variant", list(HEATMAP_VARIANTS))
def test_heatmap(benchmark, variant):
    run, warm, _ = heatmap_case(CPU_DEVICE, "tiny", CPU["points"], CPU["samples"], CPU["probes"])
    extra = HEATMAP_VARIANTS[variant]
    if CPU["warmup"]:
        run(warm, **extra)
    benchmark.group = f"lift heatmap tiny {CPU['points']}x{CPU['points']}"
    res = benchmark.pedantic(lambda: run(**extra), rounds=1, iterations=1)
    assert torch.isfinite(res.error_64).all() and (res.error_64 > 0).all()


def test_generate(benchmark):
    model = build_model("tiny", CPU_DEVICE)
    sched = make_schedule("lift_cosine", 1000)
    path = make_path("diagonal", sched, num_steps=CPU["steps"])

    def run():
        return generate(model, path, CPU["images"], schedule=sched, device=CPU_DEVICE,
                        generator=torch.Generator().manual_seed(0))
    for _ in range(CPU["warmup"]):
        run()
    benchmark.group = f"lift generate tiny {CPU['images']} images x {CPU['steps']} steps"
    x64, x32 = benchmark.pedantic(run, rounds=1, iterations=1)
    assert x64.shape == (CPU["images"], 3, 64, 64) and torch.isfinite(x64).all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=["tiny", "default"], default=None,
                   help="default on CUDA, tiny on the CPU")
    p.add_argument("--samples", type=int, default=None, help="B of the cell (16 on CUDA, 4 on the CPU)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="training batch (64 on CUDA, 16 on the CPU)")
    p.add_argument("--points", type=int, default=None, help="heatmap grid (15 on CUDA, 4 on the CPU)")
    p.add_argument("--images", type=int, default=None, help="generated images (1000 on CUDA, 32 on the CPU)")
    p.add_argument("--what", default="cell,train,heatmap,generate")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    size = a.model or ("default" if cuda else "tiny")
    if cuda:
        import pathlib
        import sys
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        from gpu_report import timeit
    else:
        timeit = cpu_timeit
    what = set(a.what.split(","))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}")
    print("| what | shape | variant | time | vs eager | note |")
    print("|---|---|---|---|---|---|", flush=True)
    groups = []
    if "cell" in what:
        groups.append(cell_rows(timeit, device, size, a.samples or (16 if cuda else 4), a.probes))
    if "train" in what:
        groups.append(train_rows(timeit, device, size, a.batch or (64 if cuda else 16)))
    if "heatmap" in what:
        groups.append(heatmap_rows(device, size, a.points or (15 if cuda else 4), a.samples or (16 if cuda else 4),
                                   a.probes))
    if "generate" in what:
        groups.append(generate_rows(device, size, a.images or (1000 if cuda else 32), 50, 250 if cuda else 32))
    base = {}
    for rows in groups:
        for r in rows:  # printed as each row is measured
            t = r["time_us"]
            if r["variant"] == "eager":
                base[(r["op"], r["shape"])] = t
            ts = f"{t / 1e6:.2f} s" if t >= 1e6 else f"{t / 1e3:.1f} ms"
            b = base.get((r["op"], r["shape"]))
            ratio = f"{b / t:.2f}x" if b else "-"
            print(f"| {r['op']} | {r['shape']} | {r['variant']} | {ts} | {ratio} | {r.get('note', '')} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
