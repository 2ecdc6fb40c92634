"""CPU benchmarks of the LIFT path solvers (dualdiff.analysis.paths), numba vs pure Python.

    pytest benchmarks/bench_paths.py --benchmark-only     # pytest-benchmark table
    python benchmarks/bench_paths.py                      # targets, times and speed-ups side by side

Targets (issue 4): seed DP on a 2000 x 2000 grid < 50 ms; fixed-step DP >= 200x faster than a
straightforward pure-Python implementation of the same algorithm at n = 60, 30 steps,
max_jump 8; fixed-step DP at n = 200, 50 steps, max_jump 10 < 2 s. Times exclude the one-off
numba compilation, which is measured and printed separately. No GPU rows: the solvers are CPU code.
Under plain ``pytest`` (smoke mode, see benchmarks/conftest.py) each body runs once on tiny grids.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np
import pytest

from dualdiff.analysis import paths as P

SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"
SEED_N = 40 if SMOKE else 2000
FIXED_SMALL = dict(n=8, num_steps=4, max_jump=2) if SMOKE else dict(n=60, num_steps=30, max_jump=8)
FIXED_LARGE = dict(n=12, num_steps=5, max_jump=3) if SMOKE else dict(n=200, num_steps=50, max_jump=10)


def heatmap(n: int, m: int | None = None, seed: int = 0):
    """A heatmap-like grid: error falling with SNR along both axes, plus noise; log-spaced γ."""
    m = n if m is None else m
    rng = np.random.default_rng(seed)
    g64 = np.logspace(-2, 2, n)
    g32 = np.logspace(-2, 2, m)
    base = 1.0 / np.add.outer(g64 * (1 + g64), 0.5 * g32 * (1 + g32))
    e64 = base * (1 + 0.3 * rng.random((n, m)))
    e32 = 0.5 * base * (1 + 0.3 * rng.random((n, m)))
    return e64, e32, g64, g32


# ---------------------------------------------------------------------------------------------
# pure-Python baselines (the same algorithms, written plainly: Python lists and loops)
# ---------------------------------------------------------------------------------------------


def fixed_step_pure_python(e64, e32, g64, g32, num_steps, max_jump, w64=1.0, w32=1.0):
    """Push-style layered DP over (step, i, j), as the public repository's version; returns (path, cost)."""
    n0, n1 = len(e64), len(e64[0])
    e64, e32 = e64.tolist(), e32.tolist()
    lam64 = [math.log(x) for x in g64]
    lam32 = [math.log(x) for x in g32]
    inf = math.inf
    dp = [[[inf] * n1 for _ in range(n0)] for _ in range(num_steps + 1)]
    parent = [[[None] * n1 for _ in range(n0)] for _ in range(num_steps + 1)]
    dp[0][0][0] = 0.0
    for k in range(num_steps):
        remaining = num_steps - k - 1
        for i in range(n0):
            for j in range(n1):
                here = dp[k][i][j]
                if here == inf:
                    continue
                for ni in range(i, min(i + max_jump + 1, n0)):
                    for nj in range(j, min(j + max_jump + 1, n1)):
                        if ni == i and nj == j:
                            continue
                        if (n0 - 1 - ni) + (n1 - 1 - nj) > remaining * 2 * max_jump:
                            continue
                        if remaining == 0 and (ni != n0 - 1 or nj != n1 - 1):
                            continue
                        c64 = (e64[i][j] + e64[ni][nj]) / 2 * abs(lam64[ni] - lam64[i])
                        c32 = (e32[i][j] + e32[ni][nj]) / 2 * abs(lam32[nj] - lam32[j])
                        new = here + c64 * w64 + c32 * w32
                        if new < dp[k + 1][ni][nj]:
                            dp[k + 1][ni][nj] = new
                            parent[k + 1][ni][nj] = (i, j)
    cost = dp[num_steps][n0 - 1][n1 - 1]
    if cost == inf:
        raise ValueError("no path")
    path = [(n0 - 1, n1 - 1)]
    for k in range(num_steps, 0, -1):
        path.append(parent[k][path[-1][0]][path[-1][1]])
    return np.array(path[::-1]), cost


def fixed_step_numpy_scalar(e64, e32, g64, g32, num_steps, max_jump):
    """The same push-style DP written like the public repository's version: Python loops indexing
    numpy arrays element by element (dp and parent as np.full tables). Returns (path, cost)."""
    n0, n1 = e64.shape
    lam64, lam32 = np.log(g64), np.log(g32)
    dp = np.full((n0, n1, num_steps + 1), np.inf)
    parent = np.full((n0, n1, num_steps + 1, 2), -1, dtype=int)
    dp[0, 0, 0] = 0.0
    for k in range(num_steps):
        remaining = num_steps - k - 1
        for i in range(n0):
            for j in range(n1):
                if dp[i, j, k] == np.inf:
                    continue
                for ni in range(i, min(i + max_jump + 1, n0)):
                    for nj in range(j, min(j + max_jump + 1, n1)):
                        if ni == i and nj == j:
                            continue
                        if (n0 - 1 - ni) + (n1 - 1 - nj) > remaining * 2 * max_jump:
                            continue
                        if remaining == 0 and (ni != n0 - 1 or nj != n1 - 1):
                            continue
                        c64 = (e64[i, j] + e64[ni, nj]) / 2 * abs(lam64[ni] - lam64[i])
                        c32 = (e32[i, j] + e32[ni, nj]) / 2 * abs(lam32[nj] - lam32[j])
                        new = dp[i, j, k] + c64 + c32
                        if new < dp[ni, nj, k + 1]:
                            dp[ni, nj, k + 1] = new
                            parent[ni, nj, k + 1] = (i, j)
    path = [(n0 - 1, n1 - 1)]
    for k in range(num_steps, 0, -1):
        path.append(tuple(parent[path[-1][0], path[-1][1], k]))
    return np.array(path[::-1]), float(dp[n0 - 1, n1 - 1, num_steps])


def seed_dp_pure_python(e64, e32):
    """The seed's running-minimum DP on the total error, in plain Python; returns (js, cost)."""
    c = (e64 + e32).tolist()
    n, m = len(c), len(c[0])
    inf = math.inf
    prev = [c[0][0]] + [inf] * (m - 1)
    parent = [[0] * m for _ in range(n)]
    for i in range(1, n):
        cur = [0.0] * m
        best, bk = inf, 0
        row, par = c[i], parent[i]
        for j in range(m):
            if prev[j] < best:
                best, bk = prev[j], j
            cur[j] = best + row[j]
            par[j] = bk
        prev = cur
    end = min(range(m), key=prev.__getitem__)
    js = [end]
    for i in range(n - 1, 0, -1):
        js.append(parent[i][js[-1]])
    return np.array(js[::-1]), prev[end]


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_grid():
    e64, e32, _, _ = heatmap(SEED_N, seed=1)
    P.seed_dp_path(e64[:4, :4], e32[:4, :4])  # jit outside the timed region
    P.seed_dp_path(e64[:4, :4], objective="64")
    return e64, e32


@pytest.fixture(scope="module")
def fixed_small():
    e64, e32, g64, g32 = heatmap(FIXED_SMALL["n"], seed=2)
    P.fixed_step_path(e64[:5, :5], e32[:5, :5], g64[:5], g32[:5], num_steps=3, max_jump=2)
    return e64, e32, g64, g32


@pytest.mark.benchmark(group=f"seed_dp {SEED_N}x{SEED_N}")
@pytest.mark.parametrize("objective", ["total", "64"])
def test_seed_dp(benchmark, seed_grid, objective):
    e64, e32 = seed_grid
    p = benchmark(P.seed_dp_path, e64, e32, objective=objective)
    assert len(p) == SEED_N


@pytest.mark.benchmark(group="fixed_step n{n} s{num_steps} j{max_jump}".format(**FIXED_SMALL))
def test_fixed_step_small_numba(benchmark, fixed_small):
    e64, e32, g64, g32 = fixed_small
    p = benchmark(P.fixed_step_path, e64, e32, g64, g32,
                  num_steps=FIXED_SMALL["num_steps"], max_jump=FIXED_SMALL["max_jump"])
    assert len(p) == FIXED_SMALL["num_steps"] + 1


@pytest.mark.benchmark(group="fixed_step n{n} s{num_steps} j{max_jump}".format(**FIXED_SMALL))
def test_fixed_step_small_pure_python(benchmark, fixed_small):
    e64, e32, g64, g32 = fixed_small
    path, cost = benchmark.pedantic(
        fixed_step_pure_python, args=(e64, e32, g64, g32, FIXED_SMALL["num_steps"], FIXED_SMALL["max_jump"]),
        rounds=1, iterations=1,
    )
    fast = P.fixed_step_path(e64, e32, g64, g32, num_steps=FIXED_SMALL["num_steps"], max_jump=FIXED_SMALL["max_jump"])
    np.testing.assert_array_equal(fast.points, path)
    assert fast.cost == cost


@pytest.mark.benchmark(group="fixed_step n{n} s{num_steps} j{max_jump}".format(**FIXED_LARGE))
def test_fixed_step_large_numba(benchmark, fixed_small):
    e64, e32, g64, g32 = heatmap(FIXED_LARGE["n"], seed=3)
    p = benchmark.pedantic(
        P.fixed_step_path, args=(e64, e32, g64, g32),
        kwargs=dict(num_steps=FIXED_LARGE["num_steps"], max_jump=FIXED_LARGE["max_jump"]),
        rounds=3, iterations=1, warmup_rounds=0,
    )
    assert len(p) == FIXED_LARGE["num_steps"] + 1


# ---------------------------------------------------------------------------------------------
# python benchmarks/bench_paths.py
# ---------------------------------------------------------------------------------------------


def _measure(fn, reps: int):
    """(median wall seconds, median CPU seconds of this process, last result) over reps calls.
    The CPU time is the steadier number on a shared machine (the solvers are single-threaded)."""
    walls, cpus, out = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    rows = []  # (case, variant, wall s, cpu s)

    # compile times (first call), separately
    e64, e32, g64, g32 = heatmap(6, seed=0)
    t0 = time.perf_counter()
    P.seed_dp_path(e64, e32)
    t_compile_seed = time.perf_counter() - t0
    t0 = time.perf_counter()
    P.fixed_step_path(e64, e32, g64, g32, num_steps=4, max_jump=2)
    t_compile_fixed = time.perf_counter() - t0

    # seed DP, 2000 x 2000
    e64, e32, _, _ = heatmap(SEED_N, seed=1)
    P.seed_dp_path(e64, e32, objective="64")
    w, c, fast = _measure(lambda: P.seed_dp_path(e64, e32), 15)
    rows.append(("seed DP total 2000x2000", "numba", w, c))
    w, c, _ = _measure(lambda: P.seed_dp_path(e64, e32, objective="64"), 15)
    rows.append(("seed DP 64-only 2000x2000", "numba", w, c))
    w, c, (js_py, cost_py) = _measure(lambda: seed_dp_pure_python(e64, e32), 1)
    assert np.array_equal(fast.j, js_py) and fast.cost == pytest.approx(cost_py, rel=1e-12)
    rows.append(("seed DP total 2000x2000", "pure Python (lists)", w, c))

    # fixed-step DP, n = 60, 30 steps, max_jump 8
    e64, e32, g64, g32 = heatmap(FIXED_SMALL["n"], seed=2)
    kw = dict(num_steps=FIXED_SMALL["num_steps"], max_jump=FIXED_SMALL["max_jump"])
    w, c, fast = _measure(lambda: P.fixed_step_path(e64, e32, g64, g32, **kw), 15)
    rows.append(("fixed-step n=60 S=30 J=8", "numba", w, c))
    for name, fn in (("pure Python (lists)", fixed_step_pure_python),
                     ("pure Python (numpy scalars)", fixed_step_numpy_scalar)):
        w, c, (path_py, cost_py) = _measure(
            lambda fn=fn: fn(e64, e32, g64, g32, kw["num_steps"], kw["max_jump"]), 1)
        assert np.array_equal(fast.points, path_py) and fast.cost == cost_py, f"numba and {name} disagree"
        rows.append(("fixed-step n=60 S=30 J=8", name, w, c))

    # fixed-step DP, n = 200, 50 steps, max_jump 10
    e64, e32, g64, g32 = heatmap(FIXED_LARGE["n"], seed=3)
    kw = dict(num_steps=FIXED_LARGE["num_steps"], max_jump=FIXED_LARGE["max_jump"])
    w, c, _ = _measure(lambda: P.fixed_step_path(e64, e32, g64, g32, **kw), 5)
    rows.append(("fixed-step n=200 S=50 J=10", "numba", w, c))

    fast_of = {case: (w, c) for case, variant, w, c in rows if variant == "numba"}
    print(f"numba compile (first call, wall): seed DP {t_compile_seed:.2f} s, fixed-step DP {t_compile_fixed:.2f} s")
    print(f"{'case':28s} {'variant':28s} {'wall':>10s} {'cpu':>10s} {'numba speed-up wall / cpu':>26s}")
    for case, variant, w, c in rows:
        fw, fc = fast_of[case]
        ratio = "" if variant == "numba" else f"{w / fw:9.0f}x / {c / fc:.0f}x"
        print(f"{case:28s} {variant:28s} {w * 1e3:8.2f}ms {c * 1e3:8.2f}ms {ratio:>26s}")
    targets = [
        ("seed DP 2000x2000 < 50 ms", fast_of["seed DP total 2000x2000"][0] < 0.05),
        ("fixed-step n=60: >= 200x the pure-Python (lists) baseline, wall",
         [w for case, v, w, c in rows if v == "pure Python (lists)" and case.startswith("fixed")][0]
         / fast_of["fixed-step n=60 S=30 J=8"][0] >= 200),
        ("fixed-step n=200 < 2 s", fast_of["fixed-step n=200 S=50 J=10"][0] < 2.0),
    ]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
