"""GPU report: for each op, time, achieved GB/s and share of the device copy bandwidth.

Usage (on a CUDA machine):  python benchmarks/gpu_report.py [--out results.json]

Each ``benchmarks/bench_<op>.py`` defines ``gpu_rows(timeit, device) -> list[dict]`` with keys
op, variant, shape, time_us and bytes (the minimum bytes the op must move: every input read
once, every output written once; None where not memory-bound). This script measures the
copy bandwidth in the same run, calls every ``gpu_rows`` and prints one table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
from typing import Callable

import torch

HERE = pathlib.Path(__file__).resolve().parent


def timeit(fn: Callable[[], object], *, warmup: int = 10, iters: int = 50) -> float:
    """Median time of ``fn`` in microseconds, CUDA events around each call (sync per call)."""
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


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (read + write) from a 1 GiB device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_us = timeit(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * nbytes / (t_us * 1e-6)


def load_bench_modules() -> list:
    mods = []
    for path in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if hasattr(mod, "gpu_rows"):
            mods.append(mod)
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
    parser.add_argument("--only", help="comma-separated bench module names (e.g. bench_weighted_dice)")
    parser.add_argument("--skip", help="comma-separated bench module names to leave out (e.g. bench_lift)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"# {torch.cuda.get_device_name(device)}  torch {torch.__version__}  copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    for mod in load_bench_modules():
        if (only and mod.__name__ not in only) or mod.__name__ in skip:
            continue
        try:
            rows.extend(mod.gpu_rows(timeit, device))
        except Exception as exc:  # report and go on with the other ops
            print(f"{mod.__name__}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
    eager = {(r["op"], r["shape"]): r["time_us"] for r in rows if r["variant"] == "eager"}
    header = f"| op | shape | variant | time (µs) | vs eager | GB/s | % copy BW | note |"
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        gbs = r["bytes"] / (r["time_us"] * 1e-6) / 1e9 if r.get("bytes") else None
        r["gb_per_s"] = gbs
        r["copy_share"] = gbs * 1e9 / bw if gbs else None
        base = eager.get((r["op"], r["shape"]))
        r["speedup_vs_eager"] = base / r["time_us"] if base else None
        print(
            f"| {r['op']} | {r['shape']} | {r['variant']} | {r['time_us']:.1f} | "
            f"{r['speedup_vs_eager']:.2f}x | " if r["speedup_vs_eager"] else f"| {r['op']} | {r['shape']} | {r['variant']} | {r['time_us']:.1f} | - | ",
            end="",
        )
        print(f"{gbs:.0f} | {100 * r['copy_share']:.0f} % |" if gbs else "- | - |", r.get("note", ""), "|")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device),
                                        "torch": torch.__version__, "copy_bw": bw, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
