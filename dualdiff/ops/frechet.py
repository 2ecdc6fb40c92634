r"""Fréchet distance between two Gaussians (the FID formula), on the tensors' device.

    d² = ||μ1 - μ2||² + tr σ1 + tr σ2 - 2 tr (σ1 σ2)^½

pytorch-fid computes ``tr (σ1 σ2)^½`` with ``scipy.linalg.sqrtm`` of the non-symmetric
product (a complex Schur decomposition on the CPU: ~10 s at 2048 dimensions). For
positive semi-definite σ1, σ2 the product σ1σ2 is similar to a symmetric PSD matrix, so
its eigenvalues λ_i are real and non-negative and ``tr (σ1σ2)^½ = Σ_i √λ_i``. We compute
them, in float64 on the tensors' device, from one of two symmetric matrices:

* ``cholesky`` (used first by ``method="auto"``): σ1 = L Lᵀ, then
  ``M = Lᵀ σ2 L = L⁻¹ (σ1σ2) L``, similar to σ1σ2: one Cholesky, two matmuls and one
  eigenvalues-only ``eigvalsh``. Needs σ1 positive definite; if it is not, the roles swap
  (eig(σ1σ2) = eig(σ2σ1)) and σ2 is factored.
* ``eigh`` (fallback when neither Cholesky succeeds, e.g. both rank-deficient from fewer
  samples than dimensions): S = σ1^½ from ``eigh`` (eigenvalues clamped at 0), then
  ``M = S σ2 S`` (its non-zero eigenvalues are those of σ1σ2).

``M`` is symmetrised and its eigenvalues clamped at 0 before the square root.

How pytorch-fid's special cases map:

* Non-finite ``sqrtm`` (singular product) -> it retries with ``eps`` added to both
  diagonals. Our eigenvalue route stays finite for singular PSD input (zero eigenvalues
  give zero roots, as the limit eps -> 0), so the retry happens only when the linear
  algebra fails (``LinAlgError``, non-convergence) or gives a non-finite trace: then
  ``tr ((σ1 + eps I)(σ2 + eps I))^½`` is used with a ``RuntimeWarning``, and the traces of the
  unshifted σ's, exactly like pytorch-fid.
* Small imaginary parts of ``sqrtm`` (rounding) -> it keeps the real part unless an
  imaginary diagonal entry exceeds 1e-3, then raises. Here the imaginary part comes from
  negative eigenvalues λ < 0 (i√|λ|; real part 0): clamping λ at 0 *is* taking the real
  part, and we raise ``ValueError`` when some √|λ| > 1e-3 (λ < -1e-6, plus a rounding
  floor of ``D · ε_float64 · max|λ|``), i.e. when σ1 or σ2 is materially not PSD.

The custom op ``dualdiff::frechet_distance`` returns a 0-d float64 tensor (``register_fake``
gives its meta shape, so ``torch.compile(fullgraph=True)`` traces a call to it). It has no
autograd formula: FID is an evaluation metric, its inputs are statistics, not leaves of a
training graph (the op's output does not require grad).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from dualdiff._backend import select_backend

__all__ = ["frechet_distance", "frechet_distance_reference", "trace_sqrt_product"]

SUPPORTED = ("torch",)
PREFER = {"cuda": ("torch",), "cpu": ("torch",)}
METHODS = ("auto", "cholesky", "eigh")
IMAG_TOL = 1e-3  # pytorch-fid's tolerance on the imaginary part of sqrtm's diagonal
_VALID_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _neg_tol(ev: torch.Tensor) -> float:
    """Largest |λ| of a negative eigenvalue accepted as rounding (see module docstring)."""
    floor = ev.shape[-1] * torch.finfo(torch.float64).eps * float(ev.abs().max())
    return IMAG_TOL ** 2 + floor


def _check_psd(ev: torch.Tensor, what: str) -> None:
    lo = float(ev.min())
    if lo < -_neg_tol(ev):
        raise ValueError(
            f"{what} has a negative eigenvalue {lo:.3e}: the matrix square root has an imaginary "
            f"component {math.sqrt(-lo):.3e} > {IMAG_TOL} (pytorch-fid raises here too); "
            "sigma1 and sigma2 must be positive semi-definite covariances")


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """``tr (σ1 σ2)^½`` (0-d, float64) for symmetric PSD float64 σ1, σ2; see the module docstring.

    Raises ``torch.linalg.LinAlgError`` if the decomposition fails and ``ValueError`` if σ1 or
    σ2 is materially not positive semi-definite.
    """
    m = None
    if method in ("auto", "cholesky"):
        # eig(σ1σ2) = eig(σ2σ1): factor whichever of the two is positive definite
        for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                m = chol.mT @ b @ chol
                break
        if m is None and method == "cholesky":
            raise torch.linalg.LinAlgError("neither sigma1 nor sigma2 is positive definite (Cholesky failed)")
    if m is None:
        w, v = torch.linalg.eigh(sigma1)
        _check_psd(w, "sigma1")
        root = (v * w.clamp_min(0).sqrt()) @ v.mT
        m = root @ sigma2 @ root
    m = (m + m.mT) * 0.5
    ev = torch.linalg.eigvalsh(m)
    _check_psd(ev, "sigma1 @ sigma2")
    return ev.clamp_min(0).sqrt().sum()


def _frechet(mu1, sigma1, mu2, sigma2, eps: float, method: str) -> torch.Tensor:
    """float64 tensors in, 0-d float64 out; pytorch-fid's eps retry (module docstring)."""
    diff = mu1 - mu2
    try:
        tr_covmean = trace_sqrt_product(sigma1, sigma2, method)
        ok = bool(torch.isfinite(tr_covmean))
    except torch.linalg.LinAlgError:
        ok = False
    if not ok:
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of the "
                      "covariance estimates", RuntimeWarning, stacklevel=3)
        offset = eps * torch.eye(sigma1.shape[0], dtype=sigma1.dtype, device=sigma1.device)
        tr_covmean = trace_sqrt_product(sigma1 + offset, sigma2 + offset, method)
        if not bool(torch.isfinite(tr_covmean)):
            raise ValueError("frechet_distance: non-finite result even with eps added to the diagonals")
    return diff.dot(diff) + torch.trace(sigma1) + torch.trace(sigma2) - 2 * tr_covmean


def frechet_distance_reference(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                               sigma2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The specification: the ``eigh`` formulation on float64 copies (0-d float64 tensor)."""
    args = [t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2)]
    args[1] = (args[1] + args[1].mT) * 0.5
    args[3] = (args[3] + args[3].mT) * 0.5
    return _frechet(*args, eps=eps, method="eigh")


@torch.library.custom_op("dualdiff::frechet_distance", mutates_args=())
def _frechet_op(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                eps: float, method: str, backend: str) -> torch.Tensor:
    # backend is always "torch" (torch.linalg on the tensors' device); kept for the convention.
    args = [t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2)]
    args[1] = (args[1] + args[1].mT) * 0.5
    args[3] = (args[3] + args[3].mT) * 0.5
    return _frechet(*args, eps=eps, method=method)


@_frechet_op.register_fake
def _(mu1, sigma1, mu2, sigma2, eps, method, backend):
    return mu1.new_empty((), dtype=torch.float64)


def _as_tensor(name: str, x, device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating)):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x if device is None else x.to(device)
    if isinstance(x, torch.Tensor):
        if x.dtype not in _VALID_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float64, float32, float16, bfloat16), got {x.dtype}")
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _validate(mu1, sigma1, mu2, sigma2) -> None:
    named = {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}
    for name in ("mu1", "mu2"):
        if named[name].dim() != 1:
            raise ValueError(f"{name} must be 1-D [D], got shape {tuple(named[name].shape)}")
        if named[name].numel() == 0:
            raise ValueError(f"{name} is empty")
    for name in ("sigma1", "sigma2"):
        s = named[name]
        if s.dim() != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"{name} must be a square 2-D [D, D] matrix, got shape {tuple(s.shape)}")
    if sigma1.shape[0] != mu1.shape[0]:
        raise ValueError(f"sigma1 shape {tuple(sigma1.shape)} does not match mu1 shape {tuple(mu1.shape)} ([D, D] vs [D])")
    if sigma2.shape[0] != mu2.shape[0]:
        raise ValueError(f"sigma2 shape {tuple(sigma2.shape)} does not match mu2 shape {tuple(mu2.shape)} ([D, D] vs [D])")
    if mu2.shape != mu1.shape:
        raise ValueError(f"mu2 has D={mu2.shape[0]} dimensions but mu1 has D={mu1.shape[0]} (the two sets must match)")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError(f"mu1, sigma1, mu2, sigma2 must be on one device, got {sorted(map(str, devices))}")
    for name, t in named.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite values")
    for name in ("sigma1", "sigma2"):
        s = named[name]
        scale = float(s.abs().max())
        tol = max(1e-6, 100 * torch.finfo(s.dtype).eps) * scale
        if float((s - s.mT).abs().max()) > tol:
            raise ValueError(f"{name} is not symmetric (a covariance matrix must be)")


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, *, method: str = "auto") -> float:
    r"""FID between N(mu1, sigma1) and N(mu2, sigma2): ``||μ1-μ2||² + tr σ1 + tr σ2 - 2 tr (σ1σ2)^½``.

    Args:
        mu1, mu2: ``[D]`` means; sigma1, sigma2: ``[D, D]`` symmetric PSD covariances.
            torch tensors (any float dtype, one device) or numpy float arrays (moved to the
            tensors' device if some arguments are tensors, else computed on the CPU).
        eps: diagonal offset used only if the first evaluation fails (pytorch-fid's rule).
        method: "auto" (Cholesky of σ1, else eigh), "cholesky" or "eigh"; see the module
            docstring. All compute the same value.

    Returns the distance as a Python float, computed in float64 on the tensors' device. Agrees
    with ``pytorch_fid.fid_score.calculate_frechet_distance`` (to ~1e-8 relative on 2048-dim
    statistics in our tests). Bad shapes, non-square or non-symmetric sigma, mismatched D,
    devices or non-finite values raise ValueError naming the argument; non-float input TypeError.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    raw = {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}
    device = next((x.device for x in raw.values() if isinstance(x, torch.Tensor)), None)
    mu1, sigma1, mu2, sigma2 = (_as_tensor(n, x, device) for n, x in raw.items())
    _validate(mu1, sigma1, mu2, sigma2)
    backend = select_backend("frechet_distance", mu1.device, SUPPORTED, PREFER)
    return float(_frechet_op(mu1, sigma1, mu2, sigma2, float(eps), method, backend))
