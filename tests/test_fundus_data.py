"""The vae experiment's data: the embedded synthetic fundus set, the DomainBed folder loader and
the leave-one-domain-out / subset splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dualdiff.data.fundus import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, DomainFolder, SyntheticFundus,
                                  domain_split)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def fundus():
    return SyntheticFundus(4, 32, seed=3)


def test_items_shapes_and_target_is_the_unnormalised_input(fundus):
    assert len(fundus) == 16 and fundus.environments == ["warm", "dark", "bright", "blurry"]
    for i in (0, 7, 15):
        x, t, y, e = fundus[i]
        assert x.shape == t.shape == (3, 32, 32) and x.dtype == t.dtype == torch.float32
        assert 0.0 <= t.min() and t.max() <= 1.0
        assert torch.allclose(x * STD + MEAN, t, atol=1e-6)  # x is exactly ImageNet-normalised t
        assert x.min() < -0.5  # and it is not in [0, 1] itself
        assert int(y) == fundus.labels[i] and int(e) == fundus.env_labels[i] == i // 4


def test_deterministic_per_seed_and_index(fundus):
    again = SyntheticFundus(4, 32, seed=3, cache=False)
    other = SyntheticFundus(4, 32, seed=4, cache=False)
    assert torch.equal(fundus[5][1], again[5][1])
    assert np.array_equal(fundus.labels, again.labels)
    assert not torch.equal(fundus[5][1], other[5][1])
    assert not torch.equal(fundus[5][1], fundus[6][1])


def test_environments_differ_in_acquisition():
    ds = SyntheticFundus(6, 32, environments=["dark", "bright"], seed=0)
    inside = [ds[i][1] for i in range(len(ds))]
    bright = lambda ims: float(torch.stack([im[im.sum(0, keepdim=True).expand(3, -1, -1) > 0.1].mean() for im in ims]).mean())
    assert bright(inside[:6]) < bright(inside[6:]) - 0.05  # 'dark' (gamma 1.45) is darker than 'bright'


def test_grades_follow_the_environment_prior():
    ds = SyntheticFundus(400, 16, environments=["dark", "blurry"], seed=0)
    frac0 = [(ds.labels[ds.env_labels == e] == 0).mean() for e in (0, 1)]
    assert frac0[0] > 0.6 and frac0[1] < 0.4  # priors 0.72 vs 0.30 of grade 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="environments"):
        SyntheticFundus(4, 32, environments=["nope"])
    with pytest.raises(ValueError, match="num_per_env"):
        SyntheticFundus(0, 32)


def _tree(root, envs=("a", "b"), classes=("0", "1"), n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for e in envs:
        for c in classes:
            d = root / e / c
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{k}.png")


def test_domain_folder(tmp_path):
    _tree(tmp_path)
    ds = DomainFolder(tmp_path, 16)
    assert ds.environments == ["a", "b"] and ds.classes == ["0", "1"] and len(ds) == 12
    x, t, y, e = ds[7]
    assert x.shape == t.shape == (3, 16, 16)
    assert torch.allclose(x * STD + MEAN, t, atol=1e-6)
    assert (int(y), int(e)) == (int(ds.labels[7]), int(ds.env_labels[7])) == (0, 1)


def test_domain_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        DomainFolder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no environment folders"):
        DomainFolder(tmp_path)
    (tmp_path / "env" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images"):
        DomainFolder(tmp_path)


def test_domain_folder_corrupt_jpeg_named_at_construction(tmp_path):
    """A .jpg whose header is garbage fails the build-time check; a truncated one passes the
    header check and fails verify=True's full decode. Both name the file."""
    from PIL import Image

    _tree(tmp_path)
    good = tmp_path / "a" / "1" / "ok.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "b" / "0" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4)  # a JPEG start marker, then garbage
    with pytest.raises(DatasetError, match=r"bad image '.*b/0/broken\.jpg'"):
        DomainFolder(tmp_path, 16)
    bad.unlink()
    good.write_bytes(good.read_bytes()[:-300])
    assert len(DomainFolder(tmp_path, 16)) == 13
    with pytest.raises(DatasetError, match=r"bad image '.*a/1/ok\.jpg'.*truncated"):
        DomainFolder(tmp_path, 16, verify=True)


def test_domain_folder_skip_bad_keeps_labels_aligned(tmp_path):
    from dualdiff.data.checks import BadDataWarning

    _tree(tmp_path)
    (tmp_path / "a" / "1" / "0.png").write_bytes(b"garbage")
    (tmp_path / "b" / "0" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetError, match=r"a/1/0\.png.*and 1 more bad images; data\.skip_bad=true"):
        DomainFolder(tmp_path, 16)
    with pytest.warns(BadDataWarning) as rec:
        ds = DomainFolder(tmp_path, 16, skip_bad=True)
    assert len(rec) == 2 and len(ds) == 10
    names = [str(f.relative_to(tmp_path)) for f in ds.files]
    assert "a/1/0.png" not in names and "b/0/2.png" not in names
    for f, y, e in zip(ds.files, ds.labels, ds.env_labels):
        assert (f.parent.name, f.parent.parent.name) == (ds.classes[y], ds.environments[e])
    for k in range(2):  # an environment left without any readable image is an error
        (tmp_path / "b" / "1" / f"{k}.png").write_bytes(b"garbage")
    for k in range(2):
        (tmp_path / "b" / "0" / f"{k}.png").write_bytes(b"garbage")
    (tmp_path / "b" / "1" / "2.png").write_bytes(b"garbage")
    with pytest.warns(BadDataWarning), pytest.raises(DatasetError, match="'.*/b' has no readable images"):
        DomainFolder(tmp_path, 16, skip_bad=True)


def test_domain_split_holdout_and_test_env():
    env = np.repeat(np.arange(3), 10)
    s = domain_split(env, [1], holdout_fraction=0.2, seed=0)
    assert sorted(s.test) == list(range(10, 20))
    for e in (0, 2):
        assert sum(env[i] == e for i in s.val) == 2 and sum(env[i] == e for i in s.train) == 8
    assert not set(s.train) & set(s.val)
    assert domain_split(env, [1], seed=0) == s
    assert domain_split(env, [1], seed=1).val != s.val


def test_subset_takes_exactly_n_per_environment_seeded():
    env = np.repeat(np.arange(4), 25)
    s = domain_split(env, [3], holdout_fraction=0.2, seed=0, subset_size=7)
    counts = np.bincount(env[s.train], minlength=4)
    assert counts.tolist() == [7, 7, 7, 0]
    full = domain_split(env, [3], holdout_fraction=0.2, seed=0)
    assert set(s.train) <= set(full.train) and s.val == full.val and s.test == full.test
    assert domain_split(env, [3], seed=0, subset_size=7) == s
    assert domain_split(env, [3], seed=5, subset_size=7).train != s.train
    with pytest.raises(DatasetError, match="subset_size=21 is larger than environment '0'"):
        domain_split(env, [3], seed=0, subset_size=21, environments=["0", "1", "2", "3"])
