"""Image data sets of the LIFT experiment: procedural default, image folders, AFHQ error path,
dual-scale views."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dualdiff.data.images import (DatasetUnavailableError, HFImageDataset, ImageFolderDataset,
                                  ProceduralDualScaleImages, dual_scale_views, hf_afhq)



pytestmark = pytest.mark.usefixtures("one_torch_thread")

def test_procedural_deterministic_and_in_range():
    a = ProceduralDualScaleImages(12, seed=3)
    b = ProceduralDualScaleImages(12, seed=3)
    x = a.tensors()
    assert x.shape == (12, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, b.tensors(), rtol=0, atol=0)
    # an image depends only on (seed, index): access order and dataset length do not matter
    torch.testing.assert_close(b[7], x[7], rtol=0, atol=0)
    torch.testing.assert_close(ProceduralDualScaleImages(100, seed=3)[5], x[5], rtol=0, atol=0)
    torch.testing.assert_close(a[-1], x[11], rtol=0, atol=0)
    other = ProceduralDualScaleImages(12, seed=4).tensors()
    assert (other - x).abs().mean() > 0.05
    # images differ from each other
    assert (x[0] - x[1]).abs().mean() > 0.05
    with pytest.raises(IndexError):
        a[12]
    with pytest.raises(ValueError, match="n"):
        ProceduralDualScaleImages(0)


def test_procedural_has_structure_at_both_scales():
    x = ProceduralDualScaleImages(32, seed=0).tensors()
    _, x32 = dual_scale_views(x)
    fine = x - F.interpolate(x32, scale_factor=2, mode="nearest")  # detail lost at 32x32
    # coarse: colour variation across each image survives the downsampling
    assert x32.flatten(1).std(dim=1).min() > 0.05
    # fine: the images carry detail that the 32x32 view averages away (textures confined to
    # a small blob carry little of it)
    per_image = fine.flatten(1).pow(2).mean(dim=1)
    assert per_image.min() > 2e-5
    assert (per_image > 1e-3).float().mean() >= 0.75
    assert per_image.median() > 3e-3


def test_procedural_texture_scale():
    """texture_scale multiplies the fine texture only: 1 is the default image bit for bit, 0 the
    texture-free image, and any scale interpolates linearly between the two (before the clamp)."""
    base = ProceduralDualScaleImages(8, seed=2).tensors()
    torch.testing.assert_close(ProceduralDualScaleImages(8, seed=2, texture_scale=1.0).tensors(), base,
                               rtol=0, atol=0)
    plain = ProceduralDualScaleImages(8, seed=2, texture_scale=0.0).tensors()
    quarter = ProceduralDualScaleImages(8, seed=2, texture_scale=0.25).tensors()
    inside = (base.abs() < 1) & (plain.abs() < 1) & (quarter.abs() < 1)  # where nothing was clamped
    torch.testing.assert_close(quarter[inside], (plain + 0.25 * (base - plain))[inside], rtol=0, atol=1e-6)
    # the texture is most of the detail the 32x32 view loses: ~1/16 of it at a quarter of the amplitude
    def fine_energy(x):
        _, x32 = dual_scale_views(x)
        return (x - F.interpolate(x32, scale_factor=2, mode="nearest")).pow(2).mean()
    assert fine_energy(plain) < 0.5 * fine_energy(quarter) and fine_energy(quarter) < 0.15 * fine_energy(base)
    for bad in (-0.5, True, "1"):
        with pytest.raises(ValueError, match="texture_scale"):
            ProceduralDualScaleImages(4, texture_scale=bad)


def test_dual_scale_views_area():
    x = torch.randn(2, 3, 64, 64)
    x64, x32 = dual_scale_views(x)
    assert x64 is x and x32.shape == (2, 3, 32, 32)
    manual = x.reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5))
    torch.testing.assert_close(x32, manual)
    _, single = dual_scale_views(x[0])
    torch.testing.assert_close(single, manual[0])
    _, bil = dual_scale_views(x, mode="bilinear")
    torch.testing.assert_close(bil, manual, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x64"):
        dual_scale_views(torch.randn(3, 63, 64))
    with pytest.raises(ValueError, match="mode"):
        dual_scale_views(x, mode="nearest")
    with pytest.raises(TypeError, match="x64"):
        dual_scale_views(torch.zeros(3, 64, 64, dtype=torch.long))


def _save(img_tensor_hwc_uint8, path, mode=None):
    from PIL import Image
    Image.fromarray(img_tensor_hwc_uint8.numpy(), mode=mode).save(path)


def test_image_folder(tmp_path):
    # 64 x 128 (h x w): left quarter red, middle half green, right quarter blue -> after the
    # resize (shorter side already 64) the 64-wide centre crop is pure green
    img = torch.zeros(64, 128, 3, dtype=torch.uint8)
    img[:, :32, 0] = 255
    img[:, 32:96, 1] = 255
    img[:, 96:, 2] = 255
    _save(img, tmp_path / "a_bands.png")
    (tmp_path / "sub").mkdir()
    _save(torch.full((100, 80, 3), 128, dtype=torch.uint8), tmp_path / "sub" / "b_grey.jpg")
    _save(torch.randint(0, 256, (40, 40), dtype=torch.uint8), tmp_path / "sub" / "c_gray_l.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, size=64)
    assert len(ds) == 3
    for i in range(3):
        x = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
    bands = ds[0]
    torch.testing.assert_close(bands[1], torch.ones(64, 64))
    torch.testing.assert_close(bands[0], -torch.ones(64, 64))
    torch.testing.assert_close(bands[2], -torch.ones(64, 64))
    grey = ds[1]
    assert (grey - (128 / 255 * 2 - 1)).abs().max() < 0.02
    gray_l = ds[2]  # single-channel input -> 3 identical channels, upscaled from 40 px
    torch.testing.assert_close(gray_l[0], gray_l[1])
    small = ImageFolderDataset(tmp_path, size=16)
    assert small[0].shape == (3, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailableError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_image_folder_corrupt_png_named_at_construction(tmp_path):
    from dualdiff.errors import DataError

    for k in range(3):
        _save(torch.full((8, 8, 3), 40 * k, dtype=torch.uint8), tmp_path / f"{k}.png")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[:-20])  # IDAT CRC / IEND gone
    with pytest.raises(DataError, match=r"bad image '.*1\.png'.*data\.skip_bad=true skips it"):
        ImageFolderDataset(tmp_path, size=8)


def test_image_folder_skip_bad_at_build_and_mid_run(tmp_path):
    from dualdiff.data.checks import BadDataWarning

    for k in range(4):
        _save(torch.full((8, 8, 3), 40 * k, dtype=torch.uint8), tmp_path / f"{k}.png")
    (tmp_path / "0.png").write_bytes(b"garbage")
    with pytest.warns(BadDataWarning, match=r"0\.png"):
        ds = ImageFolderDataset(tmp_path, size=8, skip_bad=True)
    assert [f.name for f in ds.files] == ["1.png", "2.png", "3.png"]
    (tmp_path / "0.png").unlink()
    strict = ImageFolderDataset(tmp_path, size=8)
    (tmp_path / "2.png").write_bytes(b"broken after the check")  # mid-run
    with pytest.raises(DatasetUnavailableError, match=r"bad image '.*2\.png'"):
        strict[1]
    with pytest.warns(BadDataWarning, match=r"2\.png"):
        x = ds[1]
    torch.testing.assert_close(x, ds[2])  # the next good image instead
    assert not torch.allclose(x, ds[0])


def test_hf_afhq_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetUnavailableError, match="pip install datasets"):
        hf_afhq("train")


def test_hf_afhq_unreachable(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(name, split, cache_dir=None):
        raise ConnectionError("offline")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DatasetUnavailableError, match="huggan/AFHQv2.*offline"):
        hf_afhq("train", cache_dir="/nonexistent")


def test_hf_afhq_wraps_images(monkeypatch):
    from PIL import Image
    fake = types.ModuleType("datasets")
    rows = [{"image": Image.new("RGB", (96, 80), (255, 0, 0))}, {"image": Image.new("L", (64, 64), 0)}]
    seen = {}

    def load_dataset(name, split, cache_dir=None):
        seen.update(name=name, split=split)
        return rows
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = hf_afhq("test")
    assert isinstance(ds, HFImageDataset) and len(ds) == 2
    assert seen == {"name": "huggan/AFHQv2", "split": "test"}
    x = ds[0]
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x[0], torch.ones(64, 64))
    torch.testing.assert_close(ds[1], -torch.ones(3, 64, 64))
