"""Shapes and behaviour of the vae experiment's models: ResNetVAE (both decoders, both presets)
and the spatial ConvKLAutoencoder."""
from __future__ import annotations

import pytest
import torch

from dualdiff.experiments.vae import VAEConfig, build_vae_model
from dualdiff.models.autoencoder import ConvKLAutoencoder
from dualdiff.models.vae import ResNetVAE, deep_decoder_plan


@pytest.mark.parametrize("f", [4, 8])
def test_conv_kl_shapes_and_api(f):
    torch.manual_seed(0)
    ae = ConvKLAutoencoder(3, 4, 8, (1, 2, 2), downsample_factor=f, norm_groups=4)
    x = torch.randn(2, 3, 32, 32)
    mu, logvar = ae.encode(x)
    assert mu.shape == logvar.shape == (2, 4, 32 // f, 32 // f)
    logits, mu2, lv2 = ae(x, sample=False)
    assert logits.shape == (2, 3, 32, 32)
    assert torch.allclose(mu2, mu) and torch.allclose(lv2, logvar)
    assert torch.allclose(ae.decode(mu), logits, atol=1e-6)  # sample=False decodes mu
    assert float(ae.scaling_factor) == 1.0
    s = ae.fit_scaling_factor(x, sample=False)
    assert s == pytest.approx(1.0 / mu.std().item(), rel=1e-5)
    assert "scaling_factor" in ae.state_dict()
    z = ae.to_latent(x)
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(ae.from_latent(z), logits, atol=1e-5)


def test_conv_kl_bad_input():
    with pytest.raises(ValueError, match="downsample_factor"):
        ConvKLAutoencoder(channel_mults=(1, 2), downsample_factor=8)
    with pytest.raises(ValueError, match="downsample_factor"):
        ConvKLAutoencoder(downsample_factor=6)
    ae = ConvKLAutoencoder(3, 4, 8, (1, 2), downsample_factor=4, norm_groups=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        ae.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        ae.decode(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("decoder", ["original", "deep"])
def test_resnet_vae_tiny_preset_shapes(decoder):
    cfg = VAEConfig.from_name("tiny")
    cfg.model.decoder = decoder
    m = build_vae_model(cfg.model, 5)
    s = cfg.model.image_size
    logits, mu, logvar, y = m(torch.randn(3, 3, s, s))
    assert logits.shape == (3, 3, s, s)
    assert mu.shape == logvar.shape == (3, cfg.model.latent_dim)
    assert y.shape == (3, 5)
    h = m.fc_dec(mu).view(-1, m.start_channels, m.start_size, m.start_size)
    # the original decoder stops at 39² and is resized; the deep one reaches S itself
    assert m.deconv(h).shape[-1] == (39 if decoder == "original" else s)


@pytest.mark.parametrize("arch,decoder", [("resnet_vae", "original"), ("resnet_vae", "deep"), ("conv_kl", None)])
def test_default_preset_shapes_on_meta(arch, decoder):
    cfg = VAEConfig.from_name("default")
    cfg.model.arch = arch
    if decoder:
        cfg.model.decoder = decoder
    with torch.device("meta"):
        m = build_vae_model(cfg.model, 5)
        out = m(torch.empty(2, 3, 224, 224))
    assert out[0].shape == (2, 3, 224, 224)
    if arch == "conv_kl":
        assert out[1].shape == (2, 4, 28, 28)
    else:
        assert out[1].shape == (2, 256) and out[3].shape == (2, 5)
        assert m.fc[0].in_features == 2048  # ResNet-50 features


def test_deep_decoder_plan():
    assert deep_decoder_plan(224) == (7, 5)
    assert deep_decoder_plan(64) == (4, 4)
    assert deep_decoder_plan(96) == (6, 4)
    with pytest.raises(ValueError):
        deep_decoder_plan(63)


def _bn_states(m):
    return [(b.training, b.weight.requires_grad) for b in m.trunk.modules() if isinstance(b, torch.nn.BatchNorm2d)]


def test_bn_frozen_only_with_pretrained_weights(tmp_path):
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    plain = ResNetVAE(32, trunk="resnet18", fc_hidden=16, latent_dim=4).train()
    assert all(st == (True, True) for st in _bn_states(plain))
    loaded = ResNetVAE(32, trunk="resnet18", trunk_weights=str(path), fc_hidden=16, latent_dim=4).train()
    assert all(st == (False, False) for st in _bn_states(loaded))
    assert loaded.fc[1].training  # only the trunk's BN is frozen
    with pytest.raises(FileNotFoundError, match="trunk_weights"):
        ResNetVAE(32, trunk="resnet18", trunk_weights=str(tmp_path / "missing.pt"))
