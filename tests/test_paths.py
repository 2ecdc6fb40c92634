"""DP / greedy paths through the LIFT heatmap and path -> γ schedules (dualdiff.analysis.paths).

Both DPs are checked against brute force (every valid path enumerated) on small random grids,
for each objective, including exact ties (integer-valued grids) where the documented
tie-break rule decides.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from dualdiff.analysis import (
    GammaSchedule,
    GridPath,
    NoPathError,
    diagonal_schedule,
    fixed_step_path,
    fixed_step_path_cost,
    fixed_step_schedule,
    greedy_path,
    seed_dp_path,
    seed_path_schedule,
)

# ---------------------------------------------------------------------------------------------
# brute force references (independent of the module)
# ---------------------------------------------------------------------------------------------


def cell_cost(e64, e32, objective, weight=None):
    if objective == "total":
        return e64.astype(np.float64) + e32.astype(np.float64)
    if objective == "64":
        return e64.astype(np.float64)
    return weight * e64.astype(np.float64) + (1 - weight) * e32.astype(np.float64)


def brute_seed(cost):
    """All j sequences with j_0 = 0, non-decreasing: (best cost, chosen js) with the documented
    tie rule: among optimal paths, the smallest last j, then the smallest j before it, ..."""
    n, m = cost.shape
    best, best_key, best_js = math.inf, None, None
    for tail in itertools.combinations_with_replacement(range(m), n - 1):
        js = (0,) + tail  # combinations_with_replacement yields non-decreasing tuples
        c = 0.0
        for i, j in enumerate(js):
            c = c + cost[i, j]
        key = tuple(reversed(js))
        if c < best or (c == best and key < best_key):
            best, best_key, best_js = c, key, js
    return best, np.array(best_js)


def brute_fixed(e64, e32, lam64, lam32, w64, w32, num_steps, max_jump):
    """Every path of exactly num_steps moves (0,0) -> (n0-1,n1-1): (best cost, points) or (inf, None).
    Tie rule: among optimal paths the smallest point sequence read backwards from the end."""
    n0, n1 = e64.shape
    moves = [(a, b) for a in range(max_jump + 1) for b in range(max_jump + 1) if (a, b) != (0, 0)]
    found = []

    def rec(pts, cost):
        i, j = pts[-1]
        left = num_steps - (len(pts) - 1)
        if left == 0:
            if (i, j) == (n0 - 1, n1 - 1):
                found.append((cost, pts))
            return
        for a, b in moves:
            ni, nj = i + a, j + b
            if ni >= n0 or nj >= n1:
                continue
            c64 = (e64[i, j] + e64[ni, nj]) / 2 * abs(lam64[ni] - lam64[i])
            c32 = (e32[i, j] + e32[ni, nj]) / 2 * abs(lam32[nj] - lam32[j])
            rec(pts + [(ni, nj)], cost + c64 * w64 + c32 * w32)

    rec([(0, 0)], 0.0)
    if not found:
        return math.inf, None
    best = min(c for c, _ in found)
    ties = [p for c, p in found if c == best]
    chosen = min(ties, key=lambda p: tuple(reversed(p[:-1])))
    return best, np.array(chosen)


OBJ_WEIGHTS = {"total": (1.0, 1.0), "64": (1.0, 0.0), "32": (0.0, 1.0)}
OBJECTIVE_IDS = {"total": 0, "64": 1, "weighted": 2, "32": 3}


# ---------------------------------------------------------------------------------------------
# seed DP
# ---------------------------------------------------------------------------------------------

SEED_SHAPES = [(1, 1), (1, 4), (4, 1), (2, 3), (5, 5), (6, 4), (4, 6), (6, 6)]


@pytest.mark.parametrize("shape", SEED_SHAPES)
@pytest.mark.parametrize("objective,weight", [("total", None), ("64", None), ("weighted", 0.3)])
def test_seed_dp_matches_brute_force_random(shape, objective, weight):
    rng = np.random.default_rng([shape[0], shape[1], OBJECTIVE_IDS[objective]])
    for _ in range(3):
        e64 = rng.random(shape) * rng.choice([1e-3, 1.0, 1e3])
        e32 = rng.random(shape)
        p = seed_dp_path(e64, e32, objective=objective, weight=weight)
        best, js = brute_seed(cell_cost(e64, e32, objective, weight))
        assert isinstance(p, GridPath) and p.method == "seed_dp"
        np.testing.assert_array_equal(p.i, np.arange(shape[0]))
        np.testing.assert_array_equal(p.j, js)
        assert p.cost == pytest.approx(best, rel=1e-12)
        assert p.j[0] == 0 and (np.diff(p.j) >= 0).all()


@pytest.mark.parametrize("objective,weight", [("total", None), ("64", None), ("weighted", 0.5)])
def test_seed_dp_ties_deterministic(objective, weight):
    """Integer grids with many exact ties: the documented tie rule, bit for bit, every time."""
    rng = np.random.default_rng(7)
    for shape in [(4, 4), (5, 6), (6, 5), (6, 6)]:
        for _ in range(4):
            e64 = rng.integers(0, 3, shape).astype(np.float64)
            e32 = rng.integers(0, 3, shape).astype(np.float64)
            best, js = brute_seed(cell_cost(e64, e32, objective, weight))
            p1 = seed_dp_path(e64, e32, objective=objective, weight=weight)
            p2 = seed_dp_path(e64.copy(), e32.copy(), objective=objective, weight=weight)
            assert p1.cost == best
            np.testing.assert_array_equal(p1.j, js)
            np.testing.assert_array_equal(p1.points, p2.points)


def test_seed_dp_all_equal_grid_stays_at_zero():
    p = seed_dp_path(np.ones((7, 9)), np.ones((7, 9)))
    np.testing.assert_array_equal(p.j, np.zeros(7))
    assert p.cost == 14.0


def test_seed_dp_medium_grid_vs_naive_quadratic_dp():
    """A 40x33 grid against an O(N·M²) textbook DP written here."""
    rng = np.random.default_rng(3)
    e64, e32 = rng.random((40, 33)), rng.random((40, 33))
    c = e64 + e32
    n, m = c.shape
    d = np.full((n, m), np.inf)
    d[0, 0] = c[0, 0]
    for i in range(1, n):
        for j in range(m):
            d[i, j] = min(d[i - 1, : j + 1]) + c[i, j]
    p = seed_dp_path(e64, e32)
    assert p.cost == pytest.approx(d[-1].min(), rel=1e-12)
    assert p.j[-1] == int(np.argmin(d[-1]))
    # the path's own cost equals the reported cost
    assert sum(c[i, j] for i, j in p.points) == pytest.approx(p.cost, rel=1e-12)


def test_seed_dp_float32_and_torch_inputs():
    rng = np.random.default_rng(4)
    e64 = rng.random((30, 20)).astype(np.float32)
    e32 = rng.random((30, 20)).astype(np.float32)
    ref = seed_dp_path(e64.astype(np.float64), e32.astype(np.float64))
    p32 = seed_dp_path(e64, e32)
    pt = seed_dp_path(torch.from_numpy(e64), torch.from_numpy(e32))
    np.testing.assert_array_equal(p32.points, ref.points)
    np.testing.assert_array_equal(pt.points, ref.points)
    assert p32.cost == pytest.approx(ref.cost, rel=1e-12)
    # mixed dtypes are promoted
    pm = seed_dp_path(e64, e32.astype(np.float64))
    np.testing.assert_array_equal(pm.points, ref.points)


def test_seed_dp_objective_changes_path():
    """The 64-only objective ignores e32: a wall of high e32 blocks only the total objective."""
    e64 = np.ones((5, 5))
    e64[:, 0] = 2.0  # 64 error prefers leaving column 0 early
    e32 = np.zeros((5, 5))
    e32[:, 1:] = 10.0  # 32 error punishes leaving column 0
    assert (seed_dp_path(e64, e32, objective="total").j == 0).all()
    assert (seed_dp_path(e64, e32, objective="64").j[1:] >= 1).all()


# ---------------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------------


def greedy_reference(cost, tol):
    n, m = cost.shape
    js = [0]
    for i in range(1, n):
        cur = js[-1]
        row = list(cost[i, cur:])
        lo, hi = min(row), max(row)
        if lo > 0 and (hi - lo) / lo < tol:
            j = min(i, m - 1)
        else:
            j = cur + row.index(lo)
        js.append(max(j, cur))
    return np.array(js)


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.5])
def test_greedy_matches_reference_and_is_dominated_by_dp(tol):
    rng = np.random.default_rng(11)
    for shape in [(1, 1), (6, 6), (9, 5), (5, 9), (15, 15)]:
        e64 = 1.0 + rng.random(shape) * rng.choice([0.02, 1.0])
        e32 = rng.random(shape)
        g = greedy_path(e64, e32, tolerance=tol)  # seed default objective: 64x64 error
        np.testing.assert_array_equal(g.j, greedy_reference(e64, tol))
        assert g.j[0] == 0 and (np.diff(g.j) >= 0).all()
        assert g.cost == pytest.approx(sum(e64[i, j] for i, j in g.points), rel=1e-12)
        # greedy paths are valid seed paths, so the DP is never worse
        assert seed_dp_path(e64, objective="64").cost <= g.cost + 1e-12
        gt = greedy_path(e64, e32, objective="total", tolerance=tol)
        np.testing.assert_array_equal(gt.j, greedy_reference(e64 + e32, tol))


def test_greedy_flat_rows_take_diagonal():
    e = np.full((6, 6), 3.0)
    np.testing.assert_array_equal(greedy_path(e).j, np.arange(6))
    np.testing.assert_array_equal(greedy_path(e, tolerance=0.0).j, np.zeros(6))


# ---------------------------------------------------------------------------------------------
# fixed-step DP
# ---------------------------------------------------------------------------------------------

FIXED_CASES = [  # (n0, n1, num_steps, max_jump)
    (2, 2, 1, 1),
    (3, 3, 2, 1),
    (4, 4, 3, 2),
    (4, 4, 5, 1),
    (5, 5, 3, 2),
    (5, 5, 4, 3),
    (5, 4, 4, 2),
    (3, 5, 3, 2),
    (5, 5, 7, 2),
]


@pytest.mark.parametrize("objective", ["total", "64", "32"])
@pytest.mark.parametrize("n0,n1,steps,mj", FIXED_CASES)
def test_fixed_step_matches_brute_force_random(objective, n0, n1, steps, mj):
    rng = np.random.default_rng(n0 * 1000 + n1 * 100 + steps * 10 + mj)
    e64, e32 = rng.random((n0, n1)), rng.random((n0, n1))
    g64 = np.sort(rng.uniform(0.01, 100, n0))
    g32 = np.sort(rng.uniform(0.01, 100, n1))
    w64, w32 = OBJ_WEIGHTS[objective]
    best, pts = brute_fixed(e64, e32, np.log(g64), np.log(g32), w64, w32, steps, mj)
    assert pts is not None
    p = fixed_step_path(e64, e32, g64, g32, num_steps=steps, max_jump=mj, objective=objective)
    assert p.method == "fixed_step" and p.max_jump == mj and len(p) == steps + 1
    np.testing.assert_array_equal(p.points, pts)
    assert p.cost == pytest.approx(best, rel=1e-12)
    assert p.cost == pytest.approx(
        fixed_step_path_cost(p.points, e64, e32, g64, g32, objective=objective), rel=1e-12
    )
    d = np.diff(p.points, axis=0)
    assert (d >= 0).all() and (d <= mj).all() and (d.sum(axis=1) > 0).all()


@pytest.mark.parametrize("objective", ["total", "64", "32"])
def test_fixed_step_ties_deterministic(objective):
    """Integer errors and integer log-SNR grids (γ = e^k, log exact): exact ties, decided by the
    documented rule (lexicographically smallest predecessor going back from the end)."""
    rng = np.random.default_rng(5)
    w64, w32 = OBJ_WEIGHTS[objective]
    for n0, n1, steps, mj in [(4, 4, 3, 2), (5, 5, 4, 2), (5, 4, 3, 3), (4, 5, 5, 2)]:
        for _ in range(3):
            e64 = rng.integers(0, 3, (n0, n1)).astype(np.float64)
            e32 = rng.integers(0, 3, (n0, n1)).astype(np.float64)
            lam64 = np.sort(rng.choice(np.arange(-6, 7), n0, replace=False)).astype(np.float64)
            lam32 = np.sort(rng.choice(np.arange(-6, 7), n1, replace=False)).astype(np.float64)
            g64, g32 = np.exp(lam64), np.exp(lam32)
            assert (np.log(g64) == lam64).all() and (np.log(g32) == lam32).all()
            best, pts = brute_fixed(e64, e32, lam64, lam32, w64, w32, steps, mj)
            p = fixed_step_path(e64, e32, g64, g32, num_steps=steps, max_jump=mj, objective=objective)
            assert p.cost == best
            np.testing.assert_array_equal(p.points, pts)


def test_fixed_step_feasibility_rule_matches_brute_force():
    """A path exists exactly when ceil(max(n0-1, n1-1) / max_jump) <= num_steps <= (n0-1)+(n1-1);
    otherwise NoPathError names the violated constraint."""
    rng = np.random.default_rng(2)
    for n0, n1 in [(3, 3), (4, 3), (2, 4)]:
        e = rng.random((n0, n1))
        g64, g32 = np.logspace(-2, 2, n0), np.logspace(-2, 2, n1)
        for steps in range(1, n0 + n1 + 1):
            for mj in (1, 2, 3):
                best, _ = brute_fixed(e, e, np.log(g64), np.log(g32), 1.0, 1.0, steps, mj)
                if math.isfinite(best):
                    p = fixed_step_path(e, e, g64, g32, num_steps=steps, max_jump=mj)
                    assert p.cost == pytest.approx(best, rel=1e-12)
                else:
                    name = "num_steps" if steps > n0 + n1 - 2 else "max_jump"
                    with pytest.raises(NoPathError, match=name):
                        fixed_step_path(e, e, g64, g32, num_steps=steps, max_jump=mj)


def test_fixed_step_grow_retries_like_public_code():
    rng = np.random.default_rng(8)
    e64, e32 = rng.random((13, 13)), rng.random((13, 13))
    g = np.logspace(-2, 2, 13)
    with pytest.raises(NoPathError, match="max_jump=1 is too small"):
        fixed_step_path(e64, e32, g, num_steps=3, max_jump=1)
    with pytest.warns(RuntimeWarning, match="max_jump=5"):
        p = fixed_step_path(e64, e32, g, num_steps=3, max_jump=1, on_infeasible="grow")
    assert p.max_jump == 5  # 1 -> 3 (3*3 < 12) -> 5, in steps of 2 as the public code
    q = fixed_step_path(e64, e32, g, num_steps=3, max_jump=5)
    np.testing.assert_array_equal(p.points, q.points)
    # too many steps: no max_jump helps, so "grow" still raises
    with pytest.raises(NoPathError, match="num_steps=25"):
        fixed_step_path(e64, e32, g, num_steps=25, on_infeasible="grow")
    # a feasible call does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_step_path(e64, e32, g, num_steps=6, max_jump=3, on_infeasible="grow")


def test_fixed_step_medium_properties_and_64_only():
    rng = np.random.default_rng(9)
    n = 30
    g = np.logspace(-2, 2, n)
    e64 = np.exp(-np.add.outer(np.arange(n), np.arange(n)) / 10) + 0.1 * rng.random((n, n))
    e32 = rng.random((n, n))
    p = fixed_step_path(e64, e32, g, num_steps=18, max_jump=5)
    assert tuple(p.points[0]) == (0, 0) and tuple(p.points[-1]) == (n - 1, n - 1)
    # the optimum is no worse than the diagonal with the same number of moves
    diag = np.repeat(np.round(np.linspace(0, n - 1, 19)).astype(int)[:, None], 2, axis=1)
    assert p.cost <= fixed_step_path_cost(diag, e64, e32, g) + 1e-12
    # 64-only: error_32 may be None, and equals passing zeros (the public code's way)
    p64 = fixed_step_path(e64, None, g, num_steps=18, max_jump=5, objective="64")
    pz = fixed_step_path(e64, np.zeros_like(e32), g, num_steps=18, max_jump=5, objective="total")
    np.testing.assert_array_equal(p64.points, pz.points)
    assert p64.cost == pz.cost
    # float32 / torch inputs
    pt = fixed_step_path(torch.from_numpy(e64), torch.from_numpy(e32), torch.from_numpy(g), num_steps=18, max_jump=5)
    np.testing.assert_array_equal(pt.points, p.points)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def test_seed_path_schedule_interpolates_in_log_space():
    g = np.logspace(-2, 2, 15)
    rng = np.random.default_rng(1)
    p = seed_dp_path(rng.random((15, 15)), rng.random((15, 15)))
    s = seed_path_schedule(p, g, num_steps=50)
    assert isinstance(s, GammaSchedule) and s.gamma_64.shape == (50,) and s.gamma_32.shape == (50,)
    assert s.gamma_64[0] == g[0] and s.gamma_64[-1] == g[-1]
    np.testing.assert_allclose(s.gamma_64, np.logspace(-2, 2, 50), rtol=1e-12)
    assert (np.diff(s.gamma_64) > 0).all() and (np.diff(s.gamma_32) >= 0).all()
    expect = 10 ** np.interp(np.log10(s.gamma_64), np.log10(g), np.log10(g[p.j]))
    np.testing.assert_allclose(s.gamma_32, expect, rtol=1e-10)
    # at grid points the schedule hits the path exactly (up to rounding)
    s15 = seed_path_schedule(p, g, num_steps=15)
    np.testing.assert_allclose(s15.gamma_32, g[p.j], rtol=1e-10)
    # a diagonal path gives γ32 = γ64
    diag = np.stack([np.arange(15), np.arange(15)], axis=1)
    sd = seed_path_schedule(diag, g, num_steps=7)
    np.testing.assert_allclose(sd.gamma_32, sd.gamma_64, rtol=1e-12)


def test_fixed_step_schedule_one_step_per_move():
    g64 = np.logspace(-2, 2, 10)
    g32 = np.logspace(-1.5, 2.5, 8)
    rng = np.random.default_rng(6)
    p = fixed_step_path(rng.random((10, 8)), rng.random((10, 8)), g64, g32, num_steps=6, max_jump=3)
    s = fixed_step_schedule(p, g64, g32)
    assert s.gamma_64.shape == (7,)
    np.testing.assert_array_equal(s.gamma_64, g64[p.i])
    np.testing.assert_array_equal(s.gamma_32, g32[p.j])
    assert (s.gamma_64[0], s.gamma_32[0]) == (g64[0], g32[0])
    assert (s.gamma_64[-1], s.gamma_32[-1]) == (g64[-1], g32[-1])
    assert (np.diff(s.gamma_64) >= 0).all() and (np.diff(s.gamma_32) >= 0).all()


def test_diagonal_schedule():
    s = diagonal_schedule(0.01, 100.0, 5)
    np.testing.assert_allclose(s.gamma_64, [0.01, 0.1, 1.0, 10.0, 100.0], rtol=1e-12)
    np.testing.assert_array_equal(s.gamma_64, s.gamma_32)
    assert s.gamma_64[0] == 0.01 and s.gamma_64[-1] == 100.0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    e = np.ones((4, 4))
    g = np.logspace(-2, 2, 4)
    bad_nan = e.copy()
    bad_nan[1, 2] = np.nan
    cases = [
        (lambda: seed_dp_path(bad_nan, e), ValueError, "error_64"),
        (lambda: seed_dp_path(e, bad_nan), ValueError, "error_32"),
        (lambda: seed_dp_path(e, np.ones((4, 5))), ValueError, "error_32"),
        (lambda: seed_dp_path(np.ones(4), e), ValueError, "error_64"),
        (lambda: seed_dp_path(np.ones((0, 3)), objective="64"), ValueError, "error_64"),
        (lambda: seed_dp_path("x", e), TypeError, "error_64"),
        (lambda: seed_dp_path(e), ValueError, "error_32"),
        (lambda: seed_dp_path(e, e, objective="sum"), ValueError, "objective"),
        (lambda: seed_dp_path(e, e, objective="weighted"), ValueError, "weight"),
        (lambda: seed_dp_path(e, e, objective="weighted", weight=1.5), ValueError, "weight"),
        (lambda: greedy_path(e, tolerance=-1), ValueError, "tolerance"),
        (lambda: fixed_step_path(e, e, g[::-1], num_steps=3), ValueError, "gamma_64"),
        (lambda: fixed_step_path(e, e, g[:3], num_steps=3), ValueError, "gamma_64"),
        (lambda: fixed_step_path(e, e, -g, num_steps=3), ValueError, "gamma_64"),
        (lambda: fixed_step_path(e, e, g, g[:3], num_steps=3), ValueError, "gamma_32"),
        (lambda: fixed_step_path(np.ones((4, 5)), np.ones((4, 5)), g, num_steps=3), ValueError, "gamma_32"),
        (lambda: fixed_step_path(e, None, g, num_steps=3), ValueError, "error_32"),
        (lambda: fixed_step_path(e, e, g, num_steps=0), ValueError, "num_steps"),
        (lambda: fixed_step_path(e, e, g, num_steps=2.0), TypeError, "num_steps"),
        (lambda: fixed_step_path(e, e, g, num_steps=3, max_jump=0), ValueError, "max_jump"),
        (lambda: fixed_step_path(e, e, g, num_steps=3, objective="weighted"), ValueError, "objective"),
        (lambda: fixed_step_path(e, e, g, num_steps=3, on_infeasible="skip"), ValueError, "on_infeasible"),
        (lambda: seed_path_schedule(np.array([[0, 0], [2, 1]]), g, num_steps=5), ValueError, "path"),
        (lambda: seed_path_schedule(np.array([[0, 1], [1, 0]]), g[:2], num_steps=5), ValueError, "non-decreasing"),
        (lambda: fixed_step_schedule(np.array([[0, 0], [4, 4]]), g), ValueError, "path"),
        (lambda: diagonal_schedule(0.0, 1.0, 5), ValueError, "gamma_min"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()
