"""The k-NN KL estimator (npeet's kldiv): exact formula vs brute force, ~0, Gaussians."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualdiff.metrics import kldiv


def kldiv_bruteforce(x, xp, k, base=2.0):
    """The same formula with all pairwise max-norm distances and a full sort (no tree)."""
    x = np.asarray(x, np.float64)
    xp = np.asarray(xp, np.float64)
    n, d = x.shape
    m = xp.shape[0]
    dxx = np.abs(x[:, None, :] - x[None, :, :]).max(-1)  # [n, n], self at distance 0
    dxy = np.abs(x[:, None, :] - xp[None, :, :]).max(-1)  # [n, m]
    rho = np.sort(dxx, axis=1)[:, k]  # k-th neighbour after the point itself
    nu = np.sort(dxy, axis=1)[:, k - 1]
    total = math.log(m) - math.log(n - 1) + d * (np.log(nu).mean() - np.log(rho).mean())
    return total / math.log(base)


def kl_gauss_bits(m1, s1, m2, s2):
    """Closed form KL(N(m1, s1) || N(m2, s2)) in bits."""
    d = len(m1)
    s2i = np.linalg.inv(s2)
    dm = m2 - m1
    nats = 0.5 * (np.trace(s2i @ s1) + dm @ s2i @ dm - d
                  + math.log(np.linalg.det(s2) / np.linalg.det(s1)))
    return nats / math.log(2)


@pytest.mark.parametrize("n,m,d,k", [(300, 200, 2, 5), (257, 311, 2, 1), (150, 90, 3, 3),
                                     (40, 500, 1, 4), (6, 5, 2, 5)])
def test_matches_bruteforce(n, m, d, k):
    rng = np.random.default_rng(n * 7 + m)
    x = rng.normal(size=(n, d))
    xp = rng.normal(size=(m, d)) * 1.3 + 0.4
    got = kldiv(x, xp, k=k)
    assert got == pytest.approx(kldiv_bruteforce(x, xp, k), rel=1e-12, abs=1e-12)
    assert kldiv(x, xp, k=k, base=math.e) == pytest.approx(got * math.log(2), rel=1e-12)


def test_matches_bruteforce_on_toy_like_data():
    """Two different 2-D point clouds with structure (a ring vs a blob), template's k = 5."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 2 * np.pi, 600)
    ring = 3 * np.stack((np.cos(a), np.sin(a)), 1) + rng.normal(size=(600, 2)) * 0.05
    blob = rng.normal(size=(500, 2)) * 1.5
    assert kldiv(ring, blob) == pytest.approx(kldiv_bruteforce(ring, blob, 5), rel=1e-12)
    assert kldiv(blob, ring) == pytest.approx(kldiv_bruteforce(blob, ring, 5), rel=1e-12)


def test_matches_sklearn_chebyshev_tree(require):
    """npeet's own route: sklearn KDTree with the Chebyshev metric."""
    sk = require("sklearn.neighbors")
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2000, 2))
    xp = rng.standard_t(5, size=(1500, 2))
    k = 5
    nn = sk.KDTree(x, metric="chebyshev").query(x, k=k + 1)[0][:, k]
    nnp = sk.KDTree(xp, metric="chebyshev").query(x, k=k)[0][:, k - 1]
    ref = (math.log(1500) - math.log(1999) + 2 * (np.log(nnp).mean() - np.log(nn).mean())) / math.log(2)
    assert kldiv(x, xp, k=k) == pytest.approx(ref, rel=1e-12)


def test_same_distribution_is_near_zero():
    # n = m = 5000, 2-D: over 10 seeds the estimate had mean -0.002 bits, std 0.011
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    x = rng.multivariate_normal([0.5, -1.0], cov, 5000)
    y = rng.multivariate_normal([0.5, -1.0], cov, 5000)
    assert abs(kldiv(x, y)) < 0.05
    # and it is far from 0 when the samples differ
    assert kldiv(x, y + np.array([1.0, 0.0])) > 0.2


@pytest.mark.parametrize(
    "m1,s1,m2,s2",
    [
        # shift by 1 sd: 0.721 bits
        (np.zeros(2), np.eye(2), np.array([1.0, 0.0]), np.eye(2)),
        # correlated, different means and covariances: 0.434 bits
        (np.array([0.3, 0.0]), np.array([[1.0, 0.3], [0.3, 0.8]]),
         np.array([-0.2, 0.4]), np.array([[1.5, -0.2], [-0.2, 1.2]])),
    ],
)
def test_gaussians_closed_form(m1, s1, m2, s2):
    """Tolerance 0.08 bits: the k-NN estimator is consistent but noisy and biased at finite n.

    At n = m = 20 000, k = 5, over 10 seeds its error was -0.011 +- 0.018 bits (first case) and
    +0.003 +- 0.010 bits (second), so 0.08 bits is > 4 standard deviations plus the bias. (Where q
    is much narrower than p in some direction, the finite-sample bias is larger: ~ -0.25 bits for
    a true 1.5 bits at this n, a known property of the estimator, not tested here.)
    """
    rng = np.random.default_rng(1)
    x = rng.multivariate_normal(m1, s1, 20000)
    y = rng.multivariate_normal(m2, s2, 20000)
    assert kldiv(x, y) == pytest.approx(kl_gauss_bits(m1, s1, m2, s2), abs=0.08)


def test_inputs_torch_lists_and_1d():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = (rng.normal(size=(150, 2)) + 0.5).astype(np.float32)
    ref = kldiv(x, y)
    assert kldiv(torch.from_numpy(x), torch.from_numpy(y)) == ref
    assert kldiv(x.tolist(), y.tolist()) == ref
    # a 1-D input is n one-dimensional samples
    assert kldiv(x[:, 0], y[:, 0], k=3) == pytest.approx(kldiv_bruteforce(x[:, :1], y[:, :1], 3))


def test_duplicates_and_jitter():
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros((7, 2)), rng.normal(size=(100, 2))])
    y = rng.normal(size=(100, 2))
    with pytest.raises(ValueError, match="jitter"):
        kldiv(x, y, k=5)  # 7 copies of one point: rho_5 = 0 there
    a = kldiv(x, y, k=5, jitter=1e-10, seed=0)
    assert math.isfinite(a)
    assert a == kldiv(x, y, k=5, jitter=1e-10, seed=0)  # seeded: reproducible
    # no duplicates: jitter this small barely moves the result
    assert kldiv(y[:60], y[60:], jitter=1e-10, seed=1) == pytest.approx(kldiv(y[:60], y[60:]), abs=1e-6)


def test_bad_inputs():
    x = np.zeros((10, 2)) + np.arange(10)[:, None]
    with pytest.raises(ValueError, match="xp"):
        kldiv(x, np.ones((10, 3)))
    with pytest.raises(ValueError, match="k"):
        kldiv(x, x, k=10)  # needs k <= n - 1
    with pytest.raises(ValueError, match="k"):
        kldiv(x, x[:3], k=4)  # needs k <= m
    with pytest.raises(ValueError, match="k"):
        kldiv(x, x, k=0)
    with pytest.raises(TypeError, match="k"):
        kldiv(x, x, k=2.0)
    with pytest.raises(ValueError, match="x"):
        kldiv(np.full((10, 2), np.nan), x)
    with pytest.raises(ValueError, match="xp"):
        kldiv(x, np.zeros((0, 2)))
    with pytest.raises(ValueError, match="x"):
        kldiv(np.zeros((2, 3, 4)), x)
    with pytest.raises(ValueError, match="base"):
        kldiv(x, x + 0.5, base=1)
    with pytest.raises(ValueError, match="jitter"):
        kldiv(x, x + 0.5, jitter=-1.0)
