"""DualTimestepEmbedding: fused backends (triton, cuda) against the unfused reference.

The Triton tests run natively on a GPU when there is one, else on the CPU under
TRITON_INTERPRET=1 (set by conftest.py only without a GPU) in fp32 at small sizes; the CUDA
backend and low precision run in the tests marked ``cuda``.
"""
from __future__ import annotations

import math

import pytest
import torch

import dualdiff.ops.timestep_embedding as te
from dualdiff._backend import BackendUnavailableError
from dualdiff.ops.timestep_embedding import (DualTimestepEmbedding, DualTimestepEmbeddingReference,
                                             dual_timestep_embedding, sinusoidal_embedding)
from dualdiff.testing import assert_close_lowp, forced_backend, poisoned_empty

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TDEV = "cuda" if HAS_CUDA else "cpu"  # where the Triton tests run (interpreter on the CPU)
# interpreter: exact fp32 ("ieee" dots); GPU: tf32x3 dots (~fp32, sums in another order)
TOL = dict(rtol=1e-4, atol=2e-5) if HAS_CUDA else dict(rtol=1e-5, atol=1e-5)


def _timesteps(kind: str, B: int, device="cpu"):
    """Different t0 and t1 per sample."""
    if kind == "int":
        t0 = torch.randint(0, 1000, (B,), device=device)
        t1 = torch.randint(0, 1000, (B,), device=device)
    else:
        t0 = torch.rand(B, device=device) * 1000
        t1 = torch.rand(B, device=device)  # continuous time in [0, 1)
    return t0, t1


def _module(fd, hd, backend, device="cpu", dtype=torch.float32):
    m = DualTimestepEmbedding(fd, hd, backend=backend, device=device)
    with torch.no_grad():  # biases large enough that a dropped bias shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _plain_copy(m: DualTimestepEmbedding) -> DualTimestepEmbeddingReference:
    ref = DualTimestepEmbeddingReference(m.freq_dim, m.hidden_dim, device=m.out.weight.device,
                                         dtype=m.out.weight.dtype)
    ref.load_state_dict(m.state_dict())
    return ref


def _launch(backend, t0, t1, ws, out):
    """The backend's launcher alone, writing into the given (poisoned) output."""
    te._launch(backend, t0, t1, ws, out, te._freq_table(ws[0].shape[1], out.device))


# ---- reference and module plumbing -----------------------------------------------------------
@pytest.mark.parametrize("fd", [8, 9, 64])
def test_sinusoid_matches_formula_and_diffusers(fd):
    t = torch.tensor([0, 1, 17, 999])
    emb = sinusoidal_embedding(t, fd)
    half = fd // 2
    k = torch.arange(half, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-math.log(10000.0) * k / half)[None]
    expect = torch.cat([args.sin(), args.cos()], 1)
    assert emb.shape == (4, fd) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[:, :2 * half].double(), expect, atol=2e-4, rtol=0)
    if fd % 2:
        assert (emb[:, -1] == 0).all()
    from diffusers.models.embeddings import get_timestep_embedding
    theirs = get_timestep_embedding(t, fd, flip_sin_to_cos=False, downscale_freq_shift=0)
    torch.testing.assert_close(emb, theirs, atol=2e-4, rtol=0)


@pytest.mark.parametrize("fd", [2, 9, 64])
def test_cuda_kernel_element_math_on_the_cpu(fd):
    """csrc/timestep_embedding_math.h (the CUDA kernel's sinusoid and SiLU), evaluated on the CPU
    through dualdiff._C, against the reference's features and F.silu; every element written."""
    from dualdiff._backend import extension

    C = extension()
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 0.25])
    freqs = te.timestep_frequencies(fd)
    out = poisoned_empty((5, fd), dtype=torch.float32, device="cpu")
    C.timestep_features_cpu(t.data_ptr(), 5, freqs.data_ptr(), fd, out.data_ptr())
    torch.testing.assert_close(out, sinusoidal_embedding(t, fd), rtol=0, atol=1e-6)
    x = torch.linspace(-90, 90, 1001)
    y = poisoned_empty((1001,), dtype=torch.float32, device="cpu")
    C.silu_cpu(x.data_ptr(), x.numel(), y.data_ptr())
    torch.testing.assert_close(y, torch.nn.functional.silu(x), rtol=2e-6, atol=1e-6)


def test_state_dict_names_and_interchange():
    m = _module(16, 32, "torch")
    names = list(m.state_dict())
    assert names == list(te.WEIGHT_NAMES)
    plain = DualTimestepEmbeddingReference(16, 32)
    plain.load_state_dict(m.state_dict())
    m2 = DualTimestepEmbedding(16, 32)
    m2.load_state_dict(plain.state_dict())
    t0, t1 = _timesteps("int", 5)
    with torch.no_grad():
        torch.testing.assert_close(m2(t0, t1), m(t0, t1), rtol=0, atol=0)
        torch.testing.assert_close(plain(t0, t1), m.reference_forward(t0, t1), rtol=0, atol=0)


def test_unfused_shares_parameters():
    m = _module(16, 32, "torch")
    u = m.unfused()
    assert all(a is b for a, b in zip(u.parameters(), m.parameters()))
    t0, t1 = _timesteps("float", 3)
    torch.testing.assert_close(u(t0, t1), m.reference_forward(t0, t1), rtol=0, atol=0)
    with torch.no_grad():
        m.out.bias.add_(1.0)  # visible through the shared module
    torch.testing.assert_close(u(t0, t1), m.reference_forward(t0, t1), rtol=0, atol=0)


def test_t0_t1_are_not_interchangeable():
    m = _module(16, 32, "torch")
    t0, t1 = _timesteps("int", 4)
    with torch.no_grad():
        assert not torch.allclose(m(t0, t1), m(t1, t0))


# ---- triton (natively on a GPU, else the interpreter on the CPU) -----------------------------
SHAPES = [(1, 32, 64), (7, 33, 96), (64, 64, 64), (7, 16, 256)]


@pytest.mark.parametrize("B,fd,hd", SHAPES)
@pytest.mark.parametrize("kind", ["int", "float"])
def test_triton_forward_poisoned(B, fd, hd, kind):
    m = _module(fd, hd, "triton", device=TDEV)
    t0, t1 = _timesteps(kind, B, TDEV)
    out = poisoned_empty((B, hd), dtype=torch.float32, device=TDEV)
    _launch("triton", t0, t1, m.weights(), out)
    ref = m.reference_forward(t0, t1)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("B,fd,hd", [(7, 33, 96), (16, 64, 64)])
def test_triton_module_forward_backward(B, fd, hd):
    m = _module(fd, hd, "triton", device=TDEV)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("float", B, TDEV)
    out = m(t0, t1)
    ref = plain(t0, t1)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(m(t0, t1), ref, **TOL)


@pytest.mark.parametrize("B,fd,hd", [(7, 33, 96), (17, 16, 64), (1, 300, 32)])
def test_triton_split_path_poisoned(B, fd, hd):
    """The two-launch path of wide layers, forced at small sizes (odd F and H, F > 256)."""
    from dualdiff.kernels import timestep_embedding as K

    m = _module(fd, hd, "triton", device=TDEV)
    t0, t1 = _timesteps("float", B, TDEV)
    out = poisoned_empty((B, hd), dtype=torch.float32, device=TDEV)
    K.dual_timestep_embedding_fwd(t0, t1, te._freq_table(fd, out.device), m.weights(), out, split=True)
    torch.testing.assert_close(out, m.reference_forward(t0, t1), **TOL)


def test_triton_wide_hidden_takes_the_split_path():
    """hidden 300 (> 256): the launcher picks the split path by itself (module, with grads)."""
    from dualdiff.kernels import timestep_embedding as K

    assert K.use_fused(64, 256) and not K.use_fused(20, 300) and not K.use_fused(320, 64)
    m = _module(20, 300, "triton", device=TDEV)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 3, TDEV)
    out, ref = m(t0, t1), plain(t0, t1)
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(m.out.weight.grad, plain.out.weight.grad, rtol=1e-4, atol=1e-4)


GRID_X, GRID_YZ = 2**31 - 1, 65535


@pytest.mark.parametrize("B", [1, 17, 2**20 + 3, 2**31 - 1])
@pytest.mark.parametrize("fd,hd", [(64, 256), (33, 96), (256, 1000), (320, 4096), (16, 2**16)])
def test_launch_grids_within_limits(B, fd, hd):
    """Every grid the launchers produce is within the CUDA limits (1-D grids: axis 0 <= 2**31 - 1),
    for any output of up to 2**40 bytes; only larger ones may be refused, with a clear error."""
    from dualdiff.kernels import timestep_embedding as K

    try:
        grids = K.launch_grids(B, fd, hd)
    except ValueError as exc:
        assert "exceeds the CUDA limits" in str(exc)
        assert B * hd * 4 > 2**40, "a grid was refused for an output under 1 TB"
        return
    assert len(grids) == (1 if K.use_fused(fd, hd) else 2)
    for g in grids:
        assert 0 < g[0] <= GRID_X and g[1] == g[2] == 1
    assert grids[-1][0] * K.BLOCK_B * (1 if len(grids) == 1 else K.SPLIT_N) >= B * (1 if len(grids) == 1 else hd)
    assert 0 < te.cuda_grid(B) <= GRID_X


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8])
def test_triton_timestep_dtypes(dtype):
    m = _module(16, 32, "triton", device=TDEV)
    t0 = torch.tensor([0, 3, 250, 7, 99], dtype=dtype, device=TDEV)
    t1 = torch.tensor([5, 1, 0, 200, 42], dtype=dtype, device=TDEV)
    with torch.no_grad():
        torch.testing.assert_close(m(t0, t1), m.reference_forward(t0, t1), **TOL)


def test_triton_strided_and_broadcast_timesteps():
    m = _module(16, 32, "triton", device=TDEV)
    base = torch.randint(0, 1000, (10,), device=TDEV)
    t0 = base[::2]                              # stride 2
    with torch.no_grad():
        out = m(t0, 500)                        # python int broadcast to B
        ref = m.reference_forward(t0, torch.full((5,), 500, device=TDEV))
        torch.testing.assert_close(out, ref, **TOL)
        out = m(torch.tensor(0.25, device=TDEV), t0)  # 0-D tensor broadcast
        ref = m.reference_forward(torch.full((5,), 0.25, device=TDEV), t0)
        torch.testing.assert_close(out, ref, **TOL)


def test_triton_sees_weight_updates():
    """The per-module validation memo must not serve stale weights."""
    m = _module(16, 32, "triton", device=TDEV)
    t0, t1 = _timesteps("int", 4, TDEV)
    with torch.no_grad():
        a = m(t0, t1)
        m.mlp1[2].weight.mul_(-1.0)             # in place: same pointers
        b = m(t0, t1)
        torch.testing.assert_close(b, m.reference_forward(t0, t1), **TOL)
        assert not torch.allclose(a, b)
        m.mlp0[0].weight = torch.nn.Parameter(torch.randn(32, 16, device=TDEV))  # replaced parameter
        torch.testing.assert_close(m(t0, t1), m.reference_forward(t0, t1), **TOL)


def test_eager_skips_custom_op(monkeypatch):
    """Documented lean path: eager mode calls the launcher directly (no grad) or through a plain
    autograd.Function (grad); only torch.compile goes through the custom op."""
    m = _module(16, 32, "triton", device=TDEV)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 3, TDEV)

    def boom(*a, **k):
        raise AssertionError("custom op called")

    monkeypatch.setattr(te, "_dual_timestep_embedding_op", boom)
    with torch.no_grad():
        m(t0, t1)
    out = m(t0, t1)
    assert out.grad_fn is not None and "EagerAutograd" in type(out.grad_fn).__name__
    out.sum().backward()
    plain(t0, t1).sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_opcheck(backend):
    dev = TDEV if backend == "triton" else "cpu"
    m = _module(16, 32, backend, device=dev)
    t0, t1 = _timesteps("int", 4, dev)
    torch.library.opcheck(te._dual_timestep_embedding_op, (t0, t1, *m.weights(), backend))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.cuda
@needs_cuda
def test_custom_op_opcheck_gpu(backend):
    m = _module(64, 256, backend, device="cuda")
    t0, t1 = _timesteps("int", 7, "cuda")
    torch.library.opcheck(te._dual_timestep_embedding_op, (t0, t1, *m.weights(), backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_op_autograd_matches_unfused(backend):
    dev = TDEV if backend == "triton" else "cpu"
    m = _module(16, 48, backend, device=dev)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("float", 5, dev)
    out = torch.ops.dualdiff.dual_timestep_embedding(t0, t1, *m.weights(), backend)
    ref = plain(t0, t1)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_torch_func_transforms_compose():
    """jvp / vmap / jacrev through the module (Hutchinson through a UNet) use the reference."""
    m = _module(16, 32, "triton")
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 4)
    z, v = torch.randn(4, 32), torch.randn(4, 32)

    def f(mod):
        return lambda z: torch.tanh(z * mod(t0, t1))

    out, tangent = torch.func.jvp(f(m), (z,), (v,))
    ref, ref_tangent = torch.func.jvp(f(plain), (z,), (v,))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.func.vmap(f(m))(z), torch.func.vmap(f(plain))(z))
    jac = torch.func.jacrev(lambda z: f(m)(z).sum())(z)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda z: f(plain)(z).sum())(z))


def test_torch_backend_grads_match_unfused():
    m = _module(24, 48, "torch")
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 6)
    out, ref = m(t0, t1), plain(t0, t1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_torch_backend_keeps_activations_for_backward():
    """On the torch backend autograd runs through the reference and keeps its activations; only
    the fused kernels (which save none) take the recomputing backward (_EagerAutograd)."""
    m = _module(16, 32, "torch")
    t0, t1 = _timesteps("int", 4)
    assert "EagerAutograd" not in type(m(t0, t1).grad_fn).__name__
    fused = _module(16, 32, "triton", device=TDEV)
    t0, t1 = _timesteps("int", 4, TDEV)
    assert "EagerAutograd" in type(fused(t0, t1).grad_fn).__name__


def test_timesteps_get_no_gradient():
    m = _module(16, 32, "torch")
    t0 = (torch.rand(3) * 10).requires_grad_()
    out = m(t0, torch.rand(3))
    out.sum().backward()
    assert t0.grad is None


# ---- torch.compile ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    dev = TDEV if backend == "triton" else "cpu"
    m = _module(16, 32, backend, device=dev)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("float", 5, dev)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(t0, t1)
    ref = plain(t0, t1)
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    ref.sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_compile_inductor_fullgraph_cpu():
    torch._dynamo.reset()
    m = _module(16, 32, "torch")
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 4)
    out = torch.compile(m, fullgraph=True)(t0, t1)
    ref = plain(t0, t1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------
def test_bad_timesteps_name_the_argument():
    m = _module(16, 32, "torch")
    t = torch.arange(4)
    with pytest.raises(ValueError, match="t1 shape"):
        m(t, torch.arange(5))                   # B mismatch
    with pytest.raises(ValueError, match="t0 must be 1-D"):
        m(t[:, None], t[:, None])               # not 1-D
    with pytest.raises(ValueError, match="t1 must be 1-D"):
        m(t, t.reshape(2, 2))                   # shapes mismatch, t1 2-D
    with pytest.raises(ValueError, match="t0 is on meta"):
        m(torch.arange(4, device="meta"), t)    # wrong device
    with pytest.raises(ValueError, match="both scalars"):
        m(3, 4)
    with pytest.raises(ValueError, match="t0 is empty"):
        m(torch.arange(0), torch.arange(0))
    with pytest.raises(TypeError, match="t1 must be an integer or floating tensor"):
        m(t, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="t0 must be a 1-D tensor"):
        m("3", t)


def test_bad_weights_name_the_argument():
    m = _module(16, 32, "torch")
    ws = list(m.weights())
    t = torch.arange(4)
    bad = list(ws)
    bad[2] = ws[2][:, :16]
    with pytest.raises(ValueError, match="mlp0.2.weight must have shape"):
        dual_timestep_embedding(t, t, *bad)
    bad = list(ws)
    bad[9] = ws[9].double()
    with pytest.raises(TypeError, match="out.bias"):
        dual_timestep_embedding(t, t, *bad)
    bad = list(ws)
    bad[5] = ws[5].to("meta")
    with pytest.raises(ValueError, match="mlp1.0.bias is on meta"):
        dual_timestep_embedding(t, t, *bad)
    with pytest.raises(ValueError, match="freq_dim"):
        DualTimestepEmbedding(1, 8)


def test_forced_unavailable_backend_raises():
    m = _module(16, 32, None)
    t = torch.arange(3)
    with forced_backend("cpp"), pytest.raises(BackendUnavailableError, match="no 'cpp' backend"):
        m(t, t)
    if not HAS_CUDA:
        with forced_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
            m(t, t)


# ---- CUDA (device machine) -------------------------------------------------------------------
GPU_SHAPES = [(1, 32, 64), (7, 33, 96), (64, 64, 256), (64, 32, 96), (7, 64, 256), (130, 64, 256)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,fd,hd", GPU_SHAPES)
@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.cuda
@needs_cuda
def test_gpu_forward_fp32_poisoned(backend, B, fd, hd, kind):
    m = _module(fd, hd, backend, device="cuda")
    t0, t1 = _timesteps(kind, B, "cuda")
    ref = m.reference_forward(t0, t1)
    out = poisoned_empty((B, hd), dtype=torch.float32, device="cuda")
    _launch(backend, t0, t1, m.weights(), out)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        for _ in range(3):  # cached fast path (second call onwards)
            torch.testing.assert_close(m(t0, t1), ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,fd,hd", [(7, 33, 96), (64, 64, 256)])
@pytest.mark.cuda
@needs_cuda
def test_gpu_forward_low_precision(backend, dtype, B, fd, hd):
    m = _module(fd, hd, backend, device="cuda")
    t0, t1 = _timesteps("int", B, "cuda")
    ref32 = m.reference_forward(t0, t1)
    m = m.to(dtype)
    naive = m.reference_forward(t0, t1)
    out = poisoned_empty((B, hd), dtype=dtype, device="cuda")
    _launch(backend, t0, t1, m.weights(), out)
    assert_close_lowp(out, ref32, naive, atol=1e-3, name=f"{backend} {dtype}")
    with torch.no_grad():
        assert_close_lowp(m(t0, t1), ref32, naive, atol=1e-3, name=f"{backend} {dtype} module")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.cuda
@needs_cuda
def test_gpu_fast_path_cache_keys(backend):
    """The cached launch must follow changes of B, t dtype, t stride and weight dtype."""
    m = _module(64, 256, backend, device="cuda")
    with torch.no_grad():
        for B, dtype, step in [(64, torch.int64, 1), (7, torch.int64, 1), (7, torch.float32, 2),
                               (1, torch.int32, 1), (33, torch.float64, 3), (64, torch.float16, 1)]:
            base = torch.randint(0, 1000, (B * step,), device="cuda").to(dtype)
            t0, t1 = base[::step], base.flip(0)[::step]
            torch.testing.assert_close(m(t0, t1), m.reference_forward(t0, t1), rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(m(t0, 17), m.reference_forward(t0, torch.full_like(t0, 17)),
                                       rtol=1e-4, atol=2e-5)
        ref32 = m.reference_forward(t0, t1)
        m.bfloat16()
        naive = m.reference_forward(t0, t1)
        assert_close_lowp(m(t0, t1), ref32, naive, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@needs_cuda
def test_gpu_backward_matches_unfused(backend, dtype):
    m = _module(64, 256, backend, device="cuda", dtype=dtype)
    plain = _plain_copy(m)
    t0, t1 = _timesteps("int", 64, "cuda")
    out, ref = m(t0, t1), plain(t0, t1)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(m.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **tol)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.cuda
@needs_cuda
def test_gpu_compile_fullgraph(backend, mode):
    torch._dynamo.reset()
    m = _module(64, 256, backend, device="cuda")
    plain = _plain_copy(m)
    t0, t1 = _timesteps("float", 64, "cuda")
    compiled = torch.compile(m, fullgraph=True, mode=mode)
    for _ in range(3):
        out = compiled(t0, t1)
    ref = plain(t0, t1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    if mode is None:
        out.sum().backward()
        ref.sum().backward()
        for p, q in zip(m.parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_gpu_timesteps_on_wrong_device():
    m = _module(16, 32, "cuda", device="cuda")
    with pytest.raises(ValueError, match="t0 is on cpu"):
        m(torch.arange(4), torch.arange(4, device="cuda"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("fd,hd", [(64, 1024), (320, 4096)])
@pytest.mark.cuda
@needs_cuda
def test_gpu_wide_layers(backend, fd, hd):
    """Widths past the fused kernels' shared memory: the Triton split path, the CUDA kernel's
    global workspace (hidden 4096 needs ~400 KB per block, over the 232,448 B of an H100)."""
    m = _module(fd, hd, backend, device="cuda")
    t0, t1 = _timesteps("int", 37, "cuda")
    with torch.no_grad():
        out = m(t0, t1)
        ref = m.reference_forward(t0, t1)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    if backend == "cuda" and hd == 4096:
        assert te._cuda_scratch(37, fd, hd, out.device) is not None


TWO_GPUS = [pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=TWO_GPUS) for b in ("triton", "cuda")])
def test_runs_on_the_tensors_device_and_its_stream(backend):
    """Weights and timesteps on cuda:1 while cuda:0 is current, under a side stream of cuda:1."""
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    m = _module(64, 256, backend, device=dev)
    t0, t1 = _timesteps("int", 19, dev)
    ref = m.reference_forward(t0, t1)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.no_grad():
        outs = [m(t0, t1) for _ in range(3)]  # first launch, then the cached fast path
    torch.cuda.current_stream(dev).wait_stream(side)
    assert torch.cuda.current_device() == 0
    for out in outs:
        assert out.device == dev
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
