"""Fused β-VAE loss: reconstruction from logits + Gaussian KL, in one pass over the images.

With l = recon_logits, s = sigmoid(l), x the target in [0, 1] (N = l.numel() elements,
B = batch) and mu, logvar of shape [B, latent]:

    recon "bce":  r_i = BCE(s_i, x_i) = max(l_i, 0) - l_i x_i + log(1 + exp(-|l_i|))   (from logits, stable)
    recon "mse":  r_i = (s_i - x_i)²
    kl_b        = -0.5 · Σ_j (1 + logvar_bj - mu_bj² - exp(logvar_bj))
    reduction "mean":  recon = Σ_i r_i / N,  kl = Σ_b kl_b / B
    reduction "sum":   recon = Σ_i r_i,      kl = Σ_b kl_b
    total = recon + kl_weight · kl

Gradients (g_t, g_r, g_k the upstream gradients of total, recon, kl; c_r = 1/N or 1,
c_k = 1/B or 1):
    d/dl_i      = (g_r + g_t) c_r · (s_i - x_i)                       (bce)
                = (g_r + g_t) c_r · 2 (s_i - x_i) s_i (1 - s_i)       (mse)
    d/dmu_bj    = (g_k + kl_weight g_t) c_k · mu_bj
    d/dlogvar_bj= (g_k + kl_weight g_t) c_k · 0.5 (exp(logvar_bj) - 1)
x is a constant target: it gets no gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dualdiff._backend import DTYPE_CODES, cuda_stream, device_guard, extension, select_backend, select_by_size
from dualdiff.ops._checks import FLOAT_DTYPES, check_choice, check_same_device, check_same_shape, check_tensor

RECON_KINDS = ("bce", "mse")
REDUCTIONS = ("mean", "sum")
SUPPORTED = ("triton", "cuda", "cpp", "torch")
PREFER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

# auto's size rule (dualdiff._backend.select_by_size): below AUTO_MIN_NUMEL[device][backend]
# elements of recon_logits (vae_loss) / KL_AUTO_MIN_NUMEL[device][backend] elements of mu
# (gaussian_kl) auto runs the torch reference instead; 0 = always fused. Forced backends are never
# overridden. CPU crossovers, measured 2026-12-07 on the 2-core AMD EPYC (Zen 5), 1 torch thread,
# forward + backward, cpp vs torch alternating, median of 25 rounds (t_torch / t_cpp; the machine
# was loaded, load average 10-12, so each size was measured twice):
#   vae_loss (latent [B, 32]):  16 el. 0.98x / 1.02x, 64 el. 0.98x, 192 el. 1.22x, 384 el. 1.16x /
#       1.01x (1.09x at load ~1), 768 el. 1.06x, 3072 el. 1.39x / 1.47x, 196608 el. 4.3x-15x.
#       Below 128 elements the fused op gains nothing (its custom-op dispatch costs what the
#       reference's few small ops do): torch there.
#   gaussian_kl:  512 el. 0.91x / 1.02x, 4096 el. 0.87x, 8192 el. 1.02x / 1.06x, 16384 el. 1.30x,
#       32768 el. 1.16x, 65536 el. 1.46x / 5.4x: cpp from 16384 latent elements.
AUTO_MIN_NUMEL_CPU = 128
KL_AUTO_MIN_NUMEL_CPU = 16384
AUTO_MIN_NUMEL_CUDA = 0  # unmeasured on a GPU: always fused (measure with benchmarks/bench_vae_loss.py)
AUTO_MIN_NUMEL = {"cpu": {"cpp": AUTO_MIN_NUMEL_CPU},
                  "cuda": {"triton": AUTO_MIN_NUMEL_CUDA, "cuda": AUTO_MIN_NUMEL_CUDA}}
KL_AUTO_MIN_NUMEL = {"cpu": {"cpp": KL_AUTO_MIN_NUMEL_CPU},
                     "cuda": {"triton": AUTO_MIN_NUMEL_CUDA, "cuda": AUTO_MIN_NUMEL_CUDA}}


# ----------------------------------------------------------------------------- reference
def gaussian_kl_reference(mu: Tensor, logvar: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, reduced over the batch (fp32)."""
    mu, logvar = mu.float(), logvar.float()
    per_sample = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def vae_loss_reference(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor,
                       kl_weight: float = 1.0, recon: str = "bce",
                       reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """The specification in plain PyTorch (fp32): (total, recon, kl)."""
    l, t = recon_logits.float(), x.float()
    if recon == "bce":
        # softplus(l) - l x = max(l, 0) - l x + log(1 + exp(-|l|)); F.softplus is stable and,
        # unlike the max/abs spelling, has the exact gradient sigmoid(l) at l = 0 too.
        terms = F.softplus(l) - l * t
    else:
        terms = (torch.sigmoid(l) - t).pow(2)
    r = terms.mean() if reduction == "mean" else terms.sum()
    kl = gaussian_kl_reference(mu, logvar, reduction)
    return r + kl_weight * kl, r, kl


# ----------------------------------------------------------------------------- backends
def _scales(recon_logits: Tensor | None, mu: Tensor, reduction: str) -> tuple[float, float]:
    if reduction == "sum":
        return 1.0, 1.0
    n = recon_logits.numel() if recon_logits is not None else 1
    return 1.0 / n, 1.0 / mu.shape[0]


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (the tests swap in NaN-poisoned buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: Tensor) -> Tensor:
    return _empty(t.shape, t.dtype, t.device)


def _scalar_outputs(device: torch.device, k: int) -> list[Tensor]:
    return [_empty((), torch.float32, device) for _ in range(k)]


def _forward(backend: str, recon_logits: Tensor | None, x: Tensor | None, mu: Tensor,
             logvar: Tensor, kl_weight: float, mse: bool, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """(total, recon, kl) as [] fp32; recon_logits None: KL only (total, recon left unwritten).
    Launches run on the tensors' device (made current) and its current stream."""
    with device_guard(mu.device):
        return _forward_here(backend, recon_logits, x, mu, logvar, kl_weight, mse, reduction)


def _forward_here(backend, recon_logits, x, mu, logvar, kl_weight, mse, reduction):
    total, rec, kl = _scalar_outputs(mu.device, 3)
    recon_scale, kl_scale = _scales(recon_logits, mu, reduction)
    has_recon = recon_logits is not None
    if backend == "triton":
        from dualdiff.kernels import vae as K

        K.vae_loss_forward(recon_logits, x, mu, logvar, total, rec, kl, recon_scale=recon_scale,
                           kl_scale=kl_scale, kl_weight=kl_weight, mse=mse)
    elif backend == "cpp":
        # fp32 kernels: fp16 / bf16 inputs are upcast here.
        if has_recon:
            recon_logits, x = recon_logits.float(), x.float()
        mu, logvar = mu.float(), logvar.float()
        extension().vae_loss_forward_cpu(
            recon_logits.data_ptr() if has_recon else 0, x.data_ptr() if has_recon else 0,
            recon_logits.numel() if has_recon else 0, mu.data_ptr(), logvar.data_ptr(), mu.numel(),
            total.data_ptr(), rec.data_ptr(), kl.data_ptr(), recon_scale, kl_scale, kl_weight,
            mse, has_recon)
    elif backend == "cuda":
        n = recon_logits.numel() if has_recon else 0
        p_r, p_k = _cuda_partial_counts(n, mu.numel(), mu.device)
        partials = _empty(p_r + p_k, torch.float32, mu.device)
        extension().vae_loss_forward_cuda(
            recon_logits.data_ptr() if has_recon else 0, x.data_ptr() if has_recon else 0, n,
            DTYPE_CODES[recon_logits.dtype] if has_recon else DTYPE_CODES[mu.dtype],
            mu.data_ptr(), logvar.data_ptr(), mu.numel(), DTYPE_CODES[mu.dtype],
            partials.data_ptr(), p_r, p_k, total.data_ptr(), rec.data_ptr(), kl.data_ptr(),
            recon_scale, kl_scale, kl_weight, mse, has_recon, cuda_stream(mu.device))
    else:  # pragma: no cover - the torch backend never reaches the custom op
        raise AssertionError(f"vae_loss: backend {backend!r} has no fused forward")
    return total, rec, kl


_SM_COUNT: dict[int, int] = {}
CUDA_THREADS = 256       # threads per block of csrc/vae_loss.cu (kThreads)
CUDA_MAX_GRID_X = 2**31 - 1


def cuda_forward_blocks(n: int, m: int, sm_count: int) -> tuple[int, int]:
    """Blocks of the CUDA forward (p_r, p_k): up to 4 per SM for the image term (grid-stride,
    4096 elements per block per step), enough for the latent term (256 per block)."""
    cap = 4 * sm_count
    p_r = min(cap, -(-n // 4096)) if n else 0
    return p_r, min(cap, -(-m // CUDA_THREADS))


def cuda_backward_blocks(n: int, m: int, element_size: int) -> tuple[int, int]:
    """Blocks of the CUDA backward (g_r, g_k): one 16-byte pack of the image per thread, one
    latent element per thread; raises ValueError past the 1-D grid limit."""
    per_block = CUDA_THREADS * (16 // element_size)
    g_r, g_k = -(-n // per_block), -(-m // CUDA_THREADS)
    if g_r + g_k > CUDA_MAX_GRID_X:
        raise ValueError(f"vae_loss: {n} image and {m} latent elements need {g_r + g_k} CUDA "
                         f"blocks, over the grid limit {CUDA_MAX_GRID_X}")
    return g_r, g_k


def _cuda_partial_counts(n: int, m: int, device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return cuda_forward_blocks(n, m, _SM_COUNT[index])


def _backward(backend: str, recon_logits: Tensor | None, x: Tensor | None, mu: Tensor,
              logvar: Tensor, g_total: Tensor | None, g_recon: Tensor | None, g_kl: Tensor,
              kl_weight: float, mse: bool, reduction: str) -> tuple[Tensor | None, Tensor, Tensor]:
    """(d/d recon_logits, d/d mu, d/d logvar); upstream gradients are [] fp32 on the device.
    Launches run on the tensors' device (made current) and its current stream."""
    with device_guard(mu.device):
        return _backward_here(backend, recon_logits, x, mu, logvar, g_total, g_recon, g_kl,
                              kl_weight, mse, reduction)


def _backward_here(backend, recon_logits, x, mu, logvar, g_total, g_recon, g_kl, kl_weight, mse,
                   reduction):
    has_recon = recon_logits is not None
    recon_scale, kl_scale = _scales(recon_logits, mu, reduction)
    if backend == "triton":
        from dualdiff.kernels import vae as K

        g_l = _empty_like(recon_logits) if has_recon else None
        g_mu, g_lv = _empty_like(mu), _empty_like(logvar)
        K.vae_loss_backward(recon_logits, x, mu, logvar, g_total, g_recon, g_kl, g_l, g_mu, g_lv,
                            recon_scale=recon_scale, kl_scale=kl_scale, kl_weight=kl_weight, mse=mse)
        return g_l, g_mu, g_lv
    if backend == "cpp":
        dtypes = (recon_logits.dtype if has_recon else None, mu.dtype, logvar.dtype)
        if has_recon:
            recon_logits, x = recon_logits.float(), x.float()
        mu, logvar = mu.float(), logvar.float()
        g_l = _empty_like(recon_logits) if has_recon else None
        g_mu, g_lv = _empty_like(mu), _empty_like(logvar)
        extension().vae_loss_backward_cpu(
            recon_logits.data_ptr() if has_recon else 0, x.data_ptr() if has_recon else 0,
            g_l.data_ptr() if has_recon else 0, recon_logits.numel() if has_recon else 0,
            mu.data_ptr(), logvar.data_ptr(), g_mu.data_ptr(), g_lv.data_ptr(), mu.numel(),
            g_total.data_ptr() if has_recon else 0, g_recon.data_ptr() if has_recon else 0,
            g_kl.data_ptr(), recon_scale, kl_scale, kl_weight, mse, has_recon)
        return (g_l.to(dtypes[0]) if has_recon else None), g_mu.to(dtypes[1]), g_lv.to(dtypes[2])
    if backend == "cuda":
        g_l = _empty_like(recon_logits) if has_recon else None
        g_mu, g_lv = _empty_like(mu), _empty_like(logvar)
        n = recon_logits.numel() if has_recon else 0
        g_r, g_k = cuda_backward_blocks(n, mu.numel(),
                                        (recon_logits if has_recon else mu).element_size())
        extension().vae_loss_backward_cuda(
            recon_logits.data_ptr() if has_recon else 0, x.data_ptr() if has_recon else 0,
            g_l.data_ptr() if has_recon else 0, n, g_r, g_k,
            DTYPE_CODES[recon_logits.dtype] if has_recon else DTYPE_CODES[mu.dtype],
            mu.data_ptr(), logvar.data_ptr(), g_mu.data_ptr(), g_lv.data_ptr(), mu.numel(),
            DTYPE_CODES[mu.dtype], g_total.data_ptr() if has_recon else 0,
            g_recon.data_ptr() if has_recon else 0, g_kl.data_ptr(), recon_scale, kl_scale,
            kl_weight, mse, has_recon, cuda_stream(mu.device))
        return g_l, g_mu, g_lv
    raise AssertionError(f"vae_loss: backend {backend!r} has no fused backward")  # pragma: no cover


def _grad_scalar(g: Tensor | None, like: Tensor) -> Tensor:
    if g is None:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return g.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dualdiff::vae_loss_fwd", mutates_args=())
def _vae_loss_fwd(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, kl_weight: float,
                  recon: str, reduction: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(backend, recon_logits, x, mu, logvar, kl_weight, recon == "mse", reduction)


@_vae_loss_fwd.register_fake
def _(recon_logits, x, mu, logvar, kl_weight, recon, reduction, backend):
    return tuple(recon_logits.new_empty((), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("dualdiff::vae_loss_bwd", mutates_args=())
def _vae_loss_bwd(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, g_total: Tensor,
                  g_recon: Tensor, g_kl: Tensor, kl_weight: float, recon: str, reduction: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(backend, recon_logits, x, mu, logvar, g_total, g_recon, g_kl, kl_weight,
                     recon == "mse", reduction)


@_vae_loss_bwd.register_fake
def _(recon_logits, x, mu, logvar, g_total, g_recon, g_kl, kl_weight, recon, reduction, backend):
    return torch.empty_like(recon_logits), torch.empty_like(mu), torch.empty_like(logvar)


def _vae_setup_context(ctx, inputs, output):
    recon_logits, x, mu, logvar, kl_weight, recon, reduction, backend = inputs
    ctx.save_for_backward(recon_logits, x, mu, logvar)
    ctx.args = (kl_weight, recon, reduction, backend)


def _vae_backward(ctx, g_total, g_recon, g_kl):
    recon_logits, x, mu, logvar = ctx.saved_tensors
    g_l, g_mu, g_lv = _vae_loss_bwd(recon_logits, x, mu, logvar, _grad_scalar(g_total, mu),
                                    _grad_scalar(g_recon, mu), _grad_scalar(g_kl, mu), *ctx.args)
    return g_l, None, g_mu, g_lv, None, None, None, None


_vae_loss_fwd.register_autograd(_vae_backward, setup_context=_vae_setup_context)


@torch.library.custom_op("dualdiff::gaussian_kl_fwd", mutates_args=())
def _gaussian_kl_fwd(mu: Tensor, logvar: Tensor, reduction: str, backend: str) -> Tensor:
    return _forward(backend, None, None, mu, logvar, 0.0, False, reduction)[2]


@_gaussian_kl_fwd.register_fake
def _(mu, logvar, reduction, backend):
    return mu.new_empty((), dtype=torch.float32)


@torch.library.custom_op("dualdiff::gaussian_kl_bwd", mutates_args=())
def _gaussian_kl_bwd(mu: Tensor, logvar: Tensor, g_kl: Tensor, reduction: str,
                     backend: str) -> tuple[Tensor, Tensor]:
    _, g_mu, g_lv = _backward(backend, None, None, mu, logvar, None, None, g_kl, 0.0, False, reduction)
    return g_mu, g_lv


@_gaussian_kl_bwd.register_fake
def _(mu, logvar, g_kl, reduction, backend):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _kl_setup_context(ctx, inputs, output):
    mu, logvar, reduction, backend = inputs
    ctx.save_for_backward(mu, logvar)
    ctx.args = (reduction, backend)


def _kl_backward(ctx, g_kl):
    mu, logvar = ctx.saved_tensors
    g_mu, g_lv = _gaussian_kl_bwd(mu, logvar, _grad_scalar(g_kl, mu), *ctx.args)
    return g_mu, g_lv, None, None


_gaussian_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup_context)


# ----------------------------------------------------------------------------- public API
def _check_latents(mu: object, logvar: object) -> None:
    check_tensor("mu", mu, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("logvar", logvar, dtypes=FLOAT_DTYPES, ndim=2)
    check_same_shape("mu", mu, "logvar", logvar)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar dtype {logvar.dtype} does not match mu dtype {mu.dtype}")


def _check_reduction(reduction: object) -> None:
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)


def auto_backend(numel: int, device: torch.device | str, op: str = "vae_loss") -> str:
    """The backend ``op`` (vae_loss | gaussian_kl) runs (``DUALDIFF_BACKEND`` honoured, else
    auto's choice) for ``numel`` elements (vae_loss: of recon_logits; gaussian_kl: of mu)."""
    table = KL_AUTO_MIN_NUMEL if op == "gaussian_kl" else AUTO_MIN_NUMEL
    return select_by_size(select_backend(op, device, SUPPORTED, PREFER, None), device, None, numel, table)


def gaussian_kl(mu: Tensor, logvar: Tensor, *, reduction: str = "mean",
                backend: str | None = None) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) of a diagonal-Gaussian posterior.

    ``kl = -0.5 * sum_latent(1 + logvar - mu² - exp(logvar))`` per sample, then the mean
    (``reduction="mean"``) or the sum (``"sum"``) over the batch.

    Args:
        mu, logvar: ``[B, latent]``, fp32 / bf16 / fp16, same dtype and device. Non-contiguous
            inputs are copied to contiguous memory.
        reduction: ``"mean"`` | ``"sum"`` over the batch.
        backend: None/"auto" or one of triton, cuda, cpp, torch (overrides DUALDIFF_BACKEND).

    Returns: a 0-d fp32 tensor (accumulated in fp32), differentiable w.r.t. mu and logvar.
    """
    _check_latents(mu, logvar)
    check_same_device({"mu": mu, "logvar": logvar})
    _check_reduction(reduction)
    name = select_by_size(select_backend("gaussian_kl", mu.device, SUPPORTED, PREFER, backend),
                          mu.device, backend, mu.numel(), KL_AUTO_MIN_NUMEL)
    if name == "torch":
        return gaussian_kl_reference(mu, logvar, reduction)
    return _gaussian_kl_fwd(mu.contiguous(), logvar.contiguous(), reduction, name)


def vae_loss(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *,
             kl_weight: float = 1.0, recon: str = "bce", reduction: str = "mean",
             backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fused β-VAE loss: ``(total, recon, kl)`` with ``total = recon + kl_weight * kl``.

    Args:
        recon_logits: decoder output *before* the sigmoid, ``[B, ...]`` (any shape with the
            batch first), fp32 / bf16 / fp16.
        x: the target image in [0, 1], same shape and dtype as ``recon_logits`` (the range is
            not checked: that would need a host synchronisation). x gets no gradient.
        mu, logvar: posterior parameters ``[B, latent]``, same dtype as each other (may differ
            from the image dtype), same batch B as the images.
        kl_weight: β (or the annealed weight), a finite Python float.
        recon: ``"bce"`` — binary cross-entropy of sigmoid(recon_logits) against x, computed
            stably from the logits (softplus form); ``"mse"`` — squared error of
            sigmoid(recon_logits) against x.
        reduction: ``"mean"`` — recon is the mean over all image elements and kl the mean over
            the batch of the per-sample KL (summed over the latent); ``"sum"`` — recon is the
            sum over all image elements and kl the sum over the batch.
        backend: None/"auto" or one of triton, cuda, cpp, torch (overrides DUALDIFF_BACKEND).

    Returns: three 0-d fp32 tensors (accumulated in fp32 whatever the input dtype), each
    differentiable w.r.t. recon_logits, mu and logvar. Non-contiguous inputs are copied to
    contiguous memory. The cpp backend computes in fp32 (fp16/bf16 inputs are upcast, the
    gradients cast back). The torch backend is :func:`vae_loss_reference` under autograd.
    """
    check_tensor("recon_logits", recon_logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_same_shape("recon_logits", recon_logits, "x", x)
    if x.dtype != recon_logits.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match recon_logits dtype {recon_logits.dtype}")
    _check_latents(mu, logvar)
    if mu.shape[0] != recon_logits.shape[0]:
        raise ValueError(f"mu batch size {mu.shape[0]} does not match recon_logits batch size "
                         f"{recon_logits.shape[0]}")
    check_same_device({"recon_logits": recon_logits, "x": x, "mu": mu, "logvar": logvar})
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"kl_weight must be a Python float, got {type(kl_weight).__name__}")
    # under torch.compile an annealed weight becomes a symbolic float (no recompilation per value)
    if not torch.compiler.is_compiling() and not math.isfinite(kl_weight):
        raise ValueError(f"kl_weight must be finite, got {kl_weight}")
    if not isinstance(recon, str):
        raise TypeError(f"recon must be a str, got {type(recon).__name__}")
    check_choice("recon", recon, RECON_KINDS)
    _check_reduction(reduction)
    name = select_by_size(select_backend("vae_loss", recon_logits.device, SUPPORTED, PREFER, backend),
                          recon_logits.device, backend, recon_logits.numel(), AUTO_MIN_NUMEL)
    x = x.detach()
    if name == "torch":
        return vae_loss_reference(recon_logits, x, mu, logvar, kl_weight, recon, reduction)
    args = (recon_logits.contiguous(), x.contiguous(), mu.contiguous(), logvar.contiguous())
    if torch.compiler.is_compiling():
        # Keep kl_weight out of the custom op's arguments: a float argument is specialised, so an
        # annealed weight would recompile every step. The fused op returns recon and kl; the
        # weighted sum is two scalar ops that the compiler fuses.
        _, r, kl = _vae_loss_fwd(*args, 0.0, recon, reduction, name)
        return r + kl_weight * kl, r, kl
    return _vae_loss_fwd(*args, float(kl_weight), recon, reduction, name)
