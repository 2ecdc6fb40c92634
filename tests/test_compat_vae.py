"""dualdiff.compat.VAELoss: VAE-DG's arithmetic (written out here from its loss_function) with
reduction="sum", unnormalize=False; the corrected defaults; fused (logits) == plain (probabilities);
gradients; the model call-site form."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dualdiff.compat import FallbackWarning, VAELoss
from dualdiff.compat.vae_dg import IMAGENET_MEAN, IMAGENET_STD
from dualdiff.testing import forced_backend

HP = SimpleNamespace(loss_multiplier_kl=0.7, loss_multiplier_y=3.0)


def _batch(B=3, S=6, D=5, K=4):
    img = torch.rand(B, 3, S, S)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (img - mean) / std
    logits = torch.randn(B, 3, S, S, requires_grad=True)
    mu, logvar = torch.randn(B, D, requires_grad=True), (0.3 * torch.randn(B, D)).requires_grad_(True)
    return img, x, logits, mu, logvar, torch.randn(B, K), torch.randint(0, K, (B,))


def _vae_dg(recon_x, target, mu, logvar, y_hat, y, hp, reduction):
    """VAE-DG's loss_function terms (probabilities, any target), reduction 'sum' = the original."""
    p = recon_x
    bce = -(target * p.log().clamp_min(-100) + (1 - target) * (1 - p).log().clamp_min(-100))
    recon = bce.sum() if reduction == "sum" else bce.mean()
    kld = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    ce = F.cross_entropy(y_hat, y, reduction=reduction)
    return recon + hp.loss_multiplier_kl * kld + hp.loss_multiplier_y * ce, recon, hp.loss_multiplier_kl * kld, \
        hp.loss_multiplier_y * ce


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("reduction, unnormalize", [("mean", True), ("sum", False)])
def test_fused_and_plain_match_formula(backend, reduction, unnormalize):
    img, x, logits, mu, logvar, y_hat, y = _batch()
    target = img if unnormalize else x
    want = _vae_dg(torch.sigmoid(logits), target, mu, logvar, y_hat, y, HP, reduction)
    with forced_backend(backend):
        fused = VAELoss.from_hparams(HP, reduction=reduction, unnormalize=unnormalize, logits=True)
        assert fused.fallback_reason is None
        got = fused(logits, x, mu, logvar, y_hat, y)
        plain = VAELoss.from_hparams(HP, reduction=reduction, unnormalize=unnormalize)(
            torch.sigmoid(logits), x, mu, logvar, y_hat, y)
    for a, b, c in zip(got, want, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got[0], (logits, mu, logvar))
    g_want = torch.autograd.grad(want[0], (logits, mu, logvar))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_defaults_are_the_corrections():
    img, x, logits, mu, logvar, y_hat, y = _batch()
    from dualdiff.compat._fallback import reset_notices

    reset_notices()
    with pytest.warns(FallbackWarning, match="logits=False"):
        loss = VAELoss()
    assert loss.reduction == "mean" and loss.unnormalize and not loss.logits
    torch.testing.assert_close(loss.target(x), img, rtol=1e-6, atol=1e-6)
    total, recon, kl, ce = loss(torch.sigmoid(logits), x, mu, logvar, y_hat, y)
    torch.testing.assert_close(recon, F.binary_cross_entropy(torch.sigmoid(logits), img))
    torch.testing.assert_close(ce, F.cross_entropy(y_hat, y))


def test_model_call_site():
    """VAE-DG's `total, rec, kl, ce = self.loss_function(x, y)` becomes `loss.loss_function(model, x, y)`."""
    class TinyVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.cls = nn.Linear(3 * 36, 10), nn.Linear(5, 3 * 36), nn.Linear(5, 4)

        def forward(self, x):
            mu, logvar = self.enc(x.flatten(1)).chunk(2, dim=1)
            return self.dec(mu).view_as(x), mu, logvar, self.cls(mu)  # logits: no final Sigmoid

    _, x, _, _, _, _, y = _batch()
    model = TinyVAE()
    out = VAELoss.from_hparams(HP, logits=True).loss_function(model, x, y)
    recon_x, mu, logvar, y_hat = model(x)
    want = VAELoss.from_hparams(HP, logits=False)(torch.sigmoid(recon_x), x, mu, logvar, y_hat, y)
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="reduction"):
        VAELoss(reduction="none", logits=True)
    loss = VAELoss(logits=True)
    with pytest.raises(ValueError, match="shape"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mu and logvar"):
        loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one mean/std per channel"):
        loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), torch.zeros(2, 3))
