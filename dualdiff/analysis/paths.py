"""Optimal generation paths through a LIFT error heatmap, and path -> (γ64, γ32) schedules.

Grid convention (the public LIFT code's, kept everywhere here):

* ``error_64[i, j]`` / ``error_32[i, j]``: axis 0 (``i``) indexes γ0, the SNR of the 64x64
  scale; axis 1 (``j``) indexes γ1, the SNR of the 32x32 scale.
* Both SNR grids are strictly increasing: index 0 is the smallest SNR (most noise), the last
  index the largest (least noise). Generation runs from index 0 towards the last index, so every
  path and every schedule below goes from high noise (small γ) to low noise (large γ).

Solvers
-------
``seed_dp_path`` (the seed's plot script): one cell per γ0 index ``i = 0..N-1``; the path starts
at ``(0, 0)``; its γ1 index ``j`` never decreases; the end cell in the last row is free (the
cheapest one). It minimises the summed cell cost
``c = e64 + e32`` ("total"), ``c = e64`` ("64"), or ``c = w e64 + (1 - w) e32`` ("weighted"):
``D[0, 0] = c[0, 0]``, ``D[0, j > 0] = inf``, ``D[i, j] = min_{k <= j} D[i-1, k] + c[i, j]``:
O(N·M) with a running prefix minimum and int32 backpointers. Ties: the smallest ``k`` and the
smallest end ``j`` win (the seed's strict ``<`` running minimum and ``np.argmin``).

``greedy_path`` (the seed's plot script): ``j_0 = 0``; for ``i >= 1`` the cheapest ``j >= j_{i-1}``
in row ``i``, except that a row whose remaining cells are all within ``tolerance`` (relative) of
each other takes the diagonal ``j = i``.

``fixed_step_path`` (the public repository's refined method): exactly ``num_steps`` moves from
``(0, 0)`` to ``(n0-1, n1-1)``; each move goes from ``(i, j)`` to ``(i', j')`` with
``0 <= i'-i <= max_jump``, ``0 <= j'-j <= max_jump``, ``(i', j') != (i, j)``; its cost is the
trapezoid ``(e64[i,j] + e64[i',j'])/2 · |λ64[i'] - λ64[i]| + (e32[i,j] + e32[i',j'])/2 · |λ32[j'] - λ32[j]|``
with ``λ = log γ`` of the grid points (λ64 along axis 0, λ32 along axis 1); the "64" objective drops
the second term, "32" the first. Layered DP over (step, i, j), vectorised over a padded flat grid, path recovered by
re-evaluating the candidates of the cells on it. Ties: the lexicographically smallest
predecessor ``(i, j)`` wins (the public code's first-found rule).

The kernels are numba ``njit`` functions compiled on first use (never ``cache=True``: install
directories may be read-only); ``import dualdiff.analysis`` does not import numba.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "OBJECTIVES",
    "FIXED_STEP_OBJECTIVES",
    "GridPath",
    "GammaSchedule",
    "NoPathError",
    "seed_dp_path",
    "greedy_path",
    "fixed_step_path",
    "fixed_step_path_cost",
    "seed_path_schedule",
    "fixed_step_schedule",
    "diagonal_schedule",
]

OBJECTIVES = ("total", "64", "weighted")
FIXED_STEP_OBJECTIVES = ("total", "64", "32")


class NoPathError(ValueError):
    """No path satisfies the fixed-step constraints (the message names the violated one)."""


@dataclass(frozen=True)
class GridPath:
    """A path through the heatmap grid.

    points: int64 [L, 2], rows ``(i, j)`` = (γ0 / 64x64 index, γ1 / 32x32 index), in generation
        order (high noise first). Seed DP and greedy: ``L = N`` and ``points[:, 0] == arange(N)``.
        Fixed-step DP: ``L = num_steps + 1``, from ``(0, 0)`` to ``(n0-1, n1-1)``.
    cost: the objective value of the path (float).
    method: "seed_dp", "greedy" or "fixed_step".
    objective: the objective the path was chosen for.
    max_jump: fixed-step DP only: the max_jump actually used (after any retries), else None.
    """

    points: np.ndarray
    cost: float
    method: str
    objective: str
    max_jump: int | None = None

    @property
    def i(self) -> np.ndarray:
        return self.points[:, 0]

    @property
    def j(self) -> np.ndarray:
        return self.points[:, 1]

    def __len__(self) -> int:
        return int(self.points.shape[0])


class GammaSchedule(NamedTuple):
    """(γ64, γ32) per schedule point, float64 [L] each, non-decreasing: high noise first.

    A sampler visits the points in order; one DDIM step goes from point ``k`` to ``k + 1``.
    (The seed's samplers evaluate the model at every point and, after the last one, step to
    t = 0; converting γ to timesteps is dualdiff.diffusion.schedules' job.)
    """

    gamma_64: np.ndarray
    gamma_32: np.ndarray


# --------------------------------------------------------------------------------------------
# numba kernels (plain Python source here; jitted lazily by _kernels())
# --------------------------------------------------------------------------------------------


def _seed_dp_kernel(e64, e32, a, b, use_32, parent):  # pragma: no cover - runs jitted
    # e64, e32: [N, M] float32/float64 cell errors; cost c = a*e64 (+ b*e32 when use_32)
    # parent:   [N, M] int32 out: backpointer (j index in row i-1) of every cell of rows >= 1
    # returns (end j, total cost)
    n, m = e64.shape
    prev = np.empty(m, np.float64)
    cur = np.empty(m, np.float64)
    inf = np.inf
    c00 = a * e64[0, 0]
    if use_32:
        c00 = c00 + b * e32[0, 0]
    prev[0] = c00
    for j in range(1, m):
        prev[j] = inf
    for i in range(1, n):
        best = inf
        bk = 0
        if use_32:
            for j in range(m):
                v = prev[j]
                if v < best:
                    best = v
                    bk = j
                cur[j] = best + (a * e64[i, j] + b * e32[i, j])
                parent[i, j] = bk
        else:
            for j in range(m):
                v = prev[j]
                if v < best:
                    best = v
                    bk = j
                cur[j] = best + a * e64[i, j]
                parent[i, j] = bk
        prev, cur = cur, prev
    best = inf
    end = 0
    for j in range(m):
        if prev[j] < best:
            best = prev[j]
            end = j
    return end, best


def _fixed_step_kernel(e64, e32, lam64, lam32, w64, w32, num_steps, max_jump, points):  # pragma: no cover
    # e64, e32:     [n0, n1] float32/float64 cell errors
    # lam64, lam32: [n0], [n1] float64 log-SNR of the grid points along axis 0 / axis 1
    # w64, w32:     1.0 or 0.0: keep / drop each trapezoid term
    # points:       [num_steps + 1, 2] int64 out: the path (written only when one exists)
    # returns the cost of the best path to (n0-1, n1-1) in exactly num_steps moves (inf: none)
    #
    # Layout: every grid row is padded with max_jump cells of +inf on the left and the grid is
    # flattened (row width W = n1 + max_jump), so for a fixed move (d rows, o columns) the
    # predecessor of flat cell f is f - (d*W + o) for *every* f: one long SIMD-friendly loop per
    # move over the whole layer, and a predecessor left of column 0 lands in the +inf padding.
    # The move cost (a+b)/2*|dλ| is computed as (a+b)*h with h = 0.5*|dλ|*w, bit-identical
    # (scaling by 0.5 and by w in {0, 1} is exact); no fastmath, so no FMA contraction.
    # The hot loop keeps only the running minimum (a backpointer select there costs ~5x); the
    # path is recovered afterwards by re-evaluating, cell by cell going back, the candidates in
    # (pi, pj) lexicographic order and taking the first one that reproduces the stored value
    # exactly: the same first-minimum rule as a strict "<" scan.
    n0, n1 = e64.shape
    mj = max_jump
    W = n1 + mj
    F = n0 * W
    inf = np.inf
    E64 = np.zeros(F)
    E32 = np.zeros(F)
    for r in range(n0):
        for c in range(n1):
            E64[r * W + mj + c] = e64[r, c]
            E32[r * W + mj + c] = e32[r, c]
    # H64[d, f] = 0.5*|λ64[r] - λ64[r-d]|*w64 for f in row r; H32[o, f] = 0.5*|λ32[c] - λ32[c-o]|*w32
    H64 = np.zeros((mj + 1, F))
    H32 = np.zeros((mj + 1, F))
    for d in range(mj + 1):
        for r in range(d, n0):
            h = 0.5 * abs(lam64[r] - lam64[r - d]) * w64
            for cc in range(W):
                H64[d, r * W + cc] = h
        for r in range(n0):
            for c in range(d, n1):
                H32[d, r * W + mj + c] = 0.5 * abs(lam32[c] - lam32[c - d]) * w32
    dp = np.full((num_steps + 1, F), inf)
    dp[0, mj] = 0.0
    for k in range(num_steps):
        layer = k + 1
        rem = num_steps - layer  # moves left after this layer
        prev = dp[k]
        cur = dp[layer]
        # box of cells reachable from (0,0) in `layer` moves that can still reach the end
        i_lo = max(0, n0 - 1 - rem * mj)
        i_hi = min(n0 - 1, layer * mj)
        j_lo = max(0, n1 - 1 - rem * mj)
        j_hi = min(n1 - 1, layer * mj)
        if i_lo > i_hi or j_lo > j_hi:
            continue
        f_lo = i_lo * W + mj + j_lo
        f_hi = i_hi * W + mj + j_hi + 1
        for d in range(mj, -1, -1):  # pi = ni - d ascending
            h64 = H64[d]
            for o in range(mj, -1, -1):  # pj = nj - o ascending
                if d == 0 and o == 0:
                    continue  # a move must advance
                h32 = H32[o]
                s = np.uint64(d * W + o)
                lo = max(f_lo, d * W + o)
                # unsigned indices: no negative-index wraparound code, so LLVM vectorizes
                for uf in range(np.uint64(lo), np.uint64(f_hi)):
                    us = uf - s
                    nc = prev[us] + (E64[us] + E64[uf]) * h64[uf] + (E32[us] + E32[uf]) * h32[uf]
                    b = cur[uf]
                    cur[uf] = nc if nc < b else b
        for r in range(n0):  # padding cells picked up wrapped-around values: back to +inf
            for cc in range(mj):
                cur[r * W + cc] = inf
    f = (n0 - 1) * W + mj + n1 - 1
    total = dp[num_steps, f]
    if not total < inf:
        return total
    for layer in range(num_steps, 0, -1):
        points[layer, 0] = f // W
        points[layer, 1] = f % W - mj
        target = dp[layer, f]
        prev = dp[layer - 1]
        found = -1
        for d in range(mj, -1, -1):
            for o in range(mj, -1, -1):
                if d == 0 and o == 0:
                    continue
                us = f - (d * W + o)
                if us < 0:
                    continue
                nc = prev[us] + (E64[us] + E64[f]) * H64[d, f] + (E32[us] + E32[f]) * H32[o, f]
                if nc == target:
                    found = us
                    break
            if found >= 0:
                break
        if found < 0:
            return np.nan  # cannot happen: the stored value came from one of these candidates
        f = found
    points[0, 0] = f // W
    points[0, 1] = f % W - mj
    return total


_KERNELS: dict | None = None


def _kernels() -> dict:
    """Jit the kernels on first use (numba imported here, not at module import)."""
    global _KERNELS
    if _KERNELS is None:
        import numba

        jit = numba.njit(nogil=True, cache=False)
        _KERNELS = {
            "seed_dp": jit(_seed_dp_kernel),
            "fixed_step": jit(_fixed_step_kernel),
        }
    return _KERNELS


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _to_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")


def _as_error(name: str, x, *, shape: tuple | None = None) -> np.ndarray:
    a = _to_numpy(name, x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_gamma0, num_gamma1], got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} shape {a.shape} does not match error_64 shape {shape}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    a = np.ascontiguousarray(a)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return a


def _as_gamma(name: str, x, length: int | None = None, axis_desc: str = "") -> np.ndarray:
    g = _to_numpy(name, x)
    if g.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real-valued array, got dtype {g.dtype}")
    if g.ndim != 1 or g.shape[0] == 0:
        raise ValueError(f"{name} must be 1-D and non-empty, got shape {g.shape}")
    if length is not None and g.shape[0] != length:
        raise ValueError(f"{name} has {g.shape[0]} values but the error grid has {length} along {axis_desc}")
    g = g.astype(np.float64)
    if not np.isfinite(g).all() or not (g > 0).all():
        raise ValueError(f"{name} must hold positive finite SNR values")
    if g.shape[0] > 1 and not (np.diff(g) > 0).all():
        raise ValueError(f"{name} must be strictly increasing (index 0 = smallest SNR = most noise)")
    return g


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _check_choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _objective_weights(objective: str, weight: float | None) -> tuple[float, float, bool]:
    """(a, b, use_32) with cell cost a*e64 + b*e32."""
    if objective == "total":
        return 1.0, 1.0, True
    if objective == "64":
        return 1.0, 0.0, False
    if weight is None:
        raise ValueError("weight must be given for objective='weighted'")
    w = float(weight)
    if not (0.0 <= w <= 1.0):
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    return w, 1.0 - w, True


# --------------------------------------------------------------------------------------------
# seed DP and greedy
# --------------------------------------------------------------------------------------------


def seed_dp_path(error_64, error_32=None, *, objective: str = "total", weight: float | None = None) -> GridPath:
    """Seed DP: the monotone path (one cell per γ0 index) of least summed cell cost.

    Args:
        error_64: [N, M] 64x64-scale error, axis 0 = γ0 index, axis 1 = γ1 index (numpy or torch;
            float32 and float64 are used as they are, other real dtypes become float64).
        error_32: [N, M] 32x32-scale error; required unless objective="64".
        objective: "total" (c = e64 + e32), "64" (c = e64), "weighted" (c = w e64 + (1-w) e32).
        weight: w in [0, 1] for objective="weighted".

    Returns:
        GridPath with points [N, 2] = (i, j_i), j_0 = 0, j non-decreasing; cost = sum of c along
        it, accumulated in float64. Ties go to the smallest j (as the seed's strict running
        minimum and np.argmin do).
    """
    _check_choice("objective", objective, OBJECTIVES)
    if objective != "weighted" and weight is not None:
        raise ValueError(f"weight is only used with objective='weighted', got objective={objective!r}")
    e64 = _as_error("error_64", error_64)
    a, b, use_32 = _objective_weights(objective, weight)
    if use_32:
        if error_32 is None:
            raise ValueError(f"error_32 is required for objective={objective!r}")
        e32 = _as_error("error_32", error_32, shape=e64.shape)
        if e32.dtype != e64.dtype:
            e32 = e32.astype(np.float64)
            e64 = e64.astype(np.float64)
    else:
        e32 = e64  # unused by the kernel
    n, m = e64.shape
    parent = np.empty((n, m), np.int32)
    end, cost = _kernels()["seed_dp"](e64, e32, a, b, use_32, parent)
    js = np.empty(n, np.int64)
    j = int(end)
    for i in range(n - 1, 0, -1):
        js[i] = j
        j = int(parent[i, j])
    js[0] = j
    points = np.stack([np.arange(n, dtype=np.int64), js], axis=1)
    return GridPath(points=points, cost=float(cost), method="seed_dp", objective=objective)


def greedy_path(
    error_64,
    error_32=None,
    *,
    objective: str = "64",
    weight: float | None = None,
    tolerance: float = 0.05,
) -> GridPath:
    """Greedy monotone path of the seed's plot script (its default objective: 64x64 error).

    j_0 = 0; for each later row i the cheapest j >= j_{i-1} (first on ties), except that when
    the row's remaining cells satisfy min > 0 and (max - min) / min < tolerance the row takes the
    diagonal j = i (clamped to M - 1 on a non-square grid, and never below j_{i-1}).
    tolerance = 0 turns the diagonal rule off.

    Returns GridPath with points [N, 2] and cost = sum of the cell cost along the path.
    """
    _check_choice("objective", objective, OBJECTIVES)
    if objective != "weighted" and weight is not None:
        raise ValueError(f"weight is only used with objective='weighted', got objective={objective!r}")
    tol = float(tolerance)
    if not (tol >= 0.0) or not math.isfinite(tol):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    e64 = _as_error("error_64", error_64).astype(np.float64, copy=False)
    a, b, use_32 = _objective_weights(objective, weight)
    if use_32:
        if error_32 is None:
            raise ValueError(f"error_32 is required for objective={objective!r}")
        cost = a * e64 + b * _as_error("error_32", error_32, shape=e64.shape).astype(np.float64, copy=False)
    else:
        cost = e64
    n, m = cost.shape
    js = np.zeros(n, np.int64)
    cur = 0
    for i in range(1, n):
        row = cost[i, cur:]
        lo, hi = row.min(), row.max()
        if lo > 0 and (hi - lo) / lo < tol:
            j = min(i, m - 1)
        else:
            j = cur + int(np.argmin(row))
        cur = max(j, cur)
        js[i] = cur
    total = 0.0
    for i in range(n):
        total += float(cost[i, js[i]])
    points = np.stack([np.arange(n, dtype=np.int64), js], axis=1)
    return GridPath(points=points, cost=total, method="greedy", objective=objective)


# --------------------------------------------------------------------------------------------
# fixed-step DP
# --------------------------------------------------------------------------------------------


def _fixed_step_inputs(error_64, error_32, gamma_64, gamma_32, objective):
    _check_choice("objective", objective, FIXED_STEP_OBJECTIVES)
    e64 = _as_error("error_64", error_64)
    if error_32 is None:
        if objective != "64":
            raise ValueError(f"error_32 is required for objective={objective!r}")
        e32 = e64
    else:
        e32 = _as_error("error_32", error_32, shape=e64.shape)
    if e32.dtype != e64.dtype:
        e64, e32 = e64.astype(np.float64), e32.astype(np.float64)
    n0, n1 = e64.shape
    g64 = _as_gamma("gamma_64", gamma_64, n0, "axis 0 (gamma_64)")
    if gamma_32 is None:
        if n1 != n0:
            raise ValueError(f"gamma_32 is required for a non-square {n0}x{n1} grid")
        g32 = g64
    else:
        g32 = _as_gamma("gamma_32", gamma_32, n1, "axis 1 (gamma_32)")
    w64 = 0.0 if objective == "32" else 1.0
    w32 = 0.0 if objective == "64" else 1.0
    return e64, e32, g64, g32, w64, w32


def _feasibility(n0: int, n1: int, num_steps: int, max_jump: int) -> str | None:
    """Why no path exists (None when one does). Exactly: ceil(span/max_jump) <= S <= (n0-1)+(n1-1)."""
    most = (n0 - 1) + (n1 - 1)
    if num_steps > most:
        return (
            f"num_steps={num_steps} exceeds the {most} moves a {n0}x{n1} grid allows: every move must "
            f"advance at least one cell and (0, 0) -> ({n0 - 1}, {n1 - 1}) spans only (n0-1)+(n1-1) cells; "
            f"use num_steps <= {most} (a larger max_jump cannot help)"
        )
    span = max(n0 - 1, n1 - 1)
    if num_steps * max_jump < span:
        need = -(-span // num_steps)
        return (
            f"max_jump={max_jump} is too small to cross the {n0}x{n1} grid in num_steps={num_steps} moves "
            f"(max_jump * num_steps = {max_jump * num_steps} < {span} cells); use max_jump >= {need} or "
            f"more steps, or pass on_infeasible='grow' to retry with a larger max_jump"
        )
    return None


def fixed_step_path(
    error_64,
    error_32,
    gamma_64,
    gamma_32=None,
    *,
    num_steps: int = 18,
    max_jump: int = 5,
    objective: str = "total",
    on_infeasible: str = "raise",
) -> GridPath:
    """Fixed-step DP: least-cost path from (0, 0) to (n0-1, n1-1) in exactly num_steps moves.

    Args:
        error_64, error_32: [n0, n1] per-scale error (axis 0 = γ0 / 64x64, axis 1 = γ1 / 32x32).
            error_32 may be None with objective="64".
        gamma_64: [n0] SNR of the axis-0 grid points, strictly increasing; λ64 = log(gamma_64).
        gamma_32: [n1] SNR of the axis-1 grid points (default: gamma_64, for a square grid).
        num_steps: exact number of moves (the path has num_steps + 1 points). Defaults 18 / 5 are
            the public code's.
        max_jump: most cells a move may advance along each axis.
        objective: "total" (both trapezoid terms), "64" (64x64 term only), "32" (32x32 term only).
        on_infeasible: "raise" (NoPathError naming the constraint) or "grow" (warn, then retry with
            max_jump + 2, + 4, ... as the public code does; a num_steps too large for the grid
            still raises, since no max_jump can fix it).

    Returns:
        GridPath with points [num_steps + 1, 2], cost = the summed trapezoid cost (float64),
        max_jump = the value used. Among equal-cost paths the one whose predecessors are
        lexicographically smallest, going back from the end, wins (the public code's rule).
    """
    _check_choice("on_infeasible", on_infeasible, ("raise", "grow"))
    num_steps = _check_int("num_steps", num_steps, 1)
    max_jump = _check_int("max_jump", max_jump, 1)
    e64, e32, g64, g32, w64, w32 = _fixed_step_inputs(error_64, error_32, gamma_64, gamma_32, objective)
    n0, n1 = e64.shape
    why = _feasibility(n0, n1, num_steps, max_jump)
    if why is not None:
        if on_infeasible == "raise" or num_steps > (n0 - 1) + (n1 - 1):
            raise NoPathError(f"no fixed-step path: {why}")
        start = max_jump
        while num_steps * max_jump < max(n0 - 1, n1 - 1):
            max_jump += 2
        warnings.warn(
            f"fixed_step_path: no path with max_jump={start} in {num_steps} moves; retried with "
            f"max_jump={max_jump}",
            RuntimeWarning,
            stacklevel=2,
        )
    lam64 = np.log(g64)
    lam32 = np.log(g32)
    points = np.zeros((num_steps + 1, 2), np.int64)
    cost = _kernels()["fixed_step"](e64, e32, lam64, lam32, w64, w32, num_steps, max_jump, points)
    if math.isnan(cost):
        raise RuntimeError("fixed_step_path: backtracking failed (internal error)")
    if not math.isfinite(cost):  # cannot happen when _feasibility passed; kept as a guard
        raise NoPathError(
            f"no fixed-step path from (0, 0) to ({n0 - 1}, {n1 - 1}) in num_steps={num_steps} moves "
            f"with max_jump={max_jump}"
        )
    return GridPath(points=points, cost=float(cost), method="fixed_step", objective=objective, max_jump=max_jump)


def fixed_step_path_cost(points, error_64, error_32, gamma_64, gamma_32=None, *, objective: str = "total") -> float:
    """The fixed-step trapezoid cost of any monotone path (e.g. the diagonal) for comparison.

    points: int [L, 2] of (i, j), non-decreasing in both coordinates.
    """
    e64, e32, g64, g32, w64, w32 = _fixed_step_inputs(error_64, error_32, gamma_64, gamma_32, objective)
    p = np.asarray(_to_numpy("points", points))
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 1:
        raise ValueError(f"points must have shape [L, 2] with L >= 1, got {p.shape}")
    p = p.astype(np.int64)
    if (p < 0).any() or (p[:, 0] >= e64.shape[0]).any() or (p[:, 1] >= e64.shape[1]).any():
        raise ValueError(f"points must index into the {e64.shape} grid")
    if (np.diff(p, axis=0) < 0).any():
        raise ValueError("points must be non-decreasing in both coordinates")
    lam64, lam32 = np.log(g64), np.log(g32)
    total = 0.0
    for (i, j), (ni, nj) in zip(p[:-1].tolist(), p[1:].tolist()):
        c64 = (float(e64[i, j]) + float(e64[ni, nj])) / 2 * abs(lam64[ni] - lam64[i])
        c32 = (float(e32[i, j]) + float(e32[ni, nj])) / 2 * abs(lam32[nj] - lam32[j])
        total = total + c64 * w64 + c32 * w32
    return float(total)


# --------------------------------------------------------------------------------------------
# path -> (γ64, γ32) schedules
# --------------------------------------------------------------------------------------------


def _path_points(path) -> np.ndarray:
    pts = path.points if isinstance(path, GridPath) else np.asarray(_to_numpy("path", path))
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 1:
        raise ValueError(f"path must be a GridPath or an int array [L, 2], got shape {pts.shape}")
    return pts.astype(np.int64)


def seed_path_schedule(path, gamma_64, gamma_32=None, *, num_steps: int = 50) -> GammaSchedule:
    """Seed DP path -> schedule: γ64 log-spaced over num_steps points, γ32 interpolated along the path.

    γ64_k = logspace(log γ64[0], log γ64[-1], num_steps)_k (both ends included) and
    log γ32_k = interp(log γ64_k, log γ64[i], log γ32[j_i]) along the path (linear in log space),
    as the seed's generate_for_fid.py does.

    Args:
        path: GridPath from seed_dp_path / greedy_path, or int [N, 2] with points[:, 0] == arange(N).
        gamma_64: [N] SNR grid of axis 0, strictly increasing.
        gamma_32: [M] SNR grid of axis 1 (default gamma_64).
        num_steps: number of schedule points (the seed evaluates the model at each, then steps to t=0).

    Returns:
        GammaSchedule of two float64 [num_steps] arrays, increasing γ (high noise first).
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    pts = _path_points(path)
    n = pts.shape[0]
    if not np.array_equal(pts[:, 0], np.arange(n)):
        raise ValueError("path must have one point per gamma_64 index (points[:, 0] == arange(N)); "
                         "use fixed_step_schedule for fixed-step paths")
    g64 = _as_gamma("gamma_64", gamma_64, n, "the path (one point per gamma_64 index)")
    g32 = g64 if gamma_32 is None else _as_gamma("gamma_32", gamma_32)
    if (pts[:, 1] < 0).any() or (pts[:, 1] >= g32.shape[0]).any():
        raise ValueError(f"path j indices must lie in [0, {g32.shape[0]})")
    if (np.diff(pts[:, 1]) < 0).any():
        raise ValueError("path j indices must be non-decreasing")
    log64 = np.log(g64)
    if n == 1:
        sched64 = np.full(num_steps, g64[0])
        sched32 = np.full(num_steps, g32[pts[0, 1]])
        return GammaSchedule(sched64, sched32)
    log_sched = np.linspace(log64[0], log64[-1], num_steps)
    sched64 = np.exp(log_sched)
    sched64[0], sched64[-1] = g64[0], g64[-1]  # exact ends
    sched32 = np.exp(np.interp(log_sched, log64, np.log(g32[pts[:, 1]])))
    return GammaSchedule(sched64, sched32)


def fixed_step_schedule(path, gamma_64, gamma_32=None) -> GammaSchedule:
    """Fixed-step path -> schedule: one point per path point, so each move is one sampling step.

    Returns GammaSchedule of two float64 [num_steps + 1] arrays: γ64 = gamma_64[i_k],
    γ32 = gamma_32[j_k], from (γ64[0], γ32[0]) (most noise) to the grid's last point.
    """
    pts = _path_points(path)
    g64 = _as_gamma("gamma_64", gamma_64)
    g32 = g64 if gamma_32 is None else _as_gamma("gamma_32", gamma_32)
    if (pts < 0).any() or (pts[:, 0] >= g64.shape[0]).any() or (pts[:, 1] >= g32.shape[0]).any():
        raise ValueError(f"path indices must lie in [0, {g64.shape[0]}) x [0, {g32.shape[0]})")
    if (np.diff(pts, axis=0) < 0).any():
        raise ValueError("path must be non-decreasing in both indices")
    return GammaSchedule(g64[pts[:, 0]].copy(), g32[pts[:, 1]].copy())


def diagonal_schedule(gamma_min: float, gamma_max: float, num_steps: int) -> GammaSchedule:
    """The diagonal path γ32 = γ64, log-spaced over num_steps points from gamma_min to gamma_max.

    (The seed's diagonal sampler used the DDIM scheduler's own timestep spacing instead; that
    belongs to dualdiff.diffusion.schedules.)
    """
    num_steps = _check_int("num_steps", num_steps, 1)
    lo, hi = float(gamma_min), float(gamma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"need 0 < gamma_min <= gamma_max (finite), got {gamma_min!r}, {gamma_max!r}")
    g = np.exp(np.linspace(math.log(lo), math.log(hi), num_steps))
    g[0] = lo
    g[-1] = hi if num_steps > 1 else lo
    return GammaSchedule(g, g.copy())
