"""The offline FID proxy (dualdiff.metrics.feature_fid): a Fréchet distance of a set with itself
is ~0, it grows with added noise, the trained autoencoder reconstructs better than at init, and
nearest_mse finds the nearest reference image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dualdiff.data.images import ProceduralDualScaleImages
from dualdiff.metrics.feature_fid import (ConvAutoencoder, FeatureProxyConfig, feature_statistics,
                                          load_feature_proxy, nearest_mse, proxy_frechet_distance,
                                          save_feature_proxy, train_feature_proxy)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = FeatureProxyConfig(channels=[8, 16], features=8, steps=60, batch_size=16, num_images=96, seed=3)


@pytest.fixture(scope="module")
def data():
    ds = ProceduralDualScaleImages(96, seed=7, size=16, texture_scale=0.25)
    x = torch.stack([ds[i] for i in range(len(ds))])
    torch.set_num_threads(1)
    return x, train_feature_proxy(x, CFG)


def test_distance_of_a_set_with_itself_is_zero(data):
    x, net = data
    d = proxy_frechet_distance(net, x, x)
    scale = float(np.trace(feature_statistics(net, x)[1]))
    assert abs(d) < 1e-6 * scale


def test_distance_grows_with_added_noise(data):
    x, net = data
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    d = [proxy_frechet_distance(net, x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.1, 0.3, 0.8)]
    assert d[0] < 1e-6 * max(d)
    assert all(b > a for a, b in zip(d, d[1:])), d


def test_training_lowers_reconstruction_error_and_is_seeded(data):
    x, net = data
    fresh = ConvAutoencoder(16, CFG.channels, CFG.features)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(fresh(x), x).item()
        after = torch.nn.functional.mse_loss(net(x), x).item()
    assert after < 0.7 * before
    again = train_feature_proxy(x, CFG)
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_save_load_round_trip(data, tmp_path):
    x, net = data
    p = save_feature_proxy(net, CFG, tmp_path / "proxy.pt", meta={"what": "test"})
    net2, cfg2, meta = load_feature_proxy(p)
    assert cfg2 == CFG and meta == {"what": "test"}
    assert proxy_frechet_distance(net2, x, x[:48]) == pytest.approx(proxy_frechet_distance(net, x, x[:48]), rel=1e-9)


def test_nearest_mse_brute_force():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(20, 3, 4, 4, generator=g)
    s = torch.cat([ref[:3] + 0.01, torch.rand(5, 3, 4, 4, generator=g)])
    got = nearest_mse(s, ref, chunk=3)
    want = torch.stack([((si[None].double() - ref.double()) ** 2).mean(dim=(1, 2, 3)).min() for si in s])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got[:3], torch.full((3,), 1e-4, dtype=torch.float64), rtol=1e-3)
