"""dualdiff.ops.hutchinson_vhv against exact Jacobians, the per-probe loop, and under compile."""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from dualdiff.nn import GroupNorm, SelfAttention2d
from dualdiff.ops.hutchinson import hutchinson_vhv, hutchinson_vhv_reference, rademacher_probes

IN_SHAPE = (3, 4)  # per-sample input, 12 elements
OUT_DIM = 5


class TwoLayer(nn.Module):
    """f(x) = W2 tanh(W1 vec(x) + c): J = W2 diag(1 - tanh²(W1 x + c)) W1, known in closed form."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        n = math.prod(IN_SHAPE)
        self.w1 = nn.Parameter(torch.randn(7, n, dtype=dtype) / math.sqrt(n))
        self.c = nn.Parameter(torch.randn(7, dtype=dtype))
        self.w2 = nn.Parameter(torch.randn(OUT_DIM, 7, dtype=dtype))

    def forward(self, x):
        return torch.tanh(x.flatten(1) @ self.w1.T + self.c) @ self.w2.T

    def jacobian(self, x):
        """[B, OUT_DIM, 12], analytic."""
        h = x.flatten(1) @ self.w1.T + self.c
        d = 1 - torch.tanh(h) ** 2
        return torch.einsum("oh,bh,hn->bon", self.w2, d, self.w1)


class TinyUNetBlock(nn.Module):
    """Conv, hand-written GroupNorm, SiLU, down, attention, up, conv: a UNet in miniature."""

    def __init__(self, c=8):
        super().__init__()
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.norm = GroupNorm(4, c)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.attn = SelfAttention2d(c, num_heads=2, norm_groups=4)
        self.up = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.out = nn.Conv2d(2 * c, 3, 3, padding=1)

    def forward(self, x):
        h = F.silu(self.norm(self.inp(x)))
        u = self.up(self.attn(self.down(h)))
        return self.out(torch.cat([h, u], dim=1))


def exact_vhv(jac, v=None):
    """sum_i sum_j J_ij² v_j per sample; jac [B, O, N], v broadcastable to [B, N] or None."""
    sq = jac.square().sum(dim=1)  # [B, N]
    return (sq if v is None else sq * v).sum(dim=1)


def explicit_formula(jac, eps, v=None):
    """mean_k ||J_b (eps_k sqrt v)||² with the exact Jacobian; eps [P, B, N]."""
    u = eps if v is None else eps * v.sqrt()
    return torch.einsum("bon,pbn->pbo", jac, u).square().sum(dim=2).mean(dim=0)


def batch_jacobian(fn, z):
    """Per-sample Jacobians [B, O, N] from torch.autograd.functional.jacobian of the whole batch."""
    b = z.shape[0]
    full = torch.autograd.functional.jacobian(fn, z)  # [B, *out, B, *in]
    full = full.reshape(b, -1, b, z[0].numel())
    return torch.stack([full[i, :, i] for i in range(b)])


def test_analytic_jacobian_is_the_autograd_jacobian():
    fn = TwoLayer()
    z = torch.randn(3, *IN_SHAPE, dtype=torch.float64)
    torch.testing.assert_close(batch_jacobian(fn, z), fn.jacobian(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("v_kind", ["none", "scalar", "per_sample", "per_element"])
def test_fixed_probes_equal_explicit_formula(v_kind):
    fn = TwoLayer()
    b = 3
    z = torch.randn(b, *IN_SHAPE, dtype=torch.float64)
    v = {"none": None, "scalar": 0.37, "per_sample": torch.rand(b, 1, 1, dtype=torch.float64) + 0.1,
         "per_element": torch.rand(IN_SHAPE, dtype=torch.float64)}[v_kind]
    eps = rademacher_probes(6, z, torch.Generator().manual_seed(3))
    est = hutchinson_vhv(fn, z, probes=6, eps=eps, v=v)
    vt = None if v is None else torch.broadcast_to(torch.as_tensor(v, dtype=torch.float64), z.shape).reshape(b, -1)
    expected = explicit_formula(fn.jacobian(z), eps.reshape(6, b, -1), vt)
    assert est.shape == (b,) and est.dtype == torch.float64
    torch.testing.assert_close(est, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_many_probes_converge_to_exact_sum(weighted):
    fn = TwoLayer()
    b, p = 2, 4096
    z = torch.randn(b, *IN_SHAPE, dtype=torch.float64)
    v = torch.rand(b, *IN_SHAPE, dtype=torch.float64) * 2 if weighted else None
    est = hutchinson_vhv(fn, z, probes=p, v=v, chunk_size=1024, generator=torch.Generator().manual_seed(0))
    jac = fn.jacobian(z)
    vt = torch.ones(b, jac.shape[2], dtype=torch.float64) if v is None else v.reshape(b, -1)
    exact = exact_vhv(jac, vt)
    # Rademacher variance of ||J u||²: 2 sum_{j != l} M_jl² v_j v_l with M = JᵀJ
    m = jac.transpose(1, 2) @ jac
    off = m - torch.diag_embed(torch.diagonal(m, dim1=1, dim2=2))
    var = 2 * torch.einsum("bjl,bj,bl->b", off.square(), vt, vt)
    sd = (var / p).sqrt()
    assert ((est - exact).abs() < 5 * sd).all(), (est, exact, sd)
    assert (sd < 0.1 * exact).all()  # the check is informative: 5 sd is well below the value


def test_batch_independence():
    fn = TwoLayer()
    z = torch.randn(4, *IN_SHAPE, dtype=torch.float64)
    eps = rademacher_probes(5, z, torch.Generator().manual_seed(1))
    full = hutchinson_vhv(fn, z, probes=5, eps=eps)
    for i in range(4):
        alone = hutchinson_vhv(fn, z[i:i + 1], probes=5, eps=eps[:, i:i + 1])
        torch.testing.assert_close(alone[0], full[i], rtol=1e-12, atol=0)
    # changing another sample does not change this one
    z2 = z.clone()
    z2[0] += 1
    torch.testing.assert_close(hutchinson_vhv(fn, z2, probes=5, eps=eps)[1:], full[1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_chunk_size_gives_identical_results(chunk):
    fn = TwoLayer()
    z = torch.randn(3, *IN_SHAPE, dtype=torch.float64)
    all_at_once = hutchinson_vhv(fn, z, probes=7, generator=torch.Generator().manual_seed(5))
    chunked = hutchinson_vhv(fn, z, probes=7, chunk_size=chunk, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(chunked, all_at_once, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batched_equals_loop_over_probes_through_unet_block(dtype, tol):
    model = TinyUNetBlock().to(dtype).eval()
    z = torch.randn(2, 3, 8, 8, dtype=dtype)
    eps = rademacher_probes(4, z, torch.Generator().manual_seed(2))
    v = torch.rand(2, 1, 1, 1, dtype=dtype)
    with torch.no_grad():
        batched = hutchinson_vhv(model, z, probes=4, eps=eps, v=v)
        loop = hutchinson_vhv_reference(model, z, eps, v=v)
    torch.testing.assert_close(batched, loop, rtol=tol, atol=0)


def test_unet_block_matches_reverse_mode_jacobian():
    """Forward-mode through GroupNorm + explicit attention = reverse mode through stock SDPA."""
    model = TinyUNetBlock(c=4).double().eval()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = rademacher_probes(3, z, torch.Generator().manual_seed(4))
    est = hutchinson_vhv(model, z, probes=3, eps=eps)
    jac = batch_jacobian(model, z)
    torch.testing.assert_close(est, explicit_formula(jac, eps.reshape(3, 2, -1)), rtol=1e-10, atol=1e-12)


def test_generator_reproducibility():
    fn = TwoLayer()
    z = torch.randn(2, *IN_SHAPE, dtype=torch.float64)
    a = hutchinson_vhv(fn, z, probes=4, generator=torch.Generator().manual_seed(11))
    b = hutchinson_vhv(fn, z, probes=4, generator=torch.Generator().manual_seed(11))
    c = hutchinson_vhv(fn, z, probes=4, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    e = rademacher_probes(4, z, torch.Generator().manual_seed(11))
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(hutchinson_vhv(fn, z, probes=4, eps=e), a, rtol=0, atol=0)


def test_scalar_v_scales_exactly():
    fn = TwoLayer()
    z = torch.randn(2, *IN_SHAPE, dtype=torch.float64)
    eps = rademacher_probes(3, z, torch.Generator().manual_seed(0))
    one = hutchinson_vhv(fn, z, probes=3, eps=eps)
    torch.testing.assert_close(hutchinson_vhv(fn, z, probes=3, eps=eps, v=2.5), 2.5 * one, rtol=1e-12, atol=0)
    torch.testing.assert_close(hutchinson_vhv(fn, z, probes=3, eps=eps, v=torch.tensor(2.5, dtype=torch.float64)),
                               2.5 * one, rtol=1e-12, atol=0)


def test_low_precision_returns_float32():
    fn = TwoLayer(dtype=torch.bfloat16)
    z = torch.randn(2, *IN_SHAPE, dtype=torch.bfloat16)
    out = hutchinson_vhv(fn, z, probes=4, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (2,) and torch.isfinite(out).all()


def test_compiled_module_as_fn_is_compiled_and_matches():
    model = TinyUNetBlock().eval()
    z = torch.randn(2, 3, 8, 8)
    eps = rademacher_probes(3, z, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        ref = hutchinson_vhv_reference(model, z, eps)
        out = hutchinson_vhv(compiled, z, probes=3, eps=eps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    assert counter.frame_count >= 1  # the jvp really went through the compiler


def test_whole_call_compiled_fullgraph():
    model = TinyUNetBlock().eval()
    z = torch.randn(2, 3, 8, 8)
    eps = rademacher_probes(4, z, torch.Generator().manual_seed(0))
    v = torch.rand(2, 1, 1, 1)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(hutchinson_vhv, backend=counter, fullgraph=True)
    with torch.no_grad():
        out = compiled(model, z, probes=4, eps=eps, v=v, chunk_size=2)
        ref = hutchinson_vhv_reference(model, z, eps, v=v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    assert counter.frame_count == 1


def test_whole_call_compiled_inductor_small():
    fn = TwoLayer(dtype=torch.float32)
    z = torch.randn(3, *IN_SHAPE)
    eps = rademacher_probes(4, z, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(hutchinson_vhv, fullgraph=True)
    with torch.no_grad():
        out = compiled(fn, z, probes=4, eps=eps)
    torch.testing.assert_close(out, hutchinson_vhv_reference(fn, z, eps), rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    fn = TwoLayer(dtype=torch.float32)
    z = torch.randn(2, *IN_SHAPE)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_vhv(fn, z, probes=0)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_vhv(fn, z, probes=-3)
    with pytest.raises(TypeError, match="probes"):
        hutchinson_vhv(fn, z, probes=2.0)
    with pytest.raises(ValueError, match="v of shape"):
        hutchinson_vhv(fn, z, v=torch.ones(5))
    with pytest.raises(ValueError, match="v of shape"):
        hutchinson_vhv(fn, z, v=torch.ones(3, *IN_SHAPE))  # would broadcast z up, not to z
    with pytest.raises(ValueError, match="non-negative"):
        hutchinson_vhv(fn, z, v=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        hutchinson_vhv(fn, z, v=-torch.ones(2, 1, 1))
    with pytest.raises(TypeError, match="v must be"):
        hutchinson_vhv(fn, z, v="1")
    with pytest.raises(ValueError, match="batch size"):
        hutchinson_vhv(lambda x: fn(x)[:1], z, probes=2)
    with pytest.raises(ValueError, match="batch size"):
        hutchinson_vhv(lambda x: fn(x).reshape(-1), z, probes=2)
    with pytest.raises(TypeError, match="z must be a floating"):
        hutchinson_vhv(fn, torch.ones(2, *IN_SHAPE, dtype=torch.int64))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        hutchinson_vhv(fn, [[1.0]])
    with pytest.raises(ValueError, match="z is empty"):
        hutchinson_vhv(fn, torch.randn(0, *IN_SHAPE))
    with pytest.raises(TypeError, match="fn must be callable"):
        hutchinson_vhv(3, z)
    with pytest.raises(ValueError, match="chunk_size"):
        hutchinson_vhv(fn, z, chunk_size=0)
    with pytest.raises(ValueError, match="eps must have shape"):
        hutchinson_vhv(fn, z, probes=None, eps=torch.ones(2, 3, *IN_SHAPE))
    with pytest.raises(ValueError, match="probes=8 does not match"):
        hutchinson_vhv(fn, z, eps=torch.ones(4, *z.shape))
    with pytest.raises(ValueError, match="generator"):
        hutchinson_vhv(fn, z, probes=None, eps=torch.ones(4, *z.shape), generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        hutchinson_vhv(fn, z, generator=0)
