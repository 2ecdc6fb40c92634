"""The C++ CPU kernels' thread rule (csrc/cpu_parallel.h): no OpenMP region below the grain (ATen's
32,768 elements), one thread per grain above it, and the same bits whatever the thread count.

The suite runs with one torch thread (conftest), so these tests raise it inside: without them
the multi-threaded path of the kernels would never run in CI.
"""
from __future__ import annotations

import pytest
import torch

from dualdiff.ops.vae import vae_loss, vae_loss_reference
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
from tests.conftest import require_backend


@pytest.fixture
def ext():
    require_backend("cpp")
    from dualdiff._backend import extension

    return extension()


@pytest.fixture
def threads():
    """``threads(n)`` sets torch's (and so OpenMP's) thread count for the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_grain_rule(ext, threads):
    grain = ext.cpu_grain_elements
    assert grain == 32768  # at::internal::GRAIN_SIZE
    threads(4)
    expect_parallel = ext.has_openmp and ext.openmp_max_threads() == 4
    for work, want in [(0, 1), (1, 1), (grain - 1, 1), (grain, 1), (grain + 1, 2),
                       (2 * grain, 2), (3 * grain + 1, 4), (100 * grain, 4)]:
        assert ext.cpu_threads_for(work) == (want if expect_parallel else 1), work
    threads(1)
    assert ext.cpu_threads_for(100 * grain) == 1


def _dice_run(x, g, w, activation):
    xt = x.clone().requires_grad_(True)
    loss = weighted_dice_loss(xt, g, w, activation=activation, squared_pred=True,
                              reduction="none", backend="cpp")
    (gx,) = torch.autograd.grad(loss.sum(), xt)
    return loss.detach(), gx


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (2, 4, 96, 96)])  # below / above the grain
def test_dice_same_bits_for_any_thread_count(ext, threads, activation, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    g = (torch.rand(shape, generator=gen) > 0.5).float()
    w = torch.rand(shape[:2], generator=gen)
    threads(1)
    one = _dice_run(x, g, w, activation)
    threads(3)
    if x.numel() > ext.cpu_grain_elements and ext.has_openmp:
        assert ext.cpu_threads_for(x.numel()) == 3  # the parallel path really runs
    many = _dice_run(x, g, w, activation)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    xr = x.clone().requires_grad_(True)
    ref = weighted_dice_loss_reference(xr, g, w, activation=activation, squared_pred=True,
                                       reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), xr)
    torch.testing.assert_close(many[0], ref.detach())
    torch.testing.assert_close(many[1], gr)


def _vae_run(logits, x, mu, logvar):
    leaves = [t.clone().requires_grad_(True) for t in (logits, mu, logvar)]
    total, rec, kl = vae_loss(leaves[0], x, leaves[1], leaves[2], kl_weight=0.5, backend="cpp")
    grads = torch.autograd.grad(total, leaves)
    return (total.detach(), rec.detach(), kl.detach(), *grads)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (4, 3, 64, 64)])  # below / above the grain
def test_vae_same_bits_for_any_thread_count(ext, threads, shape):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(shape, generator=gen) * 3
    x = torch.rand(shape, generator=gen)
    mu = torch.randn(shape[0], 16, generator=gen)
    logvar = torch.randn(shape[0], 16, generator=gen) * 0.5
    threads(1)
    one = _vae_run(logits, x, mu, logvar)
    threads(3)
    many = _vae_run(logits, x, mu, logvar)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    leaves = [t.clone().requires_grad_(True) for t in (logits, mu, logvar)]
    ref = vae_loss_reference(leaves[0], x, leaves[1], leaves[2], kl_weight=0.5)
    ref_grads = torch.autograd.grad(ref[0], leaves)
    for got, want in zip(many, (*(r.detach() for r in ref), *ref_grads)):
        torch.testing.assert_close(got, want)
