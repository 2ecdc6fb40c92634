"""auto's size rule (dualdiff._backend.select_by_size; issue 18 item 6): on the CPU, below an op's
AUTO_MIN_NUMEL threshold auto runs the torch reference, at or above it the fused cpp kernels; a
forced backend (``backend=`` or ``DUALDIFF_BACKEND``) is never overridden; torch.compile (also
with dynamic shapes) follows the same rule. The thresholds are patched to known values here so
that the rule is tested whatever the measured constants are; one test checks the shipped ones."""
from __future__ import annotations

import pytest
import torch

from dualdiff._backend import ENV_VAR, backend_status, select_by_size
from dualdiff.ops import timestep_embedding as te
from dualdiff.ops import vae as vae_ops
from dualdiff.ops import weighted_dice as wd

pytestmark = pytest.mark.skipif(not backend_status("cpp", "cpu")[0], reason="the cpp backend is not usable here")

THRESHOLD = 1000  # elements: the patched threshold of every test below


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(wd.AUTO_MIN_NUMEL, "cpu", {"cpp": THRESHOLD})
    monkeypatch.setitem(vae_ops.AUTO_MIN_NUMEL, "cpu", {"cpp": THRESHOLD})
    monkeypatch.setitem(vae_ops.KL_AUTO_MIN_NUMEL, "cpu", {"cpp": THRESHOLD})


@pytest.fixture
def dice_calls(monkeypatch):
    """The backend of every weighted-Dice forward, in order."""
    calls: list[str] = []
    real = wd._forward

    def spy(backend, *args):
        calls.append(backend)
        return real(backend, *args)

    monkeypatch.setattr(wd, "_forward", spy)
    return calls


@pytest.fixture
def vae_calls(monkeypatch):
    """'torch' for every reference call of vae_loss, the backend for every fused forward."""
    calls: list[str] = []
    real_fwd, real_ref = vae_ops._forward, vae_ops.vae_loss_reference

    def spy_fwd(backend, *args):
        calls.append(backend)
        return real_fwd(backend, *args)

    def spy_ref(*args, **kwargs):
        calls.append("torch")
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(vae_ops, "_forward", spy_fwd)
    monkeypatch.setattr(vae_ops, "vae_loss_reference", spy_ref)
    return calls


def _dice_inputs(B, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, requires_grad=True)
    t = (torch.rand(B, C, H, W, generator=g) > 0.5).float()
    w = torch.rand(B, C, generator=g)
    return x, t, w


SMALL, LARGE = (2, 2, 8, 8), (2, 2, 16, 16)  # 256 < THRESHOLD <= 1024


def _vae_inputs(shape, latent=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    x = torch.rand(shape, generator=g)
    mu = torch.randn(shape[0], latent, generator=g, requires_grad=True)
    lv = (0.3 * torch.randn(shape[0], latent, generator=g)).requires_grad_()
    return logits, x, mu, lv


def test_select_by_size_rule(monkeypatch):
    table = {"cpu": {"cpp": 100}, "cuda": {"triton": 0}}
    assert select_by_size("cpp", "cpu", None, 99, table) == "torch"
    assert select_by_size("cpp", "cpu", None, 100, table) == "cpp"
    assert select_by_size("cpp", "cpu", "auto", 5, table) == "torch"
    assert select_by_size("cpp", "cpu", "cpp", 5, table) == "cpp"       # forced by argument
    assert select_by_size("triton", "cuda", None, 1, table) == "triton"  # 0: always fused
    assert select_by_size("torch", "cpu", None, 10**9, table) == "torch"
    monkeypatch.setenv(ENV_VAR, "cpp")
    assert select_by_size("cpp", "cpu", None, 5, table) == "cpp"        # forced by the environment


def test_dice_auto_picks_torch_below_and_cpp_above(dice_calls):
    assert wd.auto_backend(THRESHOLD - 1, "cpu") == "torch"
    assert wd.auto_backend(THRESHOLD, "cpu") == "cpp"
    for shape, expect in ((SMALL, "torch"), (LARGE, "cpp")):
        x, t, w = _dice_inputs(*shape)
        dice_calls.clear()
        loss = wd.weighted_dice_loss(x, t, w, squared_pred=True)
        loss.backward()
        assert dice_calls == [expect]
        ref = wd.weighted_dice_loss_reference(x.detach(), t, w, squared_pred=True)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_dice_forcing_still_forces(dice_calls, monkeypatch, how):
    x, t, w = _dice_inputs(*SMALL)
    kw = {"backend": "cpp"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(ENV_VAR, "cpp")
        assert wd.auto_backend(1, "cpu") == "cpp"
    wd.weighted_dice_loss(x, t, w, **kw).backward()
    assert dice_calls == ["cpp"]  # below the threshold, yet forced
    x, t, w = _dice_inputs(*LARGE)
    dice_calls.clear()
    if how == "environment":
        monkeypatch.setenv(ENV_VAR, "torch")
    wd.weighted_dice_loss(x, t, w, **({"backend": "torch"} if how == "argument" else {})).backward()
    assert dice_calls == ["torch"]  # above the threshold, yet forced


def test_vae_auto_picks_torch_below_and_cpp_above(vae_calls):
    assert vae_ops.auto_backend(THRESHOLD - 1, "cpu") == "torch"
    assert vae_ops.auto_backend(THRESHOLD, "cpu") == "cpp"
    for shape, expect in (((2, 3, 8, 8), "torch"), ((2, 3, 16, 16), "cpp")):  # 384, 1536 elements
        args = _vae_inputs(shape)
        vae_calls.clear()
        total, _, _ = vae_ops.vae_loss(*args, kl_weight=0.5)
        total.backward()
        assert vae_calls == [expect]
        ref = vae_ops.vae_loss_reference(*(a.detach() for a in args), kl_weight=0.5)[0]
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_uses_the_latent_size(vae_calls, monkeypatch):
    # gaussian_kl's size is mu.numel(); its torch path is gaussian_kl_reference
    seen = []
    real = vae_ops.gaussian_kl_reference
    monkeypatch.setattr(vae_ops, "gaussian_kl_reference", lambda *a, **k: seen.append("torch") or real(*a, **k))
    for rows, expect in ((10, "torch"), (200, "cpp")):  # 80 and 1600 latent elements
        mu = torch.randn(rows, 8, requires_grad=True)
        vae_calls.clear(), seen.clear()
        vae_ops.gaussian_kl(mu, torch.zeros(rows, 8)).backward()
        assert (seen or vae_calls) == [expect]


def test_vae_forcing_still_forces(vae_calls, monkeypatch):
    args = _vae_inputs((2, 3, 8, 8))  # below the threshold
    vae_ops.vae_loss(*args, backend="cpp")[0].backward()
    assert vae_calls == ["cpp"]
    vae_calls.clear()
    monkeypatch.setenv(ENV_VAR, "cpp")
    vae_ops.vae_loss(*args)[0].backward()
    assert vae_calls == ["cpp"]
    vae_calls.clear()
    monkeypatch.setenv(ENV_VAR, "torch")
    vae_ops.vae_loss(*_vae_inputs((2, 3, 16, 16)))[0].backward()  # above it
    assert vae_calls == ["torch"]


def test_cuda_thresholds_are_unmeasured_so_always_fused():
    for table in (wd.AUTO_MIN_NUMEL, vae_ops.AUTO_MIN_NUMEL, vae_ops.KL_AUTO_MIN_NUMEL):
        assert set(table["cuda"].values()) == {0}
    assert not any(te.AUTO_MIN_BATCH["cuda"].values())
    assert te.auto_backend(64, "cpu") == "torch"  # no CPU kernel for the timestep embedding


def test_dice_compile_fullgraph_follows_the_size(dice_calls):
    torch._dynamo.reset()

    def f(x, t, w):
        return wd.weighted_dice_loss(x, t, w, squared_pred=True)

    # default (automatic) dynamic shapes: the second shape recompiles with symbolic sizes, whose
    # comparison with the threshold is a guard, so later shapes on either side are checked too
    cf = torch.compile(f, fullgraph=True)
    for shape, expect in ((SMALL, "torch"), (LARGE, "cpp"), ((2, 2, 7, 9), "torch"), ((3, 2, 20, 20), "cpp")):
        x, t, w = _dice_inputs(*shape, seed=1)
        dice_calls.clear()
        loss = cf(x, t, w)
        loss.backward()
        assert dice_calls == [expect], shape
        x2 = x.detach().clone().requires_grad_()
        ref = wd.weighted_dice_loss_reference(x2, t, w, squared_pred=True)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_vae_compile_fullgraph_follows_the_size(vae_calls):
    torch._dynamo.reset()

    def f(logits, x, mu, lv):
        return vae_ops.vae_loss(logits, x, mu, lv, kl_weight=0.25)[0]

    cf = torch.compile(f, fullgraph=True)
    for shape in ((2, 3, 8, 8), (2, 3, 16, 16)):
        args = _vae_inputs(shape, seed=2)
        vae_calls.clear()
        total = cf(*args)
        total.backward()
        ref = vae_ops.vae_loss_reference(*(a.detach() for a in args), kl_weight=0.25)[0]
        torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
        # the fused forward runs inside the compiled graph (recorded); the reference is traced
        # into the graph, so its Python spy is not called at run time
        assert ("cpp" in vae_calls) == (shape[2] == 16), (shape, vae_calls)


def test_shipped_cpu_thresholds_in_the_real_ops(vae_calls, dice_calls, monkeypatch):
    """With the shipped tables: vae_loss's reference below AUTO_MIN_NUMEL_CPU image elements,
    cpp from there; gaussian_kl likewise at KL_AUTO_MIN_NUMEL_CPU; Dice always cpp."""
    monkeypatch.setitem(vae_ops.AUTO_MIN_NUMEL, "cpu", {"cpp": vae_ops.AUTO_MIN_NUMEL_CPU})
    monkeypatch.setitem(vae_ops.KL_AUTO_MIN_NUMEL, "cpu", {"cpp": vae_ops.KL_AUTO_MIN_NUMEL_CPU})
    monkeypatch.setitem(wd.AUTO_MIN_NUMEL, "cpu", {"cpp": wd.AUTO_MIN_NUMEL_CPU})
    n = vae_ops.AUTO_MIN_NUMEL_CPU
    for numel, expect in ((n - 1, "torch"), (n, "cpp")):
        args = _vae_inputs((1, numel))
        vae_calls.clear()
        vae_ops.vae_loss(*args)[0].backward()
        assert vae_calls == [expect], numel
    k = vae_ops.KL_AUTO_MIN_NUMEL_CPU
    assert vae_ops.auto_backend(k - 1, "cpu", "gaussian_kl") == "torch"
    assert vae_ops.auto_backend(k, "cpu", "gaussian_kl") == "cpp"
    x, t, w = _dice_inputs(1, 1, 2, 2)
    wd.weighted_dice_loss(x, t, w).backward()
    assert dice_calls == ["cpp"]
