"""dualdiff.ops.frechet_distance against pytorch-fid's calculate_frechet_distance."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dualdiff.ops.frechet as frechet_mod
from dualdiff._backend import BackendUnavailableError
from dualdiff.ops.frechet import frechet_distance, frechet_distance_reference, trace_sqrt_product
from dualdiff.testing import forced_backend


@pytest.fixture(autouse=True, scope="module")
def _every_core():
    """2048x2048 float64 eigendecompositions: unlike the suite's tiny models they gain from every
    core (the suite runs on one torch thread, tests/conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    yield
    torch.set_num_threads(n)


@pytest.fixture
def pytorch_fid(require):
    """pytorch-fid's fid_score, the reference (a skip without it; a failure under CI=true)."""
    return require("pytorch_fid.fid_score")


def pytorch_fid_distance(pytorch_fid, mu1, s1, mu2, s2, eps=1e-6):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's `disp` deprecation, LinAlgWarning
        return float(pytorch_fid.calculate_frechet_distance(
            np.asarray(mu1), np.asarray(s1), np.asarray(mu2), np.asarray(s2), eps=eps))


def feature_stats(n: int, dim: int, seed: int, rank: int = 128):
    """Mean and covariance (float64) of n non-negative, correlated 'activations' (like Inception
    pool features): ReLU of a low-rank mix plus noise. n < dim gives a rank-deficient sigma."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, dim, generator=g) / rank ** 0.5
    x = torch.relu(torch.randn(n, rank, generator=g) @ mix + 0.3 * torch.randn(n, dim, generator=g) + 0.2)
    xc = (x - x.mean(0)).double()
    return x.mean(0).double(), (xc.T @ xc) / (n - 1)


@pytest.fixture(scope="module")
def stats_2048_full():
    return feature_stats(3000, 2048, 1), feature_stats(3000, 2048, 2)


@pytest.fixture(scope="module")
def stats_2048_rank_deficient():
    return feature_stats(700, 2048, 3)


def test_matches_pytorch_fid_2048_full_rank(stats_2048_full, pytorch_fid):
    (m1, s1), (m2, s2) = stats_2048_full
    assert int(torch.linalg.cholesky_ex(s1)[1]) == 0  # positive definite: the Cholesky route
    ours = frechet_distance(m1, s1, m2, s2)
    ref = pytorch_fid_distance(pytorch_fid, m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert isinstance(ours, float)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


@pytest.mark.slow  # ~10 s of scipy sqrtm (more on a loaded CPU)
def test_matches_pytorch_fid_2048_rank_deficient(stats_2048_rank_deficient, stats_2048_full, pytorch_fid):
    """700 samples in 2048 dims: a singular sigma1, so a singular product (scipy warns).
    (Both sigmas singular takes the eigh route: compared with pytorch-fid at D=257 below.)"""
    m1, s1 = stats_2048_rank_deficient
    _, (m2, s2) = stats_2048_full
    assert int(torch.linalg.cholesky_ex(s1)[1]) != 0  # singular: sigma2 gets factored instead
    ours = frechet_distance(m1, s1, m2, s2)
    ref = pytorch_fid_distance(pytorch_fid, m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


@pytest.mark.parametrize("n", [600, 150])  # full rank and rank-deficient at D=257
def test_methods_agree_with_pytorch_fid_small(n, pytorch_fid):
    (m1, s1), (m2, s2) = feature_stats(n, 257, 10), feature_stats(n + 31, 257, 11)
    ref = pytorch_fid_distance(pytorch_fid, m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    for method in ("auto", "eigh") + (("cholesky",) if n > 257 else ()):
        ours = frechet_distance(m1, s1, m2, s2, method=method)
        assert abs(ours - ref) <= 1e-6 * abs(ref), (method, ours, ref)
    torch.testing.assert_close(float(frechet_distance_reference(m1, s1, m2, s2)), ref, rtol=1e-6, atol=0)


def test_cholesky_route_swaps_roles_and_refuses_two_singular_sigmas():
    (_, s1), (_, s2) = feature_stats(50, 64, 0), feature_stats(200, 64, 1)  # s1 singular, s2 not
    expected = trace_sqrt_product(s1, s2, "eigh")
    torch.testing.assert_close(trace_sqrt_product(s1, s2, "cholesky"), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(trace_sqrt_product(s2, s1, "cholesky"), expected, rtol=1e-9, atol=0)
    (_, s3) = feature_stats(40, 64, 2)
    with pytest.raises(torch.linalg.LinAlgError):
        trace_sqrt_product(s1, s3, "cholesky")


def test_diagonal_closed_form():
    a = torch.rand(33, dtype=torch.float64) + 0.1
    b = torch.rand(33, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_same_distribution_is_zero_and_symmetric():
    (m1, s1), (m2, s2) = feature_stats(400, 96, 5), feature_stats(450, 96, 6)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-9 * float(torch.trace(s1))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-10)


def test_numpy_and_float32_inputs(pytorch_fid):
    (m1, s1), (m2, s2) = feature_stats(300, 40, 7), feature_stats(300, 40, 8)
    ref = pytorch_fid_distance(pytorch_fid, m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    got_np = frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    assert got_np == pytest.approx(ref, rel=1e-6)
    got_mixed = frechet_distance(m1, s1.numpy(), m2.numpy(), s2)
    assert got_mixed == pytest.approx(ref, rel=1e-6)
    # float32 statistics are computed in float64 (pytorch-fid's sqrtm would run in float32):
    # compare with pytorch-fid on the same values upcast
    f32 = [t.float() for t in (m1, s1, m2, s2)]
    ref32 = pytorch_fid_distance(pytorch_fid, *[t.double().numpy() for t in f32])
    assert frechet_distance(*f32) == pytest.approx(ref32, rel=1e-6)


def test_eps_retry_matches_pytorch_fid_eps_branch(monkeypatch, pytorch_fid):
    """Force the first evaluation to fail in both: the eps-offset results must agree."""
    (m1, s1), (m2, s2) = feature_stats(120, 200, 12), feature_stats(150, 200, 13)
    eps = 1e-4

    real_sqrtm = pytorch_fid.linalg.sqrtm
    calls = {"scipy": 0, "ours": 0}

    def failing_sqrtm(a, disp=True, **kw):
        calls["scipy"] += 1
        if calls["scipy"] == 1:
            return np.full_like(a, np.nan), 0.0
        return real_sqrtm(a, disp=disp, **kw)

    monkeypatch.setattr(pytorch_fid.linalg, "sqrtm", failing_sqrtm)
    ref = pytorch_fid_distance(pytorch_fid, m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy(), eps=eps)
    assert calls["scipy"] == 2

    real_trace = frechet_mod.trace_sqrt_product

    def failing_trace(a, b, method="auto"):
        calls["ours"] += 1
        if calls["ours"] == 1:
            raise torch.linalg.LinAlgError("simulated non-convergence")
        return real_trace(a, b, method)

    monkeypatch.setattr(frechet_mod, "trace_sqrt_product", failing_trace)
    with pytest.warns(RuntimeWarning, match="adding 0.0001 to the diagonal"):
        ours = frechet_distance(m1, s1, m2, s2, eps=eps)
    assert calls["ours"] == 2
    assert ours == pytest.approx(ref, rel=1e-6)
    # and the offset matters (so the comparison is not vacuous)
    assert abs(frechet_distance(m1, s1, m2, s2) - ref) > 1e-4 * abs(ref)


def test_small_negative_eigenvalue_is_real_part_like_pytorch_fid(pytorch_fid):
    """A rounding-size negative eigenvalue gives an imaginary part < 1e-3: both drop it."""
    mu = torch.zeros(3, dtype=torch.float64)
    s1 = torch.eye(3, dtype=torch.float64)
    s2 = torch.diag(torch.tensor([2.0, 0.5, -1e-8], dtype=torch.float64))
    ref = pytorch_fid_distance(pytorch_fid, mu.numpy(), s1.numpy(), mu.numpy(), s2.numpy())
    assert frechet_distance(mu, s1, mu, s2, method="eigh") == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(ref, rel=1e-9)


def test_large_imaginary_component_raises_like_pytorch_fid(pytorch_fid):
    mu = torch.zeros(3, dtype=torch.float64)
    s1 = torch.eye(3, dtype=torch.float64)
    s2 = torch.diag(torch.tensor([2.0, 0.5, -0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="Imaginary component"):
        pytorch_fid_distance(pytorch_fid, mu.numpy(), s1.numpy(), mu.numpy(), s2.numpy())
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, s1, mu, s2)
    with pytest.raises(ValueError, match="sigma1 has a negative eigenvalue"):
        frechet_distance(mu, s2, mu, s1, method="eigh")


def test_custom_op_fake_and_compile():
    (m1, s1), (m2, s2) = feature_stats(100, 24, 14), feature_stats(100, 24, 15)
    out = torch.ops.dualdiff.frechet_distance(m1, s1, m2, s2, 1e-6, "auto", "torch")
    assert out.dim() == 0 and out.dtype == torch.float64
    assert float(out) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-12)
    torch.library.opcheck(torch.ops.dualdiff.frechet_distance.default, (m1, s1, m2, s2, 1e-6, "auto", "torch"),
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, b, c, d):
        return torch.ops.dualdiff.frechet_distance(a, b, c, d, 1e-6, "auto", "torch") * 2

    assert float(f(m1, s1, m2, s2)) == pytest.approx(2 * float(out), rel=1e-12)


def test_forced_unavailable_backend_raises():
    (m1, s1), (m2, s2) = feature_stats(50, 8, 0), feature_stats(50, 8, 1)
    with forced_backend("cpp"), pytest.raises(BackendUnavailableError, match="frechet_distance"):
        frechet_distance(m1, s1, m2, s2)
    with forced_backend("torch"):
        assert frechet_distance(m1, s1, m2, s2) > 0


def test_bad_inputs():
    d = 6
    mu, s = torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    with pytest.raises(ValueError, match="mu1 must be 1-D"):
        frechet_distance(mu[None], s, mu, s)
    with pytest.raises(ValueError, match="mu2 must be 1-D"):
        frechet_distance(mu, s, s, s)
    with pytest.raises(ValueError, match="sigma1 must be a square"):
        frechet_distance(mu, s[:, :4], mu, s)
    with pytest.raises(ValueError, match="sigma2 must be a square"):
        frechet_distance(mu, s, mu, s[0])
    with pytest.raises(ValueError, match="sigma1 shape .* does not match mu1"):
        frechet_distance(mu, torch.eye(d + 1, dtype=torch.float64), mu, s)
    with pytest.raises(ValueError, match="sigma2 shape .* does not match mu2"):
        frechet_distance(mu, s, mu, torch.eye(d - 1, dtype=torch.float64))
    mu_b, s_b = torch.zeros(d + 2, dtype=torch.float64), torch.eye(d + 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="mu2 has D=8 dimensions but mu1 has D=6"):
        frechet_distance(mu, s, mu_b, s_b)
    with pytest.raises(ValueError, match="mu1 is empty"):
        frechet_distance(mu[:0], s[:0, :0], mu[:0], s[:0, :0])
    bad = s.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        frechet_distance(mu, s, mu, bad)
    asym = s.clone()
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="sigma1 is not symmetric"):
        frechet_distance(mu, asym, mu, s)
    with pytest.raises(TypeError, match="sigma1 must be a floating"):
        frechet_distance(mu, torch.eye(d, dtype=torch.int64), mu, s)
    with pytest.raises(TypeError, match="mu2 must be a floating array"):
        frechet_distance(mu, s, np.zeros(d, dtype=np.int64), s)
    with pytest.raises(TypeError, match="mu1 must be a torch.Tensor or numpy"):
        frechet_distance([0.0] * d, s, mu, s)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="sqrtm")
    with pytest.raises(ValueError, match="eps"):
        frechet_distance(mu, s, mu, s, eps=-1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(stats_2048_full):
    (m1, s1), (m2, s2) = stats_2048_full
    cpu = frechet_distance(m1, s1, m2, s2)
    gpu = frechet_distance(m1.cuda(), s1.cuda(), m2.cuda(), s2.cuda())
    assert gpu == pytest.approx(cpu, rel=1e-9)
    gpu_eigh = frechet_distance(m1.cuda(), s1.cuda(), m2.cuda(), s2.cuda(), method="eigh")
    assert gpu_eigh == pytest.approx(cpu, rel=1e-9)
    with pytest.raises(ValueError, match="one device"):
        frechet_distance(m1.cuda(), s1, m2, s2)
