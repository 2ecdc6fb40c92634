"""dualdiff.compat.DualTimestepEmbedding against the diffusers modules it replaces (installed
diffusers): fused options, options that fall back (with a reason), gradients, round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.compat import DualTimestepEmbedding, FallbackWarning
from dualdiff.testing import forced_backend


def _modules(emb_mod, C=32, H=48, *, flip=True, shift=0.0, scale=1, act="silu", post_act=None, out_dim=None,
             combine=True, flip1=None):
    ts0 = emb_mod.Timesteps(C, flip, shift, scale=scale)
    ts1 = emb_mod.Timesteps(C, flip if flip1 is None else flip1, shift, scale=scale)
    e0 = emb_mod.TimestepEmbedding(C, H, act_fn=act, post_act_fn=post_act, out_dim=out_dim)
    e1 = emb_mod.TimestepEmbedding(C, H, act_fn=act, post_act_fn=post_act, out_dim=out_dim)
    comb = nn.Linear(2 * (out_dim or H), H) if combine else None
    return ts0, e0, ts1, e1, comb


def _diffusers_forward(ts0, e0, ts1, e1, comb, t0, t1):
    """The call site being replaced (a diffusers-style model with two timesteps)."""
    a = e0(ts0(t0).to(e0.linear_1.weight.dtype))
    b = e1(ts1(t1).to(e1.linear_1.weight.dtype))
    cat = torch.cat([a, b], dim=1)
    return cat if comb is None else comb(F.silu(cat))


def _t(B=5):
    return torch.randint(0, 1000, (B,)), torch.randint(0, 1000, (B,))


@pytest.mark.parametrize("flip, flip1", [(True, None), (False, None), (True, False)])
@pytest.mark.parametrize("C", [32, 33])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_matches_diffusers(require, flip, flip1, C, backend):
    emb_mod = require("diffusers.models.embeddings")
    mods = _modules(emb_mod, C=C, H=16, flip=flip, flip1=flip1)
    ours = DualTimestepEmbedding.from_diffusers(*mods)
    assert ours.fallback_reason is None and ours.fused is not None
    t0, t1 = _t(3)
    with forced_backend(backend), torch.no_grad():
        got = ours(t0, t1)
    want = _diffusers_forward(*mods, t0, t1)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_gradients_match(require):
    emb_mod = require("diffusers.models.embeddings")
    mods = _modules(emb_mod)
    ours = DualTimestepEmbedding.from_diffusers(*mods)
    t0, t1 = _t()
    ours(t0, t1).square().sum().backward()
    _diffusers_forward(*mods, t0, t1).square().sum().backward()
    torch.testing.assert_close(ours.fused.out.weight.grad, mods[4].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.fused.mlp1[2].weight.grad, mods[3].linear_2.weight.grad, rtol=1e-4, atol=1e-5)
    # linear_1 columns are stored sin‖cos: map back before comparing (flip_sin_to_cos=True)
    back = ours.to_diffusers()
    torch.testing.assert_close(back[1].linear_1.weight, mods[1].linear_1.weight)
    g = ours.fused.mlp0[0].weight.grad
    h = 16
    torch.testing.assert_close(torch.cat([g[:, h:], g[:, :h]], 1), mods[1].linear_1.weight.grad, rtol=1e-4, atol=1e-5)


def test_to_diffusers_round_trip(require):
    emb_mod = require("diffusers.models.embeddings")
    mods = _modules(emb_mod, C=33)
    back = DualTimestepEmbedding.from_diffusers(*mods).to_diffusers()
    t0, t1 = _t()
    torch.testing.assert_close(_diffusers_forward(*back, t0, t1), _diffusers_forward(*mods, t0, t1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(shift=1.0), "downscale_freq_shift"),
    (dict(scale=2), "scale"),
    (dict(act="mish"), "Mish"),
    (dict(post_act="silu"), "post_act"),
    (dict(out_dim=24), "out_dim"),
    (dict(combine=False), "combine=None"),
])
def test_fallbacks_match_diffusers(require, kwargs, match):
    emb_mod = require("diffusers.models.embeddings")
    mods = _modules(emb_mod, **kwargs)
    from dualdiff.compat._fallback import reset_notices

    reset_notices()
    with pytest.warns(FallbackWarning, match=match):
        ours = DualTimestepEmbedding.from_diffusers(*mods)
    assert match in ours.fallback_reason and ours.fused is None
    t0, t1 = _t()
    torch.testing.assert_close(ours(t0, t1), _diffusers_forward(*mods, t0, t1))


def test_scalar_timestep_broadcast(require):
    emb_mod = require("diffusers.models.embeddings")
    mods = _modules(emb_mod)
    ours = DualTimestepEmbedding.from_diffusers(*mods)
    t0 = torch.tensor([3, 500, 999])
    torch.testing.assert_close(ours(t0, 7), _diffusers_forward(*mods, t0, torch.full((3,), 7)), rtol=2e-5, atol=2e-5)
