"""dualdiff.nn layers: GroupNorm (drop-in for nn.GroupNorm) and SelfAttention2d under jvp."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

import dualdiff.nn.layers as layers
from dualdiff.nn import GroupNorm, SelfAttention2d, explicit_attention, forward_ad_active, jvp_safe


def _pair(groups, channels, affine=True, dtype=torch.float32):
    ref = nn.GroupNorm(groups, channels, eps=1e-5, affine=affine).to(dtype)
    ours = GroupNorm(groups, channels, eps=1e-5, affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
        ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 7), 4), ((1, 6, 3, 4, 5), 3), ((3, 12, 17), 12), ((2, 4), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch_forward_backward(shape, groups, affine):
    ref, ours = _pair(groups, shape[1], affine)
    x = (torch.randn(shape) * 3 + 1.5).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), ours(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


def test_group_norm_state_dict_interchangeable():
    ref = nn.GroupNorm(4, 8)
    ours = GroupNorm(4, 8)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys()) == ["weight", "bias"]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        ours.weight.uniform_()
        ours.bias.uniform_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)
    assert list(GroupNorm(2, 4, affine=False).state_dict().keys()) == []
    assert "4, 8, eps=1e-05, affine=True" in repr(ours)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_low_precision(dtype):
    ref, ours = _pair(4, 8)
    x = torch.randn(2, 8, 6, 6)
    y32 = ref(x)
    y = ours.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    # statistics in fp32: only the final rounding of the output differs
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)


def test_group_norm_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 8)
    with pytest.raises(ValueError, match="expected input"):
        GroupNorm(2, 8)(torch.randn(2, 6, 3))


def test_group_norm_jvp_matches_torch_group_norm():
    ref, ours = _pair(4, 8)
    x, t = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    ref, ours = ref.double(), ours.double()
    _, jt_ref = jvp(ref, (x,), (t,))
    _, jt = jvp(ours, (x,), (t,))
    torch.testing.assert_close(jt, jt_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_group_norm_native_path_matches_composite(dtype):
    """Outside forward AD the layer runs F.group_norm; the composite (used under jvp) is the
    same function: outputs and gradients agree."""
    _, ours = _pair(4, 8)
    ours = ours.to(dtype)
    x = (torch.randn(3, 8, 5, 6) * 2 + 0.5).to(dtype).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y = ours(x)
    xs = x2.float() if dtype == torch.bfloat16 else x2
    y_c = ours._composite(x2, xs)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert y.dtype == y_c.dtype == dtype
    torch.testing.assert_close(y, y_c, **tol)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, ours.weight), g)
    gx_c, gw_c = torch.autograd.grad(y_c, (x2, ours.weight), g)
    torch.testing.assert_close(gx, gx_c, **tol)
    torch.testing.assert_close(gw, gw_c, **(tol if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)))


def test_group_norm_uses_native_kernel_outside_jvp_only(monkeypatch):
    calls = _count_calls(monkeypatch, "group_norm")
    _, ours = _pair(4, 8)
    x = torch.randn(2, 8, 4, 4)
    ours(x)
    assert calls["n"] == 1
    jvp(ours, (x,), (torch.randn_like(x),))
    with jvp_safe():
        ours(x)
    assert calls["n"] == 1


def test_group_norm_compiled_jvp():
    """Compiled jvp code runs under jvp_safe (the module's contract): the composite path."""
    _, ours = _pair(2, 4)

    def f(x, t):
        with jvp_safe():
            return jvp(ours, (x,), (t,))

    x, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out, jt = torch.compile(f, backend="aot_eager", fullgraph=True)(x, t)
    out_e, jt_e = f(x, t)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(jt, jt_e)


def test_explicit_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 37, 8, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(explicit_attention(q, k, v), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit_attention(q, k, v, query_block=10), ref, rtol=1e-10, atol=1e-10)


def test_sdpa_trap_is_real_on_this_torch():
    """Documents the trap SelfAttention2d works around (fused SDPA kernels have no JVP)."""
    q = torch.randn(1, 2, 8, 4)
    try:
        jvp(lambda x: F.scaled_dot_product_attention(x, x, x), (q,), (torch.randn_like(q),))
    except (NotImplementedError, RuntimeError):
        return
    pytest.skip("this torch has a forward-AD formula for the default SDPA kernel")


def _count_calls(monkeypatch, name: str) -> dict:
    """Count the calls of ``F.<name>`` made by dualdiff.nn.layers: ``calls["n"]``."""
    calls = {"n": 0}
    real = getattr(F, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(layers.F, name, counting)
    return calls


def _count_sdpa(monkeypatch):
    return _count_calls(monkeypatch, "scaled_dot_product_attention")


def test_attention_uses_sdpa_outside_jvp_and_explicit_inside(monkeypatch):
    calls = _count_sdpa(monkeypatch)
    attn = SelfAttention2d(8, num_heads=2, norm_groups=4).double()
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    y = attn(x)
    assert calls["n"] == 1
    assert not forward_ad_active()
    # eager jvp without jvp_safe: detected automatically (torch.func.jvp and forward_ad)
    y2, t = jvp(attn, (x,), (torch.randn_like(x),))
    assert calls["n"] == 1
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = attn(fwAD.make_dual(x, torch.randn_like(x)))
        assert fwAD.unpack_dual(out).tangent is not None
    assert calls["n"] == 1
    with jvp_safe():
        assert forward_ad_active()
        attn(x)
    assert calls["n"] == 1
    assert not forward_ad_active()


def test_attention_jvp_matches_reverse_mode_jacobian():
    attn = SelfAttention2d(4, num_heads=2, norm_groups=2, jvp_query_block=5).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    _, jt = jvp(attn, (x,), (t,))
    jac = torch.autograd.functional.jacobian(attn, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(jt.reshape(-1), jac @ t.reshape(-1), rtol=1e-9, atol=1e-10)


def test_attention_compiled_jvp_under_jvp_safe():
    attn = SelfAttention2d(8, num_heads=2, norm_groups=4)
    x, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)

    def f(x, t):
        return jvp(attn, (x,), (t,))

    with jvp_safe():
        out, jt = torch.compile(f, backend="aot_eager", fullgraph=True)(x, t)
        out_e, jt_e = f(x, t)
    torch.testing.assert_close(out, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jt, jt_e, rtol=1e-5, atol=1e-5)


def test_attention_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttention2d(6, num_heads=4)
    with pytest.raises(ValueError, match="expected input"):
        SelfAttention2d(8, norm_groups=4)(torch.randn(2, 4, 3, 3))
