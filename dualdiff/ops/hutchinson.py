r"""Hutchinson estimate of the per-sample weighted squared Jacobian norm vᵀ(J⊙J)1.

For ``fn`` mapping a batch to a batch with independent samples, ``J_b = ∂fn(z)_b / ∂z_b``
(output elements i, input elements j) and a weight ``v`` over the input elements:

    target_b = Σ_i Σ_j J_b,ij² v_j

With Rademacher probes ε_k (entries ±1, k = 1..P) and u_k = ε_k ⊙ √v,
E[(J u_k)_i²] = Σ_j J_ij² v_j, so the unbiased estimate is

    hutchinson_vhv(fn, z)_b = (1/P) Σ_k ||J_b u_k||²

Each J u_k is one forward-mode product (``torch.func.jvp``). All probes run in one batched
pass: ``z`` is repeated P times along the batch dimension and the stacked probes are the
tangent, so fn sees a batch of ``P·B`` samples (``chunk_size`` probes at a time to bound
memory). Because samples are independent this is the same computation as a loop over
probes (:func:`hutchinson_vhv_reference`, the specification).

Why this is not a ``torch.library`` custom op: its argument ``fn`` is an arbitrary Python
callable (a module, a compiled module, a closure), and custom ops take only tensors and
scalars; the jvp must also trace *through* fn, which an opaque op would hide from
``torch.compile`` and from autograd. It is plain PyTorch instead, written so that dynamo
traces it: it works with ``fn`` a ``torch.compile``'d module, and with the whole call
wrapped in ``torch.compile``.

Forward-AD traps it handles: scaled_dot_product_attention's fused kernels have no JVP, and
``F.group_norm`` fails under compiled jvp on torch 2.11. The jvp runs inside
:func:`dualdiff.nn.jvp_safe`, which makes :class:`dualdiff.nn.SelfAttention2d` use an explicit
softmax attention; models should use :class:`dualdiff.nn.GroupNorm` (a hand-written drop-in
for ``nn.GroupNorm``). Models with other layers lacking forward-AD formulas will fail in jvp.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from dualdiff.nn.layers import jvp_safe

__all__ = ["hutchinson_vhv", "hutchinson_vhv_reference", "rademacher_probes"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rademacher_probes(probes: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[probes, *like.shape]`` entries ±1 in ``like``'s dtype and device.

    Drawn on ``generator``'s device (default: ``like``'s) and moved, so a CPU generator gives
    the same probes for CPU and CUDA tensors.
    """
    gen_device = generator.device if generator is not None else like.device
    bits = torch.randint(0, 2, (probes, *like.shape), generator=generator, device=gen_device,
                         dtype=torch.int8)
    return (bits * 2 - 1).to(device=like.device, dtype=like.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sqrt_v(v, z: torch.Tensor):
    """√v as a python float or a tensor broadcastable to z (checked by the public function)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return v.to(z.dtype).sqrt()
    return math.sqrt(float(v))


def hutchinson_vhv_reference(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                             eps: torch.Tensor, v=None) -> torch.Tensor:
    """The specification: one ``torch.func.jvp`` per probe, ``(1/P) Σ_k ||J (ε_k √v)||²``.

    eps: ``[P, *z.shape]`` probes. Returns ``[B]`` (float32, float64 for float64 z).
    """
    sv = _sqrt_v(v, z)
    acc = torch.zeros(z.shape[0], dtype=_acc_dtype(z.dtype), device=z.device)
    with jvp_safe():
        for k in range(eps.shape[0]):
            u = (eps[k] if sv is None else eps[k] * sv).contiguous()
            _, ju = torch.func.jvp(fn, (z,), (u,))
            acc = acc + ju.reshape(z.shape[0], -1).to(acc.dtype).square().sum(dim=1)
    return acc / eps.shape[0]


def _jvp_step(f, z_rep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One batched jvp: ``||J u||²`` per row of the folded batch, ``[N]``."""
    _, ju = torch.func.jvp(f, (z_rep,), (u,))
    if not isinstance(ju, torch.Tensor) or ju.dim() < 1:
        raise ValueError("fn must return a tensor with a batch dimension")
    return ju.reshape(ju.shape[0], -1).to(_acc_dtype(z_rep.dtype)).square().sum(dim=1)


def _is_compiled_module(fn) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule
    return isinstance(fn, OptimizedModule) and hasattr(fn, "dynamo_ctx")


def _unwrap(fn):
    return fn._orig_mod if _is_compiled_module(fn) else fn


def _jvp_step_for(fn):
    """The jvp step, compiled with fn's own compiler settings when fn is a compiled module.

    Dynamo does not compile a frame called from inside a functorch transform (a compiled
    module under ``torch.func.jvp`` silently runs eagerly), so for ``torch.compile(module)``
    the whole jvp step is compiled instead, with the module's compile context (backend,
    mode, fullgraph), around the original module. Under an outer ``torch.compile`` the
    plain step is traced as part of the caller's graph.
    """
    if torch.compiler.is_compiling() or not _is_compiled_module(fn):
        return _jvp_step
    return fn.dynamo_ctx(_jvp_step)


def _check_inputs(fn, z, probes, v, chunk_size, generator, eps) -> int:
    """Validate the arguments; returns the probe count."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in _FLOATS:
        raise TypeError(f"z must be a floating tensor (float32, float64, float16, bfloat16), got {z.dtype}")
    if z.dim() < 1:
        raise ValueError(f"z must have a batch dimension, got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"z is empty (shape {tuple(z.shape)})")
    if eps is not None:
        if not isinstance(eps, torch.Tensor):
            raise TypeError(f"eps must be a torch.Tensor, got {type(eps).__name__}")
        if eps.dim() != z.dim() + 1 or tuple(eps.shape[1:]) != tuple(z.shape) or eps.shape[0] < 1:
            raise ValueError(f"eps must have shape [probes, *z.shape] = [P, {', '.join(map(str, z.shape))}], "
                             f"got {tuple(eps.shape)}")
        if eps.dtype not in _FLOATS:
            raise TypeError(f"eps must be a floating tensor, got {eps.dtype}")
        if eps.device != z.device:
            raise ValueError(f"eps is on {eps.device} but z is on {z.device}")
        if generator is not None:
            raise ValueError("generator is unused when eps (explicit probes) is given; pass one or the other")
        if probes is not None and probes != eps.shape[0]:
            raise ValueError(f"probes={probes} does not match eps.shape[0]={eps.shape[0]} "
                             "(pass probes=None or the matching count)")
        probes = eps.shape[0]
    if isinstance(probes, bool) or not isinstance(probes, int):
        raise TypeError(f"probes must be an int, got {type(probes).__name__}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if v is not None:
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point() and v.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"v must be a real tensor, got {v.dtype}")
            if v.device != z.device and v.dim() > 0:
                raise ValueError(f"v is on {v.device} but z is on {z.device}")
            try:
                ok = torch.broadcast_shapes(v.shape, z.shape) == z.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"v of shape {tuple(v.shape)} is not broadcastable to z's shape {tuple(z.shape)}")
            if not torch.compiler.is_compiling() and bool((v < 0).any()):
                raise ValueError("v must be non-negative (the probes are scaled by sqrt(v))")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if not v >= 0:
                raise ValueError(f"v must be non-negative, got {v}")
        else:
            raise TypeError(f"v must be None, a number or a tensor, got {type(v).__name__}")
    return probes


def hutchinson_vhv(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    probes: int | None = 8,
    v: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-sample Hutchinson estimate of ``Σ_i Σ_j J_ij² v_j``, ``J = ∂fn(z)/∂z`` per sample.

    Args:
        fn: maps a batch ``[N, *in]`` to a batch ``[N, *out]`` with samples independent (put
            models in eval mode: batch statistics would couple the repeated samples). It is
            called on ``chunk·B`` samples at once. A ``torch.compile``'d module is fine.
        z: ``[B, *in]`` float32/float64/float16/bfloat16.
        probes: number of Rademacher probes P (>= 1). With ``eps`` given it must equal
            ``eps.shape[0]`` or be None.
        v: weight of each input element: None (1), a non-negative number, or a non-negative
            tensor broadcastable to ``z`` (e.g. ``[B, 1, 1, 1]`` per-sample factors). Probes
            are scaled by ``√v``.
        chunk_size: probes per forward-mode pass (default: all P in one pass). Memory of the
            pass grows with ``chunk_size·B``; the result does not depend on it.
        generator: draws the probes (on its device, then moved to z's); same seed, same probes.
        eps: explicit probes ``[P, *z.shape]`` (normally ±1) instead of random ones.

    Returns:
        ``[B]`` estimates, float32 (float64 for float64 z), ``(1/P) Σ_k ||J_b (ε_k √v)||²``;
        the same values as :func:`hutchinson_vhv_reference` (a loop over probes) given the
        same probes. Differentiable if fn's parameters require grad (run it under
        ``torch.no_grad()`` for analysis to save memory).

    The jvps run inside :func:`dualdiff.nn.jvp_safe` (see the module docstring).
    """
    probes = _check_inputs(fn, z, probes, v, chunk_size, generator, eps)
    if eps is None:
        eps = rademacher_probes(probes, z, generator)
    else:
        eps = eps.to(z.dtype)
    sv = _sqrt_v(v, z)
    b = z.shape[0]
    chunk = probes if chunk_size is None else min(chunk_size, probes)
    acc = torch.zeros(b, dtype=_acc_dtype(z.dtype), device=z.device)
    step = _jvp_step_for(fn)
    with jvp_safe():
        for start in range(0, probes, chunk):
            k = min(chunk, probes - start)
            u = eps[start:start + k]
            if sv is not None:
                u = u * sv
            # fresh contiguous copies: forward AD refuses primals/tangents with overlapping memory
            z_rep = z.repeat(k, *([1] * (z.dim() - 1)))  # [k*B, ...], probe-major
            sq = step(_unwrap(fn), z_rep, u.contiguous().reshape(k * b, *z.shape[1:]))
            if sq.shape[0] != k * b:
                raise ValueError(
                    f"fn changed the batch size: called on {k * b} samples ({k} probes x batch {b}) "
                    f"it returned {sq.shape[0]}; fn must map a batch to a batch")
            acc = acc + sq.reshape(k, b).to(acc.dtype).sum(dim=0)
    return acc / probes
