"""k-nearest-neighbour estimate of the KL divergence between two samples (npeet's ``kldiv``).

For ``x_1..x_n ~ p`` and ``y_1..y_m ~ q`` in ``R^d`` (Wang, Kulkarni & Verdú 2009; the formula of
gregversteeg/NPEET ``entropy_estimators.kldiv``, which the ``toy2d`` template calls as
``kldiv(real, generated, k=5)``)::

    KL(p || q) ~= [ log m - log(n - 1) + d/n * sum_i ( log nu_k(i) - log rho_k(i) ) ] / log(base)

    rho_k(i) = distance from x_i to its k-th nearest neighbour among the other x's
    nu_k(i)  = distance from x_i to its k-th nearest neighbour among the y's

with distances in the max-norm (Chebyshev, ``p = inf``); the norm's volume constant cancels in the
difference, so any norm gives a consistent estimator, and the max-norm is what npeet uses.
``rho_k`` is "the (k+1)-th smallest distance to the x's, counting x_i itself", exactly as npeet
queries it; with duplicated points this is the same number.

Noise: npeet adds a tiny uniform noise (``1e-10 * U[0, 1)``) to break ties in its *entropy* and
*mutual information* estimators, but **not** in ``kldiv`` (neither in the list-based release
nor in the current array-based one). So by default nothing is added here either, and the result
is deterministic. ``jitter > 0`` adds ``jitter * U[0, 1)`` to every coordinate of both samples,
drawn from ``numpy.random.default_rng(seed)``; use it (e.g. ``1e-10``) when samples contain exact
duplicates, which otherwise give a zero distance: a zero ``rho_k`` or ``nu_k`` makes the log
infinite, and this function raises a ``ValueError`` instead of returning ``inf``/``nan``.

Inputs are converted to float64 (npeet's trees do the same). The nearest neighbours come from
``scipy.spatial.cKDTree`` queried with ``p=inf``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

__all__ = ["kldiv", "kldiv_noted", "knn_distances"]


def _as_samples(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array-like of numbers, got {type(a).__name__}") from exc
    if arr.ndim == 1:  # a list of scalars: one-dimensional samples, as npeet accepts
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape [num_samples, dim], got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: empty sample of shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains non-finite values")
    return arr


def knn_distances(
    x: np.ndarray, xp: np.ndarray, k: int, workers: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """``(rho_k, nu_k)`` of the module docstring for float64 arrays ``x [n, d]``, ``xp [m, d]``."""
    inf = float("inf")
    # k=[j] asks cKDTree for the j-th neighbour only (1-based), i.e. a [n, 1] result
    rho, _ = cKDTree(x).query(x, k=[k + 1], p=inf, workers=workers)
    nu, _ = cKDTree(xp).query(x, k=[k], p=inf, workers=workers)
    return rho[:, 0], nu[:, 0]


def kldiv(
    x,
    xp,
    k: int = 5,
    base: float = 2.0,
    *,
    jitter: float = 0.0,
    seed: int | None = None,
    workers: int = -1,
) -> float:
    """Estimate ``KL(p || q)`` from ``x ~ p`` (``[n, d]``) and ``xp ~ q`` (``[m, d]``); see the module doc.

    Args:
        x, xp: samples as numpy arrays, torch tensors (any device/dtype) or nested lists; a 1-D
            input is read as ``n`` one-dimensional samples. Same ``d``; float64 is used inside.
        k: neighbour order, ``1 <= k <= n - 1`` and ``k <= m``. Default 5, the value the
            ``toy2d`` template passes (npeet's own default is 3).
        base: logarithm base of the result; 2 (bits, npeet's default) or ``math.e`` (nats).
        jitter: if > 0, add ``jitter * U[0, 1)`` noise to both samples (tie breaking; npeet's
            ``kldiv`` adds none, so the default 0 reproduces it).
        seed: seed of the jitter's ``numpy.random.default_rng``.
        workers: threads for the KD-tree queries (scipy's ``workers``; -1 = all cores).

    Returns:
        The estimate as a Python float. It can be negative (estimator noise near 0).
    """
    x = _as_samples(x, "x")
    xp = _as_samples(xp, "xp")
    if x.shape[1] != xp.shape[1]:
        raise ValueError(f"xp: dimension {xp.shape[1]} differs from x's {x.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    n, d = x.shape
    m = xp.shape[0]
    if not 1 <= k <= min(n - 1, m):
        raise ValueError(f"k: need 1 <= k <= min(len(x) - 1, len(xp)) = {min(n - 1, m)}, got {k}")
    if not (isinstance(base, (int, float)) and base > 0 and base != 1):
        raise ValueError(f"base: must be a positive number other than 1, got {base!r}")
    if not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"jitter: must be finite and >= 0, got {jitter!r}")
    if jitter > 0:
        rng = np.random.default_rng(seed)
        x = x + jitter * rng.random(x.shape)
        xp = xp + jitter * rng.random(xp.shape)

    rho, nu = knn_distances(x, xp, int(k), workers=workers)
    if not (rho > 0).all() or not (nu > 0).all():
        which = "x" if not (rho > 0).all() else "xp"
        raise ValueError(
            f"{which}: a k-th neighbour distance is 0 (at least k duplicated points); "
            "pass jitter=1e-10 (npeet's tie-breaking noise) to break the ties"
        )
    const = math.log(m) - math.log(n - 1)
    est = const + d * (np.log(nu).mean() - np.log(rho).mean())
    return float(est / math.log(base))


def kldiv_noted(real, sample, k: int = 5) -> tuple[float, str | None]:
    """``(KL estimate, note)`` for experiment reports: NaN with a note when ``sample`` holds
    non-finite values; duplicated points (the plain estimator refuses them) are retried with
    npeet's tie-breaking noise (jitter 1e-10, seed 0) and noted. ``note`` None otherwise."""
    sample = np.asarray(sample)
    if not np.isfinite(sample).all():
        return float("nan"), "samples contain non-finite values"
    try:
        return float(kldiv(real, sample, k=k)), None
    except ValueError as e:  # duplicated points: npeet's tie-breaking noise
        return float(kldiv(real, sample, k=k, jitter=1e-10, seed=0)), f"jitter 1e-10 ({e})"
