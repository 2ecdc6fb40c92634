"""``DualTimestepEmbedding``: two diffusers ``Timesteps`` + ``TimestepEmbedding`` pairs (one per
scale) and the projection that combines them, as one fused module.

The diffusers code it replaces (module names are the user's)::

    e0 = embedding0(timesteps0(t0).to(dtype))          # [B, H]
    e1 = embedding1(timesteps1(t1).to(dtype))          # [B, H]
    emb = combine(F.silu(torch.cat([e0, e1], dim=1)))  # [B, H]  (a ResnetBlock's SiLU + Linear)

``DualTimestepEmbedding.from_diffusers(timesteps0, embedding0, timesteps1, embedding1, combine)``
copies the five modules' weights; ``forward(t0, t1)`` returns ``emb``. With ``combine=None`` it
returns ``torch.cat([e0, e1], dim=1)`` (always the plain path).

Fused (:class:`dualdiff.ops.DualTimestepEmbedding`, one kernel on the GPU) when: both
``Timesteps`` have the same ``num_channels``, ``downscale_freq_shift == 0`` and ``scale == 1``
(any ``flip_sin_to_cos``: the cos‖sin order is folded into ``linear_1``'s columns at load time);
both ``TimestepEmbedding`` have ``act_fn="silu"``, no ``post_act_fn``, no ``cond_proj``, biases,
``out_dim == time_embed_dim`` and the same sizes; ``combine`` is an ``nn.Linear(2H, H)`` with
bias. Anything else runs the same modules in plain PyTorch (``.fallback_reason`` says which
option, with a one-time :class:`~dualdiff.compat.FallbackWarning`).

Numerics: the fused features use frequencies ``exp(-ln(10000) k / h)`` computed as
``k * (-ln(10000) / h)`` (diffusers: ``(-ln(10000) k) / h``): the same to ~1 ulp, so outputs agree
to ~1e-5 relative in fp32 at diffusion timesteps (t < 1000).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.compat._fallback import notify_fallback
from dualdiff.ops import DualTimestepEmbedding as _FusedEmbedding

__all__ = ["DualTimestepEmbedding"]


def _fusion_blocker(ts0, emb0, ts1, emb1, combine) -> Optional[str]:
    """Why the five modules cannot run as the fused op, or None."""
    for i, (ts, emb) in enumerate(((ts0, emb0), (ts1, emb1))):
        if float(getattr(ts, "downscale_freq_shift", 0)) != 0.0:
            return f"timesteps{i}.downscale_freq_shift={ts.downscale_freq_shift} (the fused frequencies use shift 0)"
        if float(getattr(ts, "scale", 1)) != 1.0:
            return f"timesteps{i}.scale={ts.scale} (the fused features use scale 1)"
        if getattr(emb, "cond_proj", None) is not None:
            return f"embedding{i} has a cond_proj (condition input)"
        if getattr(emb, "post_act", None) is not None:
            return f"embedding{i} has a post_act_fn"
        if not isinstance(emb.act, nn.SiLU):
            return f"embedding{i}.act is {type(emb.act).__name__}, the fused kernel applies SiLU"
        if emb.linear_1.bias is None or emb.linear_2.bias is None:
            return f"embedding{i} has no biases (sample_proj_bias=False)"
        if emb.linear_2.out_features != emb.linear_1.out_features:
            return f"embedding{i}.out_dim != time_embed_dim"
        if emb.linear_1.in_features != ts.num_channels:
            return f"embedding{i}.linear_1 takes {emb.linear_1.in_features} features, timesteps{i} gives {ts.num_channels}"
    if ts0.num_channels != ts1.num_channels or emb0.linear_1.weight.shape != emb1.linear_1.weight.shape:
        return "the two scales have different sizes"
    if ts0.num_channels < 2:
        return "num_channels < 2"
    if combine is None:
        return "combine=None (concatenation: the fused kernel ends with the combining Linear)"
    h = emb0.linear_1.out_features
    if not isinstance(combine, nn.Linear) or combine.bias is None or tuple(combine.weight.shape) != (h, 2 * h):
        return f"combine is not an nn.Linear({2 * h}, {h}) with bias"
    dtypes = {p.dtype for m in (emb0, emb1, combine) for p in m.parameters()}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        return f"parameter dtypes {sorted(map(str, dtypes))} (the fused op takes one of float32/16, bfloat16)"
    return None


def _sin_cos_columns(weight: torch.Tensor, num_channels: int, flip: bool) -> torch.Tensor:
    """linear_1's weight with columns in the fused sin‖cos(‖0) order (diffusers: cos‖sin if flip)."""
    if not flip:
        return weight
    h = num_channels // 2
    cols = torch.cat([weight[:, h:2 * h], weight[:, :h], weight[:, 2 * h:]], dim=1)
    return cols


class DualTimestepEmbedding(nn.Module):
    """Fused replacement of two diffusers timestep-embedding pairs and their combining Linear.

    ``forward(t0, t1)``: ``[B]`` integer or float timesteps (a python number or 0-d tensor is
    broadcast to the other's B) -> ``[B, H]`` in the parameters' dtype, ``combine(SiLU(e0 ‖ e1))``
    (or ``[B, 2H]`` ``e0 ‖ e1`` with ``combine=None``). Build it with :meth:`from_diffusers`.
    ``fallback_reason`` is None when fused. ``to_diffusers()`` returns the five modules with
    this module's (trained) weights in diffusers' layout.
    """

    def __init__(self, timesteps0: nn.Module, embedding0: nn.Module, timesteps1: nn.Module,
                 embedding1: nn.Module, combine: Optional[nn.Module] = None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.fallback_reason = _fusion_blocker(timesteps0, embedding0, timesteps1, embedding1, combine)
        self.flip = (bool(timesteps0.flip_sin_to_cos), bool(timesteps1.flip_sin_to_cos))
        self.num_channels = timesteps0.num_channels
        self._templates = (copy.deepcopy(timesteps0), copy.deepcopy(timesteps1))
        if self.fallback_reason is None:
            w = embedding0.linear_1.weight
            fused = _FusedEmbedding(self.num_channels, embedding0.linear_1.out_features, backend=backend,
                                    device=w.device, dtype=w.dtype)
            with torch.no_grad():
                for i, emb in enumerate((embedding0, embedding1)):
                    mlp = (fused.mlp0, fused.mlp1)[i]
                    mlp[0].weight.copy_(_sin_cos_columns(emb.linear_1.weight, self.num_channels, self.flip[i]))
                    mlp[0].bias.copy_(emb.linear_1.bias)
                    mlp[2].weight.copy_(emb.linear_2.weight)
                    mlp[2].bias.copy_(emb.linear_2.bias)
                fused.out.weight.copy_(combine.weight)
                fused.out.bias.copy_(combine.bias)
            self.fused = fused
        else:
            self.fused = None
            self.timesteps0, self.timesteps1 = timesteps0, timesteps1
            self.embedding0, self.embedding1 = copy.deepcopy(embedding0), copy.deepcopy(embedding1)
            self.combine = copy.deepcopy(combine)
            notify_fallback("dualdiff.compat.DualTimestepEmbedding", self.fallback_reason)

    @classmethod
    def from_diffusers(cls, timesteps0: nn.Module, embedding0: nn.Module, timesteps1: nn.Module,
                       embedding1: nn.Module, combine: Optional[nn.Module] = None, *,
                       backend: Optional[str] = None) -> "DualTimestepEmbedding":
        """Build from diffusers ``Timesteps``/``TimestepEmbedding`` modules (weights copied) and
        the ``nn.Linear(2H, H)`` applied to ``SiLU(e0 ‖ e1)``."""
        return cls(timesteps0, embedding0, timesteps1, embedding1, combine, backend=backend)

    def forward(self, t0, t1) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(t0, t1)
        dtype = self.embedding0.linear_1.weight.dtype
        t0, t1 = _broadcast(t0, t1, self.embedding0.linear_1.weight.device)
        e0 = self.embedding0(self.timesteps0(t0).to(dtype))
        e1 = self.embedding1(self.timesteps1(t1).to(dtype))
        cat = torch.cat([e0, e1], dim=1)
        return cat if self.combine is None else self.combine(F.silu(cat))

    def to_diffusers(self) -> tuple[nn.Module, ...]:
        """(timesteps0, embedding0, timesteps1, embedding1, combine) with this module's weights
        (diffusers' column order); needs diffusers for the fused case."""
        if self.fused is None:
            return (self.timesteps0, copy.deepcopy(self.embedding0), self.timesteps1,
                    copy.deepcopy(self.embedding1), copy.deepcopy(self.combine))
        from diffusers.models.embeddings import TimestepEmbedding

        f = self.fused
        out = []
        for i, mlp in enumerate((f.mlp0, f.mlp1)):
            emb = TimestepEmbedding(self.num_channels, f.hidden_dim).to(mlp[0].weight)
            with torch.no_grad():
                w = mlp[0].weight
                emb.linear_1.weight.copy_(_sin_cos_columns(w, self.num_channels, self.flip[i]))  # an involution
                emb.linear_1.bias.copy_(mlp[0].bias)
                emb.linear_2.weight.copy_(mlp[2].weight)
                emb.linear_2.bias.copy_(mlp[2].bias)
            out += [copy.deepcopy(self._templates[i]), emb]
        return (*out, copy.deepcopy(f.out))


def _broadcast(t0, t1, device):
    """[B] tensors from tensors / python numbers, as the fused op accepts them."""
    t0 = t0 if isinstance(t0, torch.Tensor) else torch.tensor(t0, device=device)
    t1 = t1 if isinstance(t1, torch.Tensor) else torch.tensor(t1, device=device)
    if t0.dim() == 0 and t1.dim() == 0:
        raise ValueError("t0 and t1 are both scalars: pass at least one as a 1-D tensor [B]")
    if t0.dim() == 0:
        t0 = t0.expand(t1.shape[0])
    if t1.dim() == 0:
        t1 = t1.expand(t0.shape[0])
    return t0, t1
