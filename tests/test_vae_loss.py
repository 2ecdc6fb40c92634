"""vae_loss / gaussian_kl: every backend against the reference and against torch's own losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dualdiff.ops.vae as V
from dualdiff._backend import BackendUnavailableError
from dualdiff.ops.vae import gaussian_kl, gaussian_kl_reference, vae_loss, vae_loss_reference
from dualdiff.testing import assert_close_lowp, forced_backend, poisoned_empty
from tests.conftest import require_backend

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

CPU_BACKENDS = ["cpp", "triton", "torch"]  # triton: natively on a GPU, else the CPU interpreter
GPU_BACKENDS = [pytest.param(b, marks=cuda_only) for b in ("cuda", "triton")]
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"  # conftest sets TRITON_INTERPRET=1 only without a GPU


def _dev(backend: str) -> str:
    """Where a test of ``backend`` runs: triton on the GPU when there is one (the interpreter is
    off there), else on the CPU under the interpreter; cpp and torch on the CPU."""
    return TRITON_DEVICE if backend == "triton" else "cpu"

# (image shape, latent): batch 1, 1-D per sample, odd 2-D, 3-D spatial, several Triton programs
# and grid-stride steps (12288 elements, 5000 latent elements).
SHAPES = [
    ((1, 5), 3),
    ((3, 3, 17, 9), 7),
    ((2, 1, 5, 6, 7), 33),
    ((5, 3, 29, 31), 1000),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output buffer of the fused backends starts as NaN: an unwritten element shows."""
    monkeypatch.setattr(V, "_empty", lambda shape, dtype, device: poisoned_empty(shape, dtype=dtype, device=device))


def _inputs(shape, latent, dtype=torch.float32, device="cpu", scale=3.0):
    b = shape[0]
    logits = (scale * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    x = torch.rand(shape, device=device).to(dtype)
    mu = torch.randn(b, latent, device=device).to(dtype).requires_grad_()
    logvar = (0.5 * torch.randn(b, latent, device=device)).to(dtype).requires_grad_()
    return logits, x, mu, logvar


def _run(fn, logits, x, mu, logvar, weights=(1.0, 0.7, -0.4)):
    """Forward outputs and gradients of a weighted sum of (total, recon, kl): each upstream
    gradient scalar is distinct, so a wrong combination shows."""
    for t in (logits, mu, logvar):
        t.grad = None
    out = fn(logits, x, mu, logvar)
    sum(w * o for w, o in zip(weights, out)).backward()
    grads = tuple(t.grad.detach().clone() for t in (logits, mu, logvar))
    return tuple(o.detach() for o in out), grads


def _check_fp32(backend, shape, latent, recon, reduction, kl_weight=0.37, device="cpu"):
    logits, x, mu, logvar = _inputs(shape, latent, device=device)
    got, ggot = _run(lambda *a: vae_loss(*a, kl_weight=kl_weight, recon=recon, reduction=reduction,
                                         backend=backend), logits, x, mu, logvar)
    ref, gref = _run(lambda *a: vae_loss_reference(*a, kl_weight, recon, reduction), logits, x, mu, logvar)
    for name, a, b in zip(("total", "recon", "kl"), got, ref):
        assert a.dtype == torch.float32 and a.shape == ()
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(("d recon_logits", "d mu", "d logvar"), ggot, gref):
        assert torch.isfinite(a).all(), name
        # absolute tolerance: a few fp32 ulps of the gradient's scale (s - x cancels near s = x)
        atol = 2e-6 * b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,latent", SHAPES)
@pytest.mark.parametrize("recon", ["bce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference_fp32(backend, shape, latent, recon, reduction):
    _check_fp32(backend, shape, latent, recon, reduction, device=_dev(backend))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape,latent", SHAPES + [((4, 3, 224, 224), 256)])
@pytest.mark.parametrize("recon", ["bce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference_fp32_gpu(backend, shape, latent, recon, reduction):
    _check_fp32(backend, shape, latent, recon, reduction, device="cuda")


def _check_lowp(backend, dtype, recon, device):
    logits, x, mu, logvar = _inputs((3, 3, 17, 9), 40, dtype=dtype, device=device)
    got, ggot = _run(lambda *a: vae_loss(*a, kl_weight=0.5, recon=recon, backend=backend), logits, x, mu, logvar)
    leaves32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (logits, x, mu, logvar)]
    ref, gref = _run(lambda *a: vae_loss_reference(*a, 0.5, recon), *leaves32)

    def naive(l, t, m, lv):  # plain PyTorch in the low precision
        r = F.binary_cross_entropy_with_logits(l, t) if recon == "bce" else F.mse_loss(torch.sigmoid(l), t)
        kl = (-0.5 * (1 + lv - m.pow(2) - lv.exp()).sum(1)).mean()
        return r + 0.5 * kl, r, kl

    low, glow = _run(naive, logits, x, mu, logvar)
    for name, a, r, n in zip(("total", "recon", "kl"), got, ref, low):
        assert_close_lowp(a, r, n, atol=1e-6, name=name)
    for name, a, r, n, t in zip(("d recon_logits", "d mu", "d logvar"), ggot, gref, glow, (logits, mu, logvar)):
        assert a.dtype == dtype
        assert_close_lowp(a, r, n, atol=1e-9, name=name)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_low_precision(backend, dtype, recon):
    _check_lowp(backend, dtype, recon, _dev(backend))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recon", ["bce", "mse"])
def test_low_precision_gpu(backend, dtype, recon):
    _check_lowp(backend, dtype, recon, "cuda")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_image_and_latent_dtypes(backend):
    logits, x, _, _ = _inputs((2, 3, 8, 8), 5, dtype=torch.bfloat16, device=_dev(backend))
    _, _, mu, logvar = _inputs((2, 3), 5, device=_dev(backend))
    got, ggot = _run(lambda *a: vae_loss(*a, backend=backend), logits, x, mu, logvar)
    ref, gref = _run(lambda l, t, m, lv: vae_loss_reference(l.float(), t, m, lv), logits, x, mu, logvar)
    torch.testing.assert_close(got[2], ref[2])  # fp32 latents: tight
    torch.testing.assert_close(ggot[1], gref[1])
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    assert ggot[0].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_upstream_gradients_only_some_outputs(backend):
    """Backpropagating through recon alone must give no gradient to the latents, kl alone none
    to the logits (the unused upstream gradients are zeros, read on the device)."""
    logits, x, mu, logvar = _inputs((2, 3, 5, 5), 4, device=_dev(backend))
    _, recon, _ = vae_loss(logits, x, mu, logvar, backend=backend)
    recon.backward()
    assert logits.grad.abs().sum() > 0
    assert mu.grad is None or mu.grad.abs().sum() == 0
    logits.grad = None
    _, _, kl = vae_loss(logits, x, mu, logvar, backend=backend)
    kl.backward()
    assert mu.grad.abs().sum() > 0
    assert logits.grad is None or logits.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_deterministic(backend):
    logits, x, mu, logvar = _inputs((4, 3, 21, 23), 300, device=_dev(backend))
    a = _run(lambda *t: vae_loss(*t, backend=backend), logits, x, mu, logvar)
    b = _run(lambda *t: vae_loss(*t, backend=backend), logits, x, mu, logvar)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_logits_stay_finite(backend):
    dev = _dev(backend)
    logits = torch.tensor([[-200.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 200.0, 88.0]], device=dev,
                          requires_grad=True)
    x = torch.tensor([[0.0, 1.0, 0.5, 0.3, 1.0, 0.0, 1.0, 0.25]], device=dev)
    mu = torch.zeros(1, 2, device=dev, requires_grad=True)
    logvar = torch.zeros(1, 2, device=dev, requires_grad=True)
    for recon in ("bce", "mse"):
        got, ggot = _run(lambda *a: vae_loss(*a, recon=recon, reduction="sum", backend=backend),
                         logits, x, mu, logvar)
        ref, gref = _run(lambda *a: vae_loss_reference(*a, 1.0, recon, "sum"), logits, x, mu, logvar)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ggot[0], gref[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ against torch's losses
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_matches_torch_bce_with_logits(backend, reduction):
    logits, x, mu, logvar = _inputs((3, 2, 11, 13), 6, device=_dev(backend))
    got, ggot = _run(lambda *a: vae_loss(*a, reduction=reduction, backend=backend), logits, x, mu, logvar,
                     weights=(0.0, 1.0, 0.0))
    logits.grad = None
    want = F.binary_cross_entropy_with_logits(logits, x, reduction=reduction)
    want.backward()
    torch.testing.assert_close(got[1], want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ggot[0], logits.grad, rtol=1e-5, atol=2e-6 * logits.grad.abs().max().item())
    # and the probability-space BCE on moderate logits
    with torch.no_grad():
        ref = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction=reduction)
    torch.testing.assert_close(got[1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_matches_torch_mse_loss(backend, reduction):
    logits, x, mu, logvar = _inputs((3, 2, 11, 13), 6, device=_dev(backend))
    got, ggot = _run(lambda *a: vae_loss(*a, recon="mse", reduction=reduction, backend=backend),
                     logits, x, mu, logvar, weights=(0.0, 1.0, 0.0))
    logits.grad = None
    want = F.mse_loss(torch.sigmoid(logits), x, reduction=reduction)
    want.backward()
    torch.testing.assert_close(got[1], want.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ggot[0], logits.grad, rtol=1e-5, atol=2e-6 * logits.grad.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_kl_matches_torch_distributions(backend, reduction):
    mu = torch.randn(6, 19, device=_dev(backend), requires_grad=True)
    logvar = (0.5 * torch.randn(6, 19, device=_dev(backend))).requires_grad_()
    kl = gaussian_kl(mu, logvar, reduction=reduction, backend=backend)
    (2.5 * kl).backward()
    g = (mu.grad.clone(), logvar.grad.clone())
    mu.grad = logvar.grad = None
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    per = torch.distributions.kl_divergence(q, p).sum(1)
    want = per.mean() if reduction == "mean" else per.sum()
    (2.5 * want).backward()
    torch.testing.assert_close(kl, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[0], mu.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], logvar.grad, rtol=1e-5, atol=1e-6)
    # the fused loss reports the same KL, and total = recon + kl_weight * kl
    logits, x, _, _ = _inputs((6, 4, 3), 19, device=_dev(backend))
    total, recon, kl2 = vae_loss(logits, x, mu, logvar, kl_weight=0.25, reduction=reduction, backend=backend)
    torch.testing.assert_close(kl2, kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, recon + 0.25 * kl2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gaussian_kl_gpu(backend):
    mu = torch.randn(64, 256, device="cuda", requires_grad=True)
    logvar = (0.5 * torch.randn(64, 256, device="cuda")).requires_grad_()
    kl = gaussian_kl(mu, logvar, backend=backend)
    kl.backward()
    g = (mu.grad.clone(), logvar.grad.clone())
    mu.grad = logvar.grad = None
    want = gaussian_kl_reference(mu, logvar)
    want.backward()
    torch.testing.assert_close(kl, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[0], mu.grad)
    torch.testing.assert_close(g[1], logvar.grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_unaligned_pointers_gpu(backend):
    """Contiguous views at a 4-byte offset: the vectorised CUDA paths must fall back correctly."""
    n = 3 * 5 * 37
    base_l = torch.randn(1 + n, device="cuda", requires_grad=True)
    x = torch.rand(1 + n, device="cuda")[1:].view(3, 5, 37)
    logits = base_l[1:].view(3, 5, 37)  # data_ptr % 16 == 4
    mu = torch.randn(3, 4, device="cuda", requires_grad=True)
    logvar = torch.randn(3, 4, device="cuda", requires_grad=True)
    got = vae_loss(logits, x, mu, logvar, recon="mse", backend=backend)
    g_got = torch.autograd.grad(got[0], (base_l, mu, logvar))
    ref = vae_loss_reference(logits, x, mu, logvar, 1.0, "mse")
    g_ref = torch.autograd.grad(ref[0], (base_l, mu, logvar))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item())


# ------------------------------------------------------------------------ dispatch, layout, compile
def test_auto_backend_on_cpu_is_cpp_when_built():
    require_backend("cpp")  # a failure, not a skip, where the extension must be built (CI)
    assert V.select_backend("vae_loss", torch.device("cpu"), V.SUPPORTED, V.PREFER) == "cpp"


def test_forced_unusable_backend_raises():
    logits, x, mu, logvar = _inputs((2, 4), 3)
    with forced_backend("cuda"):
        with pytest.raises(BackendUnavailableError):
            vae_loss(logits, x, mu, logvar)
    with pytest.raises(BackendUnavailableError):
        gaussian_kl(mu, logvar, backend="cuda")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_non_contiguous_inputs_work(backend):
    logits, x, mu, logvar = _inputs((3, 9, 7), 5, device=_dev(backend))
    lt = logits.detach().transpose(1, 2).requires_grad_()  # [3, 7, 9] view
    xt = x.transpose(1, 2)
    mu_nc = torch.randn(5, 3, device=_dev(backend)).t().requires_grad_()  # [3, 5], non-contiguous leaves
    lv_nc = torch.randn(5, 3, device=_dev(backend)).t().requires_grad_()
    assert not lt.is_contiguous() and not xt.is_contiguous() and not mu_nc.is_contiguous()
    got, ggot = _run(lambda *a: vae_loss(*a, backend=backend), lt, xt, mu_nc, lv_nc)
    ref, gref = _run(lambda *a: vae_loss_reference(*a), lt, xt, mu_nc, lv_nc)
    for a, b in zip(got + ggot, ref + gref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert ggot[0].shape == lt.shape


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_x_gets_no_gradient(backend):
    logits, x, mu, logvar = _inputs((2, 3, 4), 3)
    x.requires_grad_(True)
    vae_loss(logits, x, mu, logvar, backend=backend)[0].backward()
    assert x.grad is None and logits.grad is not None


@pytest.mark.parametrize("backend", ["cpp", "triton", "torch"])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    logits, x, mu, logvar = _inputs((2, 3, 6, 5), 4, device=_dev(backend))

    def step(l, t, m, lv):
        total, recon, kl = vae_loss(l, t, m, lv, kl_weight=0.5, backend=backend)
        return total, recon, kl, gaussian_kl(m, lv, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(logits, x, mu, logvar)
    (got[0] + got[3]).backward()
    g = tuple(t.grad.clone() for t in (logits, mu, logvar))
    for t in (logits, mu, logvar):
        t.grad = None
    ref = vae_loss_reference(logits, x, mu, logvar, 0.5) + (gaussian_kl_reference(mu, logvar),)
    (ref[0] + ref[3]).backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    for a, t in zip(g, (logits, mu, logvar)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_compile_annealed_kl_weight_does_not_recompile_each_step(backend):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    logits, x, mu, logvar = _inputs((2, 3, 5), 4)

    @torch.compile(backend=counter, fullgraph=True)
    def step(l, t, m, lv, w):
        return vae_loss(l, t, m, lv, kl_weight=w, backend=backend)

    for w in (0.0, 0.1, 0.25, 0.5, 1.0):
        got, ggot = _run(lambda *a: step(*a, w), logits, x, mu, logvar)
        ref, gref = _run(lambda *a: vae_loss_reference(*a, w), logits, x, mu, logvar)
        for a, b in zip(got + ggot, ref + gref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    assert counter.frame_count <= 2  # first value specialised, then one dynamic graph


def test_compile_inductor_cpp():
    require_backend("cpp")  # a failure, not a skip, where the extension must be built (CI)
    torch._dynamo.reset()
    logits, x, mu, logvar = _inputs((2, 3, 6, 5), 4)

    @torch.compile(fullgraph=True)
    def step(l, t, m, lv):
        return vae_loss(l, t, m, lv, recon="mse", backend="cpp")[0] * 2.0

    step(logits, x, mu, logvar).backward()
    g = logits.grad.clone()
    logits.grad = None
    (vae_loss_reference(logits, x, mu, logvar, 1.0, "mse")[0] * 2.0).backward()
    torch.testing.assert_close(g, logits.grad, rtol=1e-5, atol=2e-6 * logits.grad.abs().max().item())


def test_custom_ops_pass_opcheck():
    logits, x, mu, logvar = _inputs((2, 3, 4), 3)
    torch.library.opcheck(V._vae_loss_fwd, (logits, x, mu, logvar, 0.5, "bce", "mean", "cpp"))
    torch.library.opcheck(V._gaussian_kl_fwd, (mu, logvar, "sum", "cpp"))


# ------------------------------------------------------------------------ bad input
def _good():
    return dict(recon_logits=torch.randn(2, 3, 4), x=torch.rand(2, 3, 4), mu=torch.randn(2, 5),
                logvar=torch.randn(2, 5))


BAD = [
    ("recon_logits", dict(recon_logits=[1.0, 2.0]), TypeError),
    ("recon_logits", dict(recon_logits=torch.randint(0, 3, (2, 3, 4))), TypeError),
    ("recon_logits", dict(recon_logits=torch.randn(0, 3, 4), x=torch.rand(0, 3, 4)), ValueError),
    ("recon_logits", dict(recon_logits=torch.tensor(1.0), x=torch.tensor(1.0)), ValueError),
    ("x", dict(x=torch.rand(2, 3, 5)), ValueError),
    ("x", dict(x=torch.rand(2, 3, 4, dtype=torch.float64)), TypeError),
    ("x", dict(x=torch.rand(2, 3, 4).half()), TypeError),
    ("x", dict(x=torch.ones(2, 3, 4, dtype=torch.uint8)), TypeError),
    ("mu", dict(mu=torch.randn(3, 5), logvar=torch.randn(3, 5)), ValueError),  # batch mismatch
    ("mu", dict(mu=torch.randn(2, 5, 1)), ValueError),
    ("mu", dict(mu=torch.randn(2, 0), logvar=torch.randn(2, 0)), ValueError),
    ("mu", dict(mu=torch.randn(2, 5).half()), TypeError),
    ("logvar", dict(logvar=torch.randn(2, 6)), ValueError),
    ("logvar", dict(logvar=torch.randn(2, 5).bfloat16()), TypeError),
    ("logvar", dict(logvar="nope"), TypeError),
    ("kl_weight", dict(kl_weight=float("nan")), ValueError),
    ("kl_weight", dict(kl_weight=torch.tensor(0.5)), TypeError),
    ("recon", dict(recon="l1"), ValueError),
    ("reduction", dict(reduction="none"), ValueError),
    ("reduction", dict(reduction=None), TypeError),
]


@pytest.mark.parametrize("name,change,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, change, exc):
    args = _good()
    kwargs = {k: change.pop(k) for k in ("kl_weight", "recon", "reduction") if k in change}
    args.update(change)
    with pytest.raises(exc, match=rf"\b{name}\b"):
        vae_loss(args["recon_logits"], args["x"], args["mu"], args["logvar"], **kwargs)


def test_bad_input_gaussian_kl():
    with pytest.raises(ValueError, match="logvar"):
        gaussian_kl(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="mu"):
        gaussian_kl(torch.randn(2, 3).double(), torch.randn(2, 3).double())
    with pytest.raises(ValueError, match="mu"):
        gaussian_kl(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="reduction"):
        gaussian_kl(torch.randn(2, 3), torch.randn(2, 3), reduction="none")


@pytest.mark.parametrize("name", ["x", "mu", "logvar"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_device_mismatch_names_the_argument(name):
    args = {k: v.cuda() for k, v in _good().items()}
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=name):
        vae_loss(args["recon_logits"], args["x"], args["mu"], args["logvar"])


# ------------------------------------------------------------------------ Triton: real compilation
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dualdiff.kernels.vae as K

target = GPUTarget("cuda", 90, 32)
# what the JIT specialises on for the target shape: 16-byte aligned pointers, N % 16 == 0
fwd_hints = {(i,): [["tt.divisibility", 16]] for i in range(6)}   # 5 pointers + N
bwd_hints = {(i,): [["tt.divisibility", 16]] for i in range(11)}  # 10 pointers + N
fin_hints = {(i,): [["tt.divisibility", 16]] for i in range(4)}
fwd_sig = {"logits_ptr": "*bf16", "x_ptr": "*bf16", "mu_ptr": "*fp32", "logvar_ptr": "*fp32",
           "partial_ptr": "*fp32", "N": "i64", "M": "i32", "P_r": "i32", "P_k": "i32",
           "recon_iters": "i32", "latent_iters": "i32", "MSE": "constexpr", "BLOCK": "constexpr",
           "LBLOCK": "constexpr"}
bwd_sig = {"logits_ptr": "*fp32", "x_ptr": "*fp32", "glogits_ptr": "*fp32", "mu_ptr": "*fp32",
           "logvar_ptr": "*fp32", "gmu_ptr": "*fp32", "glogvar_ptr": "*fp32", "gtotal_ptr": "*fp32",
           "grecon_ptr": "*fp32", "gkl_ptr": "*fp32", "N": "i64", "M": "i32", "G_r": "i32",
           "recon_scale": "fp32", "kl_scale": "fp32", "kl_weight": "fp32", "MSE": "constexpr",
           "HAS_RECON": "constexpr", "BLOCK": "constexpr", "LBLOCK": "constexpr"}
fin_sig = {"partial_ptr": "*fp32", "total_ptr": "*fp32", "recon_ptr": "*fp32", "kl_ptr": "*fp32",
           "P_r": "i32", "P_k": "i32", "recon_scale": "fp32", "kl_scale": "fp32", "kl_weight": "fp32",
           "HAS_RECON": "constexpr", "FBLOCK": "constexpr"}
blocks = {"BLOCK": K.RECON_BLOCK, "LBLOCK": K.LATENT_BLOCK}
jobs = [(K._vae_fwd_partials_kernel, fwd_sig, {"MSE": m, **blocks}, fwd_hints) for m in (False, True)]
jobs += [(K._vae_bwd_kernel, bwd_sig, {"MSE": m, "HAS_RECON": h, **blocks}, bwd_hints)
         for m in (False, True) for h in (False, True)]
jobs += [(K._vae_fwd_finalize_kernel, fin_sig, {"HAS_RECON": h, "FBLOCK": K.FINAL_BLOCK}, fin_hints)
         for h in (False, True)]
for fn, sig, consts, hints in jobs:
    # the launchers' configurations (fixed block sizes, NUM_WARPS; finalize with 4 warps)
    warps = 4 if fn is K._vae_fwd_finalize_kernel else K.NUM_WARPS
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=hints),
                       target=target, options={"num_warps": warps})
    ptx = k.asm["ptx"]
    assert ".entry" in ptx
    assert k.metadata.shared <= 232448, (fn, consts, k.metadata.shared)  # H100/H200 per-block limit
    if fn is K._vae_fwd_partials_kernel:  # bf16 images: 8 elements per 16-byte load
        assert "ld.global.v4" in ptx, (fn, consts)
    if fn is K._vae_bwd_kernel and consts["HAS_RECON"]:  # fp32 images and gradient
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (fn, consts)
print("compiled", len(jobs))
"""


def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter accepts code that the Triton compiler rejects (e.g. a value whose shape
    differs between the branches of a runtime `if`): compile every kernel for sm_90, in a fresh
    process without TRITON_INTERPRET, check the image loads are 16-byte vector loads and the
    shared memory is within the H100/H200 limit (232,448 B per block)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the checkout, so the installed package (with dualdiff.kernels) is imported
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 8" in proc.stdout


# ------------------------------------------------------------------------ grids and devices
GRID_X, GRID_YZ = 2**31 - 1, 65535


@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (2**31 + 7, 2**20), (2**40, 2**31 + 1), (0, 2**33)])
def test_triton_grids_within_limits_at_extreme_shapes(n, m):
    from dualdiff.kernels import vae as K

    for cap in (4, 528, K.MAX_PARTIALS):
        p_r, p_k = K.forward_grid(n, m, cap)
        assert 0 <= p_r <= cap and 1 <= p_k <= cap and p_r + p_k <= GRID_X
        iters = -(-(-(-n // K.RECON_BLOCK)) // max(p_r, 1))  # the launcher's recon_iters
        assert p_r * iters * K.RECON_BLOCK >= n               # the grid-stride loop covers all
        assert (p_r == 0) == (n == 0)
    g_r, g_k = K.backward_grid(n, m)
    assert g_r + g_k <= GRID_X
    assert g_r * K.RECON_BLOCK >= n and g_k * K.LATENT_BLOCK >= m


def test_grids_past_the_limit_raise():
    from dualdiff.kernels import vae as K

    with pytest.raises(ValueError, match="grid limit"):
        K.backward_grid(K.RECON_BLOCK * 2**31, 1)
    with pytest.raises(ValueError, match="grid limit"):
        V.cuda_backward_blocks(2**44, 1, 2)


@pytest.mark.parametrize("n,m", [(1, 1), (2**31 + 7, 2**20), (2**40, 2**31 + 1), (0, 2**33)])
@pytest.mark.parametrize("element_size", [4, 2])
def test_cuda_grids_within_limits_at_extreme_shapes(n, m, element_size):
    for sms in (1, 132):
        p_r, p_k = V.cuda_forward_blocks(n, m, sms)
        assert 0 <= p_r <= 4 * sms and 1 <= p_k <= 4 * sms
    g_r, g_k = V.cuda_backward_blocks(n, m, element_size)
    assert g_r + g_k <= GRID_X
    assert g_r * V.CUDA_THREADS * (16 // element_size) >= n and g_k * V.CUDA_THREADS >= m


TWO_GPUS = [pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=TWO_GPUS) for b in ("cuda", "triton")])
def test_runs_on_the_tensors_device_and_its_stream(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launches go to cuda:1, on cuda:1's current
    stream (a side stream here), and the current device is unchanged afterwards."""
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    logits, x, mu, logvar = _inputs((3, 3, 17, 9), 40, device=dev)
    ref, gref = _run(lambda *a: vae_loss_reference(*a, 0.5), logits, x, mu, logvar)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        got, ggot = _run(lambda *a: vae_loss(*a, kl_weight=0.5, backend=backend), logits, x, mu, logvar)
        kl = gaussian_kl(mu, logvar, backend=backend)
    torch.cuda.current_stream(dev).wait_stream(side)
    assert torch.cuda.current_device() == 0
    for a, b in zip(got, ref):
        assert a.device == dev
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    for a, b in zip(ggot, gref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item())
    torch.testing.assert_close(kl, ref[2], rtol=1e-5, atol=1e-5)
