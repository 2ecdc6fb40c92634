"""GPU report: for each op, time, ratio to eager, achieved GB/s and share of the copy bandwidth.

Usage (on a CUDA machine):  python benchmarks/gpu_report.py [--out rows.json] [--only ...] [--skip ...]
Smoke run of the same code path on the CPU (tests/test_benchmarks_smoke.py does this):
                            python benchmarks/gpu_report.py --device cpu --smoke

Each ``benchmarks/bench_<op>.py`` defines ``gpu_rows(timeit, device, smoke=False)`` returning or
yielding dicts with keys op, variant, shape, time_us and bytes (the minimum bytes the op must
move: every input read once, every output written once; None where not memory-bound); the row
whose variant is "eager" is the baseline of its (op, shape). ``smoke=True`` asks for the
smallest sizes. This script measures the copy bandwidth in the same run, then prints every row
as soon as it is measured (flushed, and rewrites ``--out`` after each row), so a run killed at
a time limit keeps every finished row. A module that raises is reported as a FAILED row with
its traceback on stderr; the others still run, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import pathlib
import sys
import time
import traceback
from typing import Callable, Iterable

import torch

HERE = pathlib.Path(__file__).resolve().parent
HEADER = "| op | shape | variant | time (µs) | vs eager | GB/s | % copy BW | note |"


def timeit(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50) -> float:
    """Median time of ``fn`` in microseconds on the current CUDA device: CUDA events around
    each call, the end event synchronised (so host launch overhead counts)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def cpu_timeit(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50) -> float:
    """Median wall time of ``fn`` in microseconds (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def smoke_timer(timer: Callable[..., float]) -> Callable[..., float]:
    """``timer`` with one warm-up and one timed call, whatever the caller asks for."""
    return lambda fn, **_: timer(fn, warmup=1, iters=1)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Copy bandwidth in bytes/s (read + write) of an ``nbytes`` device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = timeit if device.type == "cuda" else cpu_timeit
    t_us = timer(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * nbytes / (t_us * 1e-6)


def load_bench_modules(only: list[str] | None = None, skip: Iterable[str] = ()) -> list:
    """The ``bench_*.py`` modules that define ``gpu_rows``: all (sorted) or ``only`` (in its order)."""
    paths = sorted(HERE.glob("bench_*.py"))
    if only:  # in the order given
        missing = [name for name in only if not (HERE / f"{name}.py").is_file()]
        if missing:
            raise SystemExit(f"gpu_report.py: no benchmarks/{missing[0]}.py (--only)")
        paths = [HERE / f"{name}.py" for name in only]
    mods = []
    for path in paths:
        if path.stem in skip:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if hasattr(mod, "gpu_rows"):
            mods.append(mod)
    return mods


def format_row(r: dict, eager_us: float | None, copy_bw: float) -> str:
    """One markdown row; fills r's gb_per_s, copy_share and speedup_vs_eager."""
    gbs = r["bytes"] / (r["time_us"] * 1e-6) / 1e9 if r.get("bytes") else None
    r["gb_per_s"] = gbs
    r["copy_share"] = gbs * 1e9 / copy_bw if gbs else None
    r["speedup_vs_eager"] = eager_us / r["time_us"] if eager_us else None
    ratio = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
    bw = f"{gbs:.0f} | {100 * r['copy_share']:.0f} %" if gbs else "- | -"
    return (f"| {r['op']} | {r['shape']} | {r['variant']} | {r['time_us']:.1f} | {ratio} | {bw} | "
            f"{r.get('note', '')} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here (rewritten after each row)")
    parser.add_argument("--only", help="comma-separated bench module names (e.g. bench_weighted_dice)")
    parser.add_argument("--skip", help="comma-separated bench module names to leave out (e.g. bench_lift)")
    parser.add_argument("--device", default="cuda", help="cuda (the report) or cpu (a smoke run of its code path)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, one timed call per row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_report.py: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"gpu_report.py: --device must be cuda or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    timer = timeit if device.type == "cuda" else cpu_timeit
    if args.smoke:
        timer = smoke_timer(timer)
    bw = copy_bandwidth(device, (1 << 30) if not args.smoke else (1 << 22))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.3f} TB/s"
          + ("  (smoke sizes)" if args.smoke else ""), flush=True)
    print(HEADER)
    print("|" + "---|" * 8, flush=True)
    only = args.only.split(",") if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    report = {"device": name, "torch": torch.__version__, "copy_bw": bw, "rows": [], "failed": []}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    mods = load_bench_modules(only, skip)
    if not mods:
        print(f"gpu_report.py: no bench module with gpu_rows matches --only/--skip", file=sys.stderr)
        return 2
    eager: dict[tuple, float] = {}
    for mod in mods:
        kwargs = {"smoke": True} if args.smoke else {}
        try:
            if args.smoke and "smoke" not in inspect.signature(mod.gpu_rows).parameters:
                raise TypeError(f"{mod.__name__}.gpu_rows has no smoke parameter")
            for r in mod.gpu_rows(timer, device, **kwargs):
                r = dict(r, module=mod.__name__)
                if r["variant"] == "eager":
                    eager[(r["op"], r["shape"])] = r["time_us"]
                print(format_row(r, eager.get((r["op"], r["shape"])), bw), flush=True)
                report["rows"].append(r)
                save()
        except Exception as exc:  # report it, go on with the other modules, exit non-zero
            print(f"| {mod.__name__} | - | FAILED | - | - | - | - | {type(exc).__name__}: {exc} |", flush=True)
            traceback.print_exc()
            sys.stderr.flush()
            report["failed"].append({"module": mod.__name__, "error": f"{type(exc).__name__}: {exc}"})
            save()
    save()
    if report["failed"]:
        print(f"gpu_report.py: {len(report['failed'])} module(s) FAILED: "
              + ", ".join(f["module"] for f in report["failed"]), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
