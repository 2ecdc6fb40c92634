"""FID from folders: stand-in extractor, caching, Inception weights (local file / offline error)."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from dualdiff.metrics.fid import (
    InceptionWeightsError,
    activation_statistics,
    fid_from_folders,
    folder_statistics,
    list_images,
    load_inception,
)


class TinyFeatures(torch.nn.Module):
    """A fixed random projection of 4x4-pooled images to 6 features (counts its calls)."""

    cache_id = "tiny-test-features"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(48, 6, generator=g), requires_grad=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(x.shape[0], -1) @ self.w


def _folder(path, n, seed, shift=0.0):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        a = np.clip(rng.normal(0.5 + shift, 0.2, (16, 16, 3)), 0, 1)
        Image.fromarray((a * 255).astype(np.uint8)).save(path / f"{k:03d}.png")
    return path


def test_fid_matches_pytorch_fid_formula_and_caches(tmp_path, require):
    calculate_frechet_distance = require("pytorch_fid.fid_score").calculate_frechet_distance
    a = _folder(tmp_path / "a", 20, 0)
    b = _folder(tmp_path / "b", 20, 1, shift=0.1)
    ext = TinyFeatures()
    cache = tmp_path / "cache"
    fid = fid_from_folders(a, b, extractor=ext, cache_dir=cache, batch_size=7)
    mu_a, s_a = activation_statistics(list_images(a), ext, batch_size=20)
    mu_b, s_b = activation_statistics(list_images(b), ext, batch_size=20)
    assert fid == pytest.approx(calculate_frechet_distance(mu_a, s_a, mu_b, s_b), rel=1e-6)
    assert fid > 0.01
    assert fid_from_folders(a, a, extractor=ext, cache_dir=cache) == pytest.approx(0.0, abs=1e-6)
    assert len(list(cache.glob("*.npz"))) == 2
    calls = ext.calls
    fid2 = fid_from_folders(a, b, extractor=ext, cache_dir=cache)  # both stats from the cache
    assert ext.calls == calls and fid2 == pytest.approx(fid, rel=1e-12)
    # changing one image changes the key: recomputed, a third cache file
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(a / "000.png")
    fid3 = fid_from_folders(a, b, extractor=ext, cache_dir=cache)
    assert ext.calls > calls and fid3 != pytest.approx(fid, rel=1e-6)
    assert len(list(cache.glob("*.npz"))) == 3
    mu, sigma = folder_statistics(b, ext, cache_dir=cache)
    assert mu.shape == (6,) and sigma.shape == (6, 6)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")


def test_corrupt_image_named_before_any_feature_is_computed(tmp_path):
    from dualdiff.errors import DataError

    a = _folder(tmp_path / "a", 6, 0)
    data = (a / "003.png").read_bytes()
    (a / "003.png").write_bytes(data[: len(data) // 2])
    ext = TinyFeatures()
    with pytest.raises(DataError, match=r"bad image '.*a/003\.png'.*skip_bad=True skips it"):
        fid_from_folders(a, a, extractor=ext, use_cache=False)
    assert ext.calls == 0


def test_skip_bad_leaves_bad_images_out(tmp_path):
    from dualdiff.data.checks import BadDataWarning
    from dualdiff.errors import DataError

    a = _folder(tmp_path / "a", 6, 0)
    ext = TinyFeatures()
    ref = activation_statistics(list_images(a)[:-1], ext)
    (a / "005.png").write_bytes(b"not an image")
    with pytest.warns(BadDataWarning, match=r"005\.png"):
        mu, sigma = folder_statistics(a, ext, use_cache=False, skip_bad=True)
    np.testing.assert_allclose(mu, ref[0])
    np.testing.assert_allclose(sigma, ref[1])
    # a file that breaks after the check: named, or left out under skip_bad
    files = list_images(a)[:-1]
    (a / "002.png").write_bytes(b"broken later")
    with pytest.raises(DataError, match=r"bad image '.*002\.png'"):
        activation_statistics(files, ext, batch_size=2)
    with pytest.warns(BadDataWarning, match=r"002\.png"):
        mu2, _ = activation_statistics(files, ext, batch_size=2, skip_bad=True)
    ref2 = activation_statistics([f for f in files if f.name != "002.png"], ext)
    np.testing.assert_allclose(mu2, ref2[0], rtol=1e-5)  # other batch sizes: fp32 sums differ


def test_offline_without_weights_says_how(tmp_path, monkeypatch, require):
    pfi = require("pytorch_fid.inception")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(InceptionWeightsError, match="--inception-weights"):
        load_inception(allow_download=False)
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        load_inception(inception_weights=tmp_path / "missing.pth")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(pfi, "load_state_dict_from_url", no_network)
    with pytest.raises(InceptionWeightsError, match="downloading failed.*--inception-weights"):
        load_inception(allow_download=True)
    with pytest.raises(InceptionWeightsError):
        fid_from_folders(tmp_path, tmp_path, allow_download=False)


def test_local_inception_weights_file(tmp_path, monkeypatch, require):
    torchvision = require("torchvision")
    pfi = require("pytorch_fid.inception")
    # build the FID Inception's structure without weights, save its (random) state dict
    with monkeypatch.context() as m:
        m.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None)
        net = pfi.fid_inception_v3()
    path = tmp_path / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    ext = load_inception(dims=64, inception_weights=path, allow_download=False)
    torch.testing.assert_close(ext.net.blocks[0][0].conv.weight, net.Conv2d_1a_3x3.conv.weight)
    out = ext(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 64) and torch.isfinite(out).all()
