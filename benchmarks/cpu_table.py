"""The README's CPU performance table: medians measured side by side, printed as markdown.

    python benchmarks/cpu_table.py [--threads 1] [--rounds 15] [--lift-compile]

Each row times a fast variant and its baseline on the same inputs, interleaved (round-robin over
the two, ``rounds`` rounds of ``reps`` calls each; the median of the per-round means), so load
from other processes hits both alike. One torch thread by default (the steadiest on a shared
machine). The header gives the CPU, the torch version and the load average before and after: a
table from a loaded machine says so. Warm-up: every variant is called a few times before the
rounds (numba and torch.compile compile there).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import platform
import statistics
import time
from typing import Callable

import torch

HERE = pathlib.Path(__file__).resolve().parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, reps: int, warmup: int = 3) -> dict[str, float]:
    """name -> median over ``rounds`` of the mean call time (µs) of ``reps`` calls, round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def _fmt(us: float) -> str:
    return f"{us / 1e6:.2f} s" if us >= 1e6 else f"{us / 1e3:.2f} ms" if us >= 1e3 else f"{us:.0f} µs"


def op_rows(rounds: int):
    """cpp backend vs eager PyTorch, forward + backward, fp32."""
    dice = _bench("bench_weighted_dice")
    from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference

    for shape, act in [((8, 4, 64, 64), "sigmoid"), ((8, 4, 64, 64), "softmax"), ((16, 4, 128, 128), "sigmoid"),
                       ((16, 4, 128, 128), "softmax"), ((2, 4, 64, 64, 64), "sigmoid"), ((2, 4, 64, 64, 64), "softmax")]:
        torch.manual_seed(0)
        x, g, w = dice._inputs(shape, "cpu")
        cpp = lambda x, g, w, activation: weighted_dice_loss(x, g, w, activation=activation, backend="cpp")
        res = interleaved({"eager": dice._step(weighted_dice_loss_reference, x, g, w, act),
                           "cpp": dice._step(cpp, x, g, w, act)}, rounds, 10)
        yield (f"weighted_dice_loss fwd+bwd, {act}", "x".join(map(str, shape)), "cpp", "eager PyTorch", res["cpp"],
               res["eager"])
    vae = _bench("bench_vae_loss")
    fns = vae.variants(torch.device("cpu"))
    for shape in [(16, 3, 64, 64), (64, 3, 64, 64)]:
        inputs = vae.make_inputs(shape, 256, "cpu")
        res = interleaved({"eager": vae.step_fn(fns["eager"], inputs), "cpp": vae.step_fn(fns["cpp"], inputs)},
                          rounds, 10)
        yield ("vae_loss fwd+bwd (BCE + KL)", "x".join(map(str, shape)) + ", latent 256", "cpp",
               "eager PyTorch (the β-VAE script's loss)", res["cpp"], res["eager"])


def path_rows(rounds: int):
    """numba path solvers vs the same algorithm in pure Python."""
    paths = _bench("bench_paths")
    from dualdiff.analysis import paths as P

    e64, e32, _, _ = paths.heatmap(paths.SEED_N, seed=1)
    res = interleaved({"numba": lambda: P.seed_dp_path(e64, e32),
                       "python": lambda: paths.seed_dp_pure_python(e64, e32)}, max(3, rounds // 3), 1, warmup=1)
    yield (f"seed DP path", f"{paths.SEED_N}x{paths.SEED_N}", "numba", "pure Python", res["numba"], res["python"])
    e64, e32, g64, g32 = paths.heatmap(paths.FIXED_SMALL["n"], seed=2)
    kw = dict(num_steps=paths.FIXED_SMALL["num_steps"], max_jump=paths.FIXED_SMALL["max_jump"])
    res = interleaved({"numba": lambda: P.fixed_step_path(e64, e32, g64, g32, **kw),
                       "python": lambda: paths.fixed_step_pure_python(e64, e32, g64, g32, kw["num_steps"], kw["max_jump"])},
                      max(3, rounds // 3), 1, warmup=1)
    yield ("fixed-step DP path", "n={n}, {num_steps} steps, max_jump {max_jump}".format(**paths.FIXED_SMALL), "numba",
           "pure Python", res["numba"], res["python"])
    e64, e32, g64, g32 = paths.heatmap(paths.FIXED_LARGE["n"], seed=3)
    kw = dict(num_steps=paths.FIXED_LARGE["num_steps"], max_jump=paths.FIXED_LARGE["max_jump"])
    res = interleaved({"numba": lambda: P.fixed_step_path(e64, e32, g64, g32, **kw)}, max(3, rounds // 3), 1, warmup=1)
    yield ("fixed-step DP path", "n={n}, {num_steps} steps, max_jump {max_jump}".format(**paths.FIXED_LARGE), "numba",
           "-", res["numba"], None)


def lift_rows(rounds: int, compile_: bool):
    """One heatmap cell (tiny LIFT model, B=4, K=8) against the seed's per-probe jvp loop."""
    lift = _bench("bench_lift")
    dev = torch.device("cpu")
    variants = lift.cell_variants(lift.build_model("tiny", dev), lift.cell_inputs(4, 8, dev))
    names = ["seed loop", "loop+bf16", "batched"] + (["loop+compile", "batched+compile", "batched+compile+bf16"]
                                                    if compile_ else [])
    res = interleaved({n: variants[n] for n in names}, max(3, rounds // 3), 1, warmup=2)
    for n in names[1:]:
        yield ("LIFT heatmap cell (tiny model)", "B=4, K=8", n, "seed loop (per-probe jvp, eager fp32)", res[n],
               res["seed loop"])


def train_rows(rounds: int):
    """The tiny LIFT model's training step at 64x64 (B=8, fused AdamW; the README demo's step
    until the demo moved to 32x32) with dualdiff's GroupNorm on ``F.group_norm`` (its path
    outside forward AD) against its forward-AD-safe composite (every call before 2026-12-01)."""
    import contextlib

    from dualdiff.experiments.lift import LIFTConfig, LIFTLoss, build_lift_model, build_lift_schedule
    from dualdiff.nn.layers import GroupNorm

    @contextlib.contextmanager
    def composite_group_norm():
        native = GroupNorm.forward
        GroupNorm.forward = lambda self, x: self._composite(x, x)
        try:
            yield
        finally:
            GroupNorm.forward = native

    cfg = LIFTConfig.from_name("tiny")
    cfg.model.image_size = cfg.data.image_size = 64
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def make(composite: bool):
        torch.manual_seed(0)
        model = build_lift_model(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        loss_fn = LIFTLoss(build_lift_schedule(cfg))

        def step():
            with composite_group_norm() if composite else contextlib.nullcontext():
                loss, _ = loss_fn(model, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return step

    res = interleaved({"native": make(False), "composite": make(True)}, max(3, rounds // 2), 2, warmup=2)
    yield ("LIFT tiny training step", "B=8, 64x64", "GroupNorm on F.group_norm", "GroupNorm composite",
           res["native"], res["composite"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--lift-compile", action="store_true", help="add the compiled LIFT cell variants (slow to compile)")
    p.add_argument("--what", default="ops,paths,lift,train")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load0 = os.getloadavg()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} torch thread(s), "
          f"medians of {a.rounds} interleaved rounds; load average before: {load0[0]:.2f}", flush=True)
    print()
    print("| what | shape | fast | baseline | fast (median) | baseline (median) | speed-up |")
    print("|---|---|---|---|---|---|---|", flush=True)
    what = set(a.what.split(","))
    groups = ([op_rows(a.rounds)] if "ops" in what else []) + ([path_rows(a.rounds)] if "paths" in what else []) \
        + ([lift_rows(a.rounds, a.lift_compile)] if "lift" in what else []) \
        + ([train_rows(a.rounds)] if "train" in what else [])
    for rows in groups:
        for what_, shape, fast, base, t_fast, t_base in rows:
            ratio = f"{t_base / t_fast:.2f}x" if t_base else "-"
            print(f"| {what_} | {shape} | {fast} | {base} | {_fmt(t_fast)} | {_fmt(t_base) if t_base else '-'} | "
                  f"{ratio} |", flush=True)
    load1 = os.getloadavg()
    print()
    print(f"load average after: {load1[0]:.2f} (1 min), {load1[1]:.2f} (5 min) on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
