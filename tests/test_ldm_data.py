"""ldm data: class distributions, the stain rule, tiles, folders, the latent cache, balanced sampling."""
import numpy as np
import pytest
import torch
from PIL import Image

from dualdiff.data.histology import (DataError, EmbeddedHistology, HistologyFolder, StainRule, balanced_cutoffs,
                                     balanced_indices, class_distribution, rgb_to_hed, split_indices)
from dualdiff.data.latent_cache import CacheError, LatentCache, latent_scale


def test_class_distribution_of_hand_made_masks():
    m = torch.zeros(2, 4, 4, dtype=torch.long)
    m[0, :2] = 4          # half strong DAB, half background
    m[1, 0, 0] = 2        # one nucleus pixel out of 16
    m[1, 3] = 1           # a row of other tissue
    d = class_distribution(m, 5)
    torch.testing.assert_close(d, torch.tensor([[0.5, 0, 0, 0, 0.5], [11 / 16, 4 / 16, 1 / 16, 0, 0]]))
    with pytest.raises(DataError, match=r"values must be in \[0, 4\]"):
        class_distribution(torch.full((3, 3), 5), 5)
    with pytest.raises(DataError, match="integers"):
        class_distribution(torch.zeros(3, 3), 5)


def test_rgb_to_hed_matches_scikit_image_and_rule_classes(require):
    skcolor = require("skimage.color")
    x = torch.rand(2, 3, 6, 7)
    ref = np.stack([skcolor.rgb2hed(i.permute(1, 2, 0).double().numpy()) for i in x])
    np.testing.assert_allclose(rgb_to_hed(x).permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    white, blue, brown = [0.95, 0.95, 0.95], [0.3, 0.3, 0.6], [0.45, 0.25, 0.1]
    img = torch.tensor([white, blue, brown]).T.reshape(1, 3, 1, 3)
    assert StainRule()(img).tolist() == [[[0, 2, 4]]]


def test_embedded_tiles_are_deterministic_and_split_by_region():
    a = EmbeddedHistology("train", 6, 32, seed=3)
    b = EmbeddedHistology("train", 6, 32, seed=3)
    torch.testing.assert_close(a.images, b.images)
    item = a[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32) and item["has_mask"]
    torch.testing.assert_close(item["dist"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(class_distribution(a.masks, 5), a.dists)
    with pytest.raises(DataError, match="does not fit the test region"):
        EmbeddedHistology("test", 2, 200)


def _folder(tmp_path, n=4, size=16, unlabelled=1):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "unlabelled"):
        (tmp_path / sub).mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / "images" / f"t{i}.png")
        Image.fromarray(rng.integers(0, 5, (size, size), dtype=np.uint8)).save(tmp_path / "masks" / f"t{i}.png")
    for i in range(unlabelled):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / "unlabelled" / f"u{i}.png")
    return tmp_path


def test_folder_items_split_and_errors(tmp_path):
    root = _folder(tmp_path)
    ds = HistologyFolder(root, size=8)
    assert len(ds) == 5 and ds.pixel_counts.sum() == 4 * 16 * 16
    item, unl = ds[0], ds[4]
    assert item["image"].shape == (3, 8, 8) and item["has_mask"] and item["mask"].max() < 5
    assert not unl["has_mask"] and unl["dist"].sum() == 0
    train, val = split_indices(20, 0.1, seed=0)
    assert len(train) == 18 and len(val) == 2 and not set(train) & set(val)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "t1.png")
    with pytest.raises(DataError, match="t1.png.*values 7..7"):
        HistologyFolder(root)
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(root / "masks" / "t1.png")
    with pytest.raises(DataError, match=r"masks/t1\.png.* is 16x8 but its image .*images/t1\.png.* is 16x16"):
        HistologyFolder(root)
    (root / "masks" / "t1.png").unlink()
    with pytest.raises(DataError, match=r"missing mask file for image .*images/t1\.png"):
        HistologyFolder(root)


def _corrupt_png(path):
    """Keep the header, cut the file in the middle of its image data."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_folder_corrupt_image_named_at_construction(tmp_path):
    root = _folder(tmp_path)
    _corrupt_png(root / "images" / "t2.png")
    with pytest.raises(DataError, match=r"bad image '.*images/t2\.png'.*data\.skip_bad=true skips it"):
        HistologyFolder(root)


def test_folder_wrong_shape_mask_named_at_construction(tmp_path):
    root = _folder(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "masks" / "t3.png")  # RGB mask
    with pytest.raises(DataError, match=r"bad mask '.*masks/t3\.png'.*single-channel.*\(16, 16, 3\)"):
        HistologyFolder(root)


def test_folder_skip_bad_drops_bad_pairs_with_a_warning(tmp_path):
    from dualdiff.data.checks import BadDataWarning

    root = _folder(tmp_path)
    _corrupt_png(root / "images" / "t2.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "masks" / "t3.png")
    with pytest.warns(BadDataWarning) as rec:
        ds = HistologyFolder(root, size=8, skip_bad=True)
    named = " ".join(str(w.message) for w in rec)
    assert "t2.png" in named and "t3.png" in named
    assert [p.name for p, _ in ds.entries] == ["t0.png", "t1.png", "u0.png"]
    assert ds.pixel_counts.sum() == 2 * 16 * 16
    assert ds[1]["has_mask"] and not ds[2]["has_mask"]


def test_folder_file_broken_after_construction(tmp_path):
    """A file that breaks mid-run: DataError naming it, or skipped (next tile) under skip_bad."""
    from dualdiff.data.checks import BadDataWarning

    root = _folder(tmp_path, unlabelled=0)
    strict, lenient = HistologyFolder(root, size=8), HistologyFolder(root, size=8, skip_bad=True)
    (root / "images" / "t1.png").write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=r"images/t1\.png"):
        strict[1]
    with pytest.warns(BadDataWarning, match=r"images/t1\.png"):
        item = lenient[1]
    torch.testing.assert_close(item["image"], lenient[2]["image"])  # served the next good tile
    assert lenient._guard.bad == {1}


def test_folder_verify_decodes_every_image(tmp_path):
    """A truncated JPEG passes the header check but not the full decode of verify=True."""
    root = _folder(tmp_path, unlabelled=0)
    rng = np.random.default_rng(1)
    jpg = root / "images" / "t0.jpg"
    (root / "images" / "t0.png").unlink()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:-200])
    assert len(HistologyFolder(root)) == 4  # header-level check only
    with pytest.raises(DataError, match=r"bad image '.*images/t0\.jpg'.*truncated"):
        HistologyFolder(root, verify=True)


def test_balanced_cutoffs_and_sampling():
    assert balanced_cutoffs(0.5) == [0.5, 0.625, 0.75, 0.875, 1.0]  # the seed's training cutoffs
    assert balanced_cutoffs(0.0) == [0.0, 0.25, 0.5, 0.75, 1.0]  # the seed's test cutoffs: p = 0
    assert balanced_cutoffs(1.0) == [1.0] * 5  # p = 1: uniform, no balancing (not the seed's test)
    d = torch.zeros(100, 5)
    d[:, 1] = 1.0
    d[0] = torch.tensor([0, 0, 0, 0, 1.0])  # one tile holds the rare class 4
    # share of tile 0 = P(class 4 drawn) + P(uniform draw or a class nobody holds) / 100
    for p, want in ((0.5, 0.125 + (0.5 + 0.25) / 100), (0.0, 0.25 + 0.5 / 100), (1.0, 1 / 100)):
        idx = balanced_indices(d, 8000, p, torch.Generator().manual_seed(0))
        share = (idx == 0).float().mean().item()
        assert abs(share - want) < 0.015, (p, share, want)


def test_latent_cache_round_trip(tmp_path):
    z = torch.randn(6, 4, 2, 2) * 3
    c = LatentCache(z, torch.rand(6, 5), torch.tensor([True] * 5 + [False]), latent_scale(z, 1.0, "auto"),
                    {"split": "train"})
    assert abs(c.scale - 1 / z.std().item()) < 1e-6  # an unfitted AE factor (1.0): 1/std
    assert latent_scale(z, 0.18215, "auto") == 0.18215
    back = LatentCache.load(c.save(tmp_path / "c.pt"))
    for k in ("latents", "dist", "has_mask"):
        assert torch.equal(getattr(back, k), getattr(c, k))
    assert back.scale == c.scale and back.meta == {"split": "train"}
    torch.testing.assert_close(back.scaled, z * c.scale)
    with pytest.raises(CacheError, match="run `dualdiff ldm encode` first"):
        LatentCache.load(tmp_path / "none.pt")
