"""Edge cases of the fused kernels that no other test covers, for every GPU backend (cuda, triton;
marked ``cuda``: they run on the device machine) and, where the case can run here, for the CPU
backends too (cpp; triton under TRITON_INTERPRET=1 at tiny sizes), so the tests run now:

* mixed dtypes (low-precision logits with integer / bool / other-float targets, images and latents
  in different dtypes, timesteps of every dtype);
* gradients from only some outputs (one column of a per-(b, c) loss, one of vae_loss's three
  results, a slice of the embedding, a subset of the parameters);
* extreme inputs (logits ±1e4, ±inf where an activation defines the limit, large-magnitude
  softmax inputs, large timesteps);
* run-to-run bitwise determinism (the same inputs twice give identical bits).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dualdiff.ops.timestep_embedding as te
import dualdiff.ops.vae as V
from dualdiff._backend import backend_status
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
from dualdiff.testing import assert_close_lowp

HAS_CUDA = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
INTERP = [pytest.mark.skipif(HAS_CUDA, reason="the Triton interpreter runs on machines without a GPU (conftest)")]


def _targets(cpp: bool = True):
    """(backend, device) pairs: the GPU backends, then the CPU ones that can run the same case."""
    out = [pytest.param("cuda", "cuda", marks=CUDA, id="cuda"),
           pytest.param("triton", "cuda", marks=CUDA, id="triton-gpu")]
    if cpp:
        out.append(pytest.param("cpp", "cpu", id="cpp"))
    out.append(pytest.param("triton", "cpu", marks=INTERP, id="triton-interp"))
    return out


def _usable(backend, device):
    ok, why = backend_status(backend, device)
    if not ok:
        pytest.skip(why)


def _ulp_tol(dtype, ref):
    """Tolerance of a gradient computed in fp32 and rounded once to ``dtype``."""
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps * ref.abs().max().item() + 1e-30)


def _lowp_dtypes(device):
    return [torch.float32, torch.bfloat16, torch.float16]


# =============================================================================== weighted_dice
def _dice_shape(device):
    return (3, 4, 65, 67) if device == "cuda" else (2, 3, 5, 7)


def _dice_check(x, g, w, *, backend, go=None, exact_dtype=None, **kw):
    """Loss and d/dx of ``backend`` against the fp32 reference on the same (rounded) inputs."""
    xr = x.detach().clone().requires_grad_(True)
    loss = weighted_dice_loss(xr, g, w, backend=backend, **kw)
    go = torch.randn_like(loss) if go is None else go
    (gx,) = torch.autograd.grad(loss, xr, go)
    x32 = x.detach().float().requires_grad_(True)
    ref = weighted_dice_loss_reference(x32, g, None if w is None else w.float(), **kw)
    (gr,) = torch.autograd.grad(ref, x32, go)
    assert loss.dtype == torch.float32 and gx.dtype == x.dtype
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    if x.dtype == torch.float32:
        torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-6 * gr.abs().max().item() + 1e-12)
    else:
        torch.testing.assert_close(gx.float(), gr.to(x.dtype).float(), **_ulp_tol(x.dtype, gr))
    return loss, gx


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dice_mixed_logit_target_weight_dtypes(backend, device, xdtype):
    """Logits fp32/bf16/fp16 with targets fp32/fp16/bf16/uint8/bool and [B] fp32 / [B, C] bf16
    weights: the kernels read each dtype as it is and accumulate in fp32."""
    _usable(backend, device)
    shape = _dice_shape(device)
    tdtypes = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool]
    if backend == "triton" and device == "cpu":  # interpreter: two per logit dtype, all five over the three
        k = [torch.float32, torch.bfloat16, torch.float16].index(xdtype)
        tdtypes = [tdtypes[(2 * k) % 5], tdtypes[(2 * k + 1) % 5]]
    for i, tdtype in enumerate(tdtypes):
        act = ("sigmoid", "softmax")[i % 2] if device == "cpu" else None
        for activation in ([act] if act else ["sigmoid", "softmax", "none"]):
            x = (2.0 * torch.randn(shape, device=device)).to(xdtype)
            g = torch.rand(shape, device=device) > 0.5
            g = g.to(tdtype) if tdtype != torch.float32 else g.float() * torch.rand(shape, device=device)
            w = (torch.rand(shape[0], device=device) + 0.1) if i % 2 else \
                (torch.rand(shape[:2], device=device) + 0.1).to(torch.bfloat16)
            _dice_check(x, g, w, backend=backend, activation=activation, reduction=("mean", "none")[i % 2],
                        include_background=bool(i % 3))


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_dice_gradients_from_only_some_outputs(backend, device, activation):
    """reduction="none": backward through one channel column / one sample row only; d/dweight with
    a frozen input and d/dx with a frozen weight. Sigmoid rows that do not reach the chosen output
    get exactly zero gradient."""
    _usable(backend, device)
    shape = _dice_shape(device)
    x = 2.0 * torch.randn(shape, device=device)
    g = (torch.rand(shape, device=device) > 0.5).float()
    w = torch.rand(shape[:2], device=device) + 0.1
    B, C = shape[:2]
    for pick in ((slice(None), 1), (0, slice(None))):
        go = torch.zeros(B, C, device=device)
        go[pick] = torch.randn_like(go[pick])
        _, gx = _dice_check(x, g, w, backend=backend, go=go, activation=activation, reduction="none")
        untouched = go == 0
        if activation == "sigmoid":
            assert (gx[untouched] == 0).all()
        else:  # softmax couples channels, not samples
            assert (gx[(go == 0).all(1)] == 0).all()
    # weight only (input frozen) and input only (weight frozen)
    wr = w.clone().requires_grad_(True)
    loss = weighted_dice_loss(x, g, wr, activation=activation, reduction="none", backend=backend)
    go = torch.randn_like(loss)
    (gw,) = torch.autograd.grad(loss, wr, go)
    wr32 = w.clone().requires_grad_(True)
    ref = weighted_dice_loss_reference(x, g, wr32, activation=activation, reduction="none")
    (gwr,) = torch.autograd.grad(ref, wr32, go)
    torch.testing.assert_close(gw, gwr, rtol=1e-5, atol=1e-6)
    xr = x.clone().requires_grad_(True)
    loss = weighted_dice_loss(xr, g, w.clone().requires_grad_(False), activation=activation, backend=backend)
    loss.backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dice_extreme_logits(backend, device, dtype):
    """Logits ±1e4 and ±inf (sigmoid saturates: p = 0 / 1, zero gradient), softmax inputs of
    magnitude 1e3..1e4 and a -inf class at some pixels (p = 0 there): finite, as the reference."""
    _usable(backend, device)
    shape = _dice_shape(device)
    g = (torch.rand(shape, device=device) > 0.5).float()
    w = torch.rand(shape[0], device=device) + 0.1
    # sigmoid: a mix of saturated and ordinary logits
    x = torch.randn(shape, device=device)
    sel = torch.rand(shape, device=device)
    x = torch.where(sel < 0.2, torch.full_like(x, 1e4), x)
    x = torch.where(sel > 0.8, torch.full_like(x, -1e4), x)
    x = torch.where((sel > 0.45) & (sel < 0.5), torch.full_like(x, float("inf")), x)
    x = torch.where((sel > 0.5) & (sel < 0.55), torch.full_like(x, float("-inf")), x)
    _, gx = _dice_check(x.to(dtype), g, w, backend=backend, activation="sigmoid", reduction="none")
    assert torch.isfinite(gx).all()
    # saturated: zero up to the clamp of a polynomial exp (cpp: e^-87 -> denormal products)
    assert (gx[x.abs() >= 1e4].abs() <= 1e-30).all()
    # softmax: huge magnitudes (only differences matter) and a masked class
    xs = 1e3 * torch.randn(shape, device=device)
    xs[:, 0] = torch.where(torch.rand_like(xs[:, 0]) < 0.3, torch.full_like(xs[:, 0], float("-inf")), xs[:, 0])
    xs[:, 1] = xs[:, 1].clamp(-1e4, 1e4) + 9e3
    _, gx = _dice_check(xs.to(dtype), g, w, backend=backend, activation="softmax", reduction="sum")
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_dice_bitwise_deterministic(backend, device, activation):
    """Same inputs twice: identical loss, per-(b, c) loss and gradient bits (fixed-order
    reductions, no atomics). On the GPU the input spans many forward chunks."""
    _usable(backend, device)
    shape = (2, 3, 256, 257) if device == "cuda" else (2, 3, 9, 7)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    g = (torch.rand(shape, device=device) > 0.5).to(torch.uint8)
    w = torch.rand(shape[0], device=device)
    runs = []
    for _ in range(2):
        for red in ("mean", "none"):
            xr = x.clone().requires_grad_(True)
            loss = weighted_dice_loss(xr, g, w, activation=activation, reduction=red, backend=backend)
            loss.backward(torch.ones_like(loss))
            runs.append((loss.detach(), xr.grad))
    for (a, ga), (b, gb) in zip(runs[:2], runs[2:]):
        assert torch.equal(a, b) and torch.equal(ga, gb)


# =============================================================================== vae_loss
def _vae_inputs(shape, latent, rdtype, ldtype, device, scale=3.0):
    l = (scale * torch.randn(shape, device=device)).to(rdtype)
    x = torch.rand(shape, device=device).to(rdtype)
    mu = torch.randn(shape[0], latent, device=device).to(ldtype)
    lv = (0.5 * torch.randn(shape[0], latent, device=device)).to(ldtype)
    return l, x, mu, lv


def _vae_run(fn, l, x, mu, lv, weights):
    leaves = [t.detach().clone().requires_grad_(True) for t in (l, mu, lv)]
    out = fn(leaves[0], x, leaves[1], leaves[2])
    loss = sum(wt * o for wt, o in zip(weights, out) if wt is not None)
    loss.backward()
    return [o.detach() for o in out], [t.grad for t in leaves]


def _vae_ref(l, x, mu, lv, kl_weight=0.5, recon="bce", reduction="mean"):
    return V.vae_loss_reference(l.float(), x.float(), mu.float(), lv.float(), kl_weight, recon, reduction)


def _vae_compare(backend, l, x, mu, lv, weights=(1.0, 0.7, -0.4), recon="bce", reduction="mean"):
    got, gg = _vae_run(lambda *a: V.vae_loss(*a, kl_weight=0.5, recon=recon, reduction=reduction,
                                             backend=backend), l, x, mu, lv, weights)
    ref, gr = _vae_run(lambda *a: _vae_ref(*a, recon=recon, reduction=reduction),
                       l.float(), x.float(), mu.float(), lv.float(), weights)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-5)
    for a, b, leaf in zip(gg, gr, (l, mu, lv)):
        if a is None or b is None:  # no path from the chosen outputs: absent or exactly zero
            assert all(t is None or (t == 0).all() for t in (a, b))
            continue
        assert a.dtype == leaf.dtype and torch.isfinite(a).all()
        if leaf.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * b.abs().max().item() + 1e-30)
        else:
            torch.testing.assert_close(a.float(), b.to(leaf.dtype).float(), **_ulp_tol(leaf.dtype, b))
    return got, gg


def _vae_shape(device):
    return ((4, 3, 61, 67), 256) if device == "cuda" else ((2, 3, 5, 7), 5)


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("rdtype,ldtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                           (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_vae_mixed_image_and_latent_dtypes(backend, device, rdtype, ldtype):
    _usable(backend, device)
    shape, latent = _vae_shape(device)
    for recon in ("bce", "mse"):
        _vae_compare(backend, *_vae_inputs(shape, latent, rdtype, ldtype, device), recon=recon)


@pytest.mark.parametrize("backend,device", _targets())
def test_vae_gradients_from_only_some_outputs(backend, device):
    """Backward through total alone, recon alone, kl alone, recon + kl: the gradients equal the
    reference's; an output that reaches no input leaves it an exact zero gradient."""
    _usable(backend, device)
    shape, latent = _vae_shape(device)
    inputs = _vae_inputs(shape, latent, torch.float32, torch.float32, device)
    for weights in ((1.0, None, None), (None, 1.3, None), (None, None, -0.8), (None, 0.6, 2.0)):
        _, grads = _vae_compare(backend, *inputs, weights=weights)
        if weights[0] is None and weights[2] is None:
            assert all(g is None or (g == 0).all() for g in grads[1:])
        if weights[0] is None and weights[1] is None:
            assert grads[0] is None or (grads[0] == 0).all()
    # only mu requires grad; and the KL-only op
    mu = inputs[2].clone().requires_grad_(True)
    _, _, kl = V.vae_loss(inputs[0], inputs[1], mu, inputs[3], backend=backend)
    (gmu,) = torch.autograd.grad(kl, mu)
    torch.testing.assert_close(gmu, mu.detach() / shape[0])
    kl = V.gaussian_kl(mu, inputs[3], backend=backend, reduction="sum")
    (gmu,) = torch.autograd.grad(kl, mu)
    torch.testing.assert_close(gmu, mu.detach())


@pytest.mark.parametrize("backend,device", _targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vae_extreme_logits_and_latents(backend, device, dtype):
    """Logits ±1e4 / ±88 / 0 against targets 0, 1, 0.5; mu ±1e3 and logvar ±30: every output and
    gradient finite and equal to the reference on the same rounded inputs."""
    _usable(backend, device)
    vals = torch.tensor([-1e4, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 1e4], device=device)
    reps = 40 if device == "cuda" else 1
    l = vals.repeat(3 * reps).view(3, -1).to(dtype)
    x = torch.tensor([0.0, 1.0, 0.5], device=device).repeat_interleave(vals.numel() * reps).view(3, -1).to(dtype)
    mu = torch.tensor([[1e3, -1e3, 0.0, 1.0]] * 3, device=device).to(dtype)
    lv = torch.tensor([[30.0, -30.0, 0.0, 5.0]] * 3, device=device).to(dtype)
    for recon in ("bce", "mse"):
        got, grads = _vae_compare(backend, l, x, mu, lv, recon=recon, reduction="sum")
        assert all(torch.isfinite(o).all() for o in got)


@pytest.mark.parametrize("backend,device", _targets())
def test_vae_bitwise_deterministic(backend, device):
    _usable(backend, device)
    shape, latent = ((4, 3, 224, 224), 256) if device == "cuda" else ((3, 3, 17, 9), 40)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    inputs = _vae_inputs(shape, latent, dt, torch.float32, device)
    a = _vae_run(lambda *t: V.vae_loss(*t, backend=backend), *inputs, (1.0, 0.7, -0.4))
    b = _vae_run(lambda *t: V.vae_loss(*t, backend=backend), *inputs, (1.0, 0.7, -0.4))
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)


# =============================================================================== timestep_embedding
def _te_module(fd, hd, backend, device, dtype=torch.float32):
    m = te.DualTimestepEmbedding(fd, hd, backend=backend, device=device)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


def _te_size(device):
    return (37, 64, 256) if device == "cuda" else (5, 16, 32)


def _te_tol(device):
    return dict(rtol=1e-4, atol=2e-5) if device == "cuda" else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", _targets(cpp=False))
def test_te_mixed_timestep_and_weight_dtypes(backend, device):
    """t0 and t1 of different dtypes (every integer and float kind) with fp32 weights, and on the
    GPU bf16 / fp16 weights too."""
    _usable(backend, device)
    B, fd, hd = _te_size(device)
    pairs = [(torch.int64, torch.float16), (torch.uint8, torch.float64), (torch.int32, torch.bfloat16),
             (torch.int16, torch.float32), (torch.int8, torch.int64)]
    wdtypes = [torch.float32, torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    for wdtype in wdtypes:
        m = _te_module(fd, hd, backend, device)
        for d0, d1 in pairs:
            hi = 100 if d0 in (torch.int8, torch.uint8) else 999
            t0 = torch.randint(0, hi, (B,), device=device).to(d0)
            t1 = (torch.rand(B, device=device) * 999).to(d1)
            ref32 = m.reference_forward(t0, t1).detach()
            mw = m.to(wdtype)
            with torch.no_grad():
                out = mw(t0, t1)
            assert out.dtype == wdtype
            if wdtype == torch.float32:
                torch.testing.assert_close(out, ref32, **_te_tol(device))
            else:
                assert_close_lowp(out, ref32, mw.reference_forward(t0, t1).detach(), atol=1e-3,
                                  name=f"{d0}/{d1} {wdtype}")
            m = mw.float()


@pytest.mark.parametrize("backend,device", _targets(cpp=False))
def test_te_gradients_from_part_of_the_output_and_some_weights(backend, device):
    """Backward through a column slice and through one row only, with branch 1 frozen: the
    trainable weights get the unfused module's gradients, the frozen ones none."""
    _usable(backend, device)
    B, fd, hd = _te_size(device)
    m = _te_module(fd, hd, backend, device)
    for p in m.mlp1.parameters():
        p.requires_grad_(False)
    ref = te.DualTimestepEmbeddingReference(fd, hd, device=device)
    ref.load_state_dict(m.state_dict())
    for p in ref.mlp1.parameters():
        p.requires_grad_(False)
    t0 = torch.randint(0, 1000, (B,), device=device)
    t1 = torch.rand(B, device=device) * 1000
    for pick in ((slice(None), slice(0, 3)), (B - 1, slice(None))):
        m.zero_grad()
        ref.zero_grad()
        out, want = m(t0, t1), ref(t0, t1)
        go = torch.randn_like(out[pick])
        out[pick].backward(go)
        want[pick].backward(go)
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            if name.startswith("mlp1"):
                assert p.grad is None and q.grad is None, name
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device", _targets(cpp=False))
def test_te_extreme_timesteps(backend, device):
    """t = 0, negative, 1e4, 65504 (fp16 max) and 1e5 (float); int64 up to 10^5: the sinusoids of
    large arguments still match the reference (fp32 t * f, then sin / cos)."""
    _usable(backend, device)
    B, fd, hd = _te_size(device)
    m = _te_module(fd, hd, backend, device)
    base = torch.tensor([0.0, -5.0, -999.0, 1e4, 65504.0, 1e5, 0.5, 12345.678], device=device)
    t0 = base.repeat(-(-B // base.numel()))[:B]
    t1 = torch.tensor([0, 1, 99999, 100000, 54321, 7, 65535, 3], device=device).repeat(-(-B // 8))[:B]
    with torch.no_grad():
        out = m(t0, t1)
    want = m.reference_forward(t0, t1).detach()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", _targets(cpp=False))
def test_te_bitwise_deterministic(backend, device):
    _usable(backend, device)
    B, fd, hd = _te_size(device)
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    for dtype in dtypes:
        m = _te_module(fd, hd, backend, device, dtype)
        t0 = torch.randint(0, 1000, (B,), device=device)
        t1 = torch.rand(B, device=device)
        with torch.no_grad():
            a, b = m(t0, t1), m(t0, t1)
        assert torch.equal(a, b)
        c = te.dual_timestep_embedding(t0, t1, *m.weights(), backend=backend).detach()
        assert torch.equal(a, c)
