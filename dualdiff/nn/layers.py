"""Layers that stay differentiable in forward mode (``torch.func.jvp``), eager and compiled.

Two known traps make stock modules unusable inside forward-mode AD:

* ``F.scaled_dot_product_attention`` dispatches to the flash, memory-efficient or cuDNN
  kernel (on the CPU to ``_scaled_dot_product_flash_attention_for_cpu``); none has a
  forward-AD formula and PyTorch does not fall back to the math path by itself, so a jvp
  through it raises ``NotImplementedError``.
* ``F.group_norm`` fails under a compiled jvp on torch 2.11 (it works on later versions).

:class:`GroupNorm` is a drop-in for ``nn.GroupNorm`` (same arguments, parameters and
``state_dict`` keys) that runs ``F.group_norm`` normally and a hand-written group norm built
from elementary ops (each with a forward-AD formula and a decomposition) when forward-AD
tangents may be present (the same switch as the attention below). The native kernel makes a
training step of the tiny LIFT model ~25% faster on the CPU than the composite did.

:class:`SelfAttention2d` is a UNet-style attention block (GroupNorm, 1x1 qkv projection,
multi-head attention over all spatial positions, 1x1 output projection, residual) that
calls ``F.scaled_dot_product_attention`` normally and an explicit softmax attention when
forward-AD tangents may be present. It switches when

* the :func:`jvp_safe` context manager is active (``dualdiff.ops.hutchinson_vhv`` enables
  it around its jvp; the only signal that also works while ``torch.compile`` traces), or
* in eager mode, a forward-AD level is open: ``torch.func.jvp`` or
  ``torch.autograd.forward_ad.dual_level`` (both set ``forward_ad._current_level >= 0``),
  or a functorch ``Jvp`` transform is on the interpreter stack.

Under ``torch.compile`` the eager checks are skipped (they read interpreter state that
dynamo cannot trace); wrap your own compiled jvp code in :func:`jvp_safe`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.autograd.forward_ad as _fwAD
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm", "SelfAttention2d", "jvp_safe", "jvp_safe_enabled", "forward_ad_active",
           "explicit_attention"]

# Module-level switch read by SelfAttention2d.forward. A plain module global: dynamo guards on
# its value (a compiled graph is specialised to True/False) and traces its mutation.
_JVP_SAFE = False


@contextlib.contextmanager
def jvp_safe(enabled: bool = True) -> Iterator[None]:
    """Within the block, dualdiff layers use forward-AD-safe code paths (explicit attention)."""
    global _JVP_SAFE
    old = _JVP_SAFE
    _JVP_SAFE = bool(enabled)
    try:
        yield
    finally:
        _JVP_SAFE = old


def jvp_safe_enabled() -> bool:
    """Whether :func:`jvp_safe` is active."""
    return _JVP_SAFE


def _functorch_jvp_on_stack() -> bool:
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        from torch._C._functorch import TransformType
    except ImportError:  # pragma: no cover - private API moved
        return False
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def forward_ad_active() -> bool:
    """True when forward-AD tangents may reach the current op (see the module docstring)."""
    if _JVP_SAFE:
        return True
    if torch.compiler.is_compiling():
        return False
    if getattr(_fwAD, "_current_level", -1) >= 0:
        return True
    return _functorch_jvp_on_stack()


class GroupNorm(nn.Module):
    """Group normalisation, a drop-in for :class:`torch.nn.GroupNorm` that works under jvp.

    ``y = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]`` with mean and biased
    variance over each group of ``num_channels // num_groups`` channels and all spatial
    positions of one sample. Input ``[N, C, *]`` (any number of trailing dims). Same
    constructor, parameters (``weight``, ``bias``; ones and zeros) and ``state_dict`` keys as
    ``nn.GroupNorm``, so checkpoints load either way. Statistics are computed in float32 for
    fp16/bf16 input (like PyTorch's kernels); the output has the input's dtype (under
    autocast ``nn.GroupNorm`` returns float32 instead).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm expected input [N, {self.num_channels}, *], got shape {tuple(x.shape)}")
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if not forward_ad_active():
            w = self.weight.to(xs.dtype) if self.affine else None
            b = self.bias.to(xs.dtype) if self.affine else None
            return F.group_norm(xs, self.num_groups, w, b, self.eps).to(x.dtype)
        return self._composite(x, xs)

    def _composite(self, x: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The same maths from elementary ops (forward-AD safe, eager and compiled)."""
        n, c = x.shape[0], x.shape[1]
        g = xs.reshape(n, self.num_groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        centered = g - mean
        var = centered.square().mean(dim=-1, keepdim=True)
        y = (centered * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(shape).to(y.dtype) + self.bias.reshape(shape).to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       query_block: int | None = None) -> torch.Tensor:
    """``softmax(q kᵀ / sqrt(d)) v`` from matmul and softmax (both have forward-AD formulas).

    q, k, v: ``[..., L, d]``. ``query_block`` splits the queries into blocks of that many rows
    to bound the ``[..., L, L]`` score matrix (the result is the same).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if query_block is None or query_block >= q.shape[-2]:
        return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
    kt = k.transpose(-2, -1)
    outs = [torch.softmax((qb * scale) @ kt, dim=-1) @ v for qb in q.split(query_block, dim=-2)]
    return torch.cat(outs, dim=-2)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the spatial positions of ``[B, C, *spatial]``.

    ``x + proj(attention(qkv(norm(x))))`` with a :class:`GroupNorm` (``norm_groups``), 1x1
    projections (as ``nn.Linear`` over channels) and ``num_heads`` heads of ``C // num_heads``
    channels. Uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels) unless
    :func:`forward_ad_active`, then :func:`explicit_attention`, optionally over query blocks of
    ``jvp_query_block`` rows to bound memory. Both paths compute the same function.
    """

    def __init__(self, channels: int, num_heads: int = 1, *, norm_groups: int = 32, eps: float = 1e-5,
                 jvp_query_block: int | None = None) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels = channels
        self.num_heads = num_heads
        self.jvp_query_block = jvp_query_block
        self.norm = GroupNorm(min(norm_groups, channels), channels, eps=eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"SelfAttention2d expected input [B, {self.channels}, *spatial], got shape {tuple(x.shape)}")
        b, c = x.shape[0], x.shape[1]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)  # [B, L, C]
        qkv = self.qkv(h).reshape(b, -1, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
        if forward_ad_active():
            a = explicit_attention(q, k, v, query_block=self.jvp_query_block)
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(1, 2).reshape(b, -1, c)  # [B, L, C]
        return x + self.proj(a).transpose(1, 2).reshape(x.shape)
