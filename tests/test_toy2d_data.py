"""Toy 2-D data sets: the template's shapes, ranges and construction; the Datasaurus loader."""
from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dualdiff.data import toy2d
from dualdiff.data.toy2d import (
    DATASAURUS_SHA256,
    DatasaurusUnavailableError,
    datasaurus_path,
    get_dataset,
    load_datasaurus,
)

# the shared test copy of the table: ../shared/data from the project root (never copied in)
SHARED_TSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "DatasaurusDozen.tsv"
needs_tsv = pytest.mark.skipif(not SHARED_TSV.is_file(), reason=f"no test copy at {SHARED_TSV}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # every test gets an empty cache and no network, so nothing reads ~/.cache or the internet
    monkeypatch.setenv("DUALDIFF_CACHE", str(tmp_path / "cache"))

    def _no_network(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)


def _get(name, n, **kw):
    if name == "dino":
        kw.setdefault("path", SHARED_TSV)
    return get_dataset(name, n, **kw)


@pytest.mark.parametrize("name", ["circle", pytest.param("dino", marks=needs_tsv), "line", "moons"])
def test_shape_dtype_determinism(name):
    x = _get(name, 3001)
    assert isinstance(x, torch.Tensor) and x.shape == (3001, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, _get(name, 3001))  # fixed seed 42, as the template
    assert not torch.equal(x, _get(name, 3001, seed=7))
    assert _get(name, 1).shape == (1, 2)


def test_default_n_is_templates():
    assert get_dataset("line").shape == (8000, 2)


def test_line_construction_and_range():
    n = 20000
    x = get_dataset("line", n).numpy()
    rng = np.random.default_rng(42)  # the template's draws: x then y
    ref = np.stack((rng.uniform(-0.5, 0.5, n) * 4, rng.uniform(-1, 1, n) * 4), 1).astype(np.float32)
    np.testing.assert_array_equal(x, ref)
    assert x[:, 0].min() >= -2 and x[:, 0].max() <= 2 and x[:, 1].min() >= -4 and x[:, 1].max() <= 4
    # uniform: it fills the rectangle
    assert x[:, 0].max() - x[:, 0].min() > 3.99 and x[:, 1].max() - x[:, 1].min() > 7.99


def test_circle_construction_and_range():
    n = 50000
    x = get_dataset("circle", n).numpy().astype(np.float64)
    r = np.hypot(x[:, 0], x[:, 1])
    ring = r > 1.0
    # points on the ring: radius 3 +- 3 * 0.03
    assert r[ring].min() >= 3 * (1 - 0.03) - 1e-5 and r[ring].max() <= 3 * (1 + 0.03) + 1e-5
    # the template's (0, 0)-direction blob: probability 0.2 * 0.2
    frac = (~ring).mean()
    assert abs(frac - 0.04) < 0.005
    assert r[~ring].max() <= 0.09 + 1e-5
    # the directions come from the 5 x 5 grid {-0.4, ..., 0.4}^2 minus the centre: 16 angles
    ang = np.round(np.degrees(np.arctan2(x[ring, 1], x[ring, 0])) / 1.0)
    centres = {
        round(np.degrees(np.arctan2(b, a)))
        for a in (-2, -1, 0, 1, 2) for b in (-2, -1, 0, 1, 2) if (a, b) != (0, 0)
    }
    assert len(centres) == 16
    # every ring point lies within the jitter's angle (0.03 / 1 rad ~ 1.7 deg) of a grid angle
    dist = np.min(np.abs(((ang[:, None] - np.array(sorted(centres))[None]) + 180) % 360 - 180), 1)
    assert dist.max() <= 3


def test_moons_matches_sklearn():
    from sklearn.datasets import make_moons

    n = 4000
    x = get_dataset("moons", n).numpy()
    pts, _ = make_moons(n_samples=n, random_state=42, noise=0.03)
    ref = np.stack(((pts[:, 0] + 0.3) * 2 - 1, (pts[:, 1] + 0.3) * 3 - 1), 1).astype(np.float32)
    np.testing.assert_array_equal(x, ref)
    assert -2.8 < x[:, 0].min() < -2.2 and 3.4 < x[:, 0].max() < 4.0
    assert -2.1 < x[:, 1].min() < -1.4 and 2.7 < x[:, 1].max() < 3.4


@needs_tsv
def test_dino_construction_and_range():
    n = 20000
    x = get_dataset("dino", n, path=SHARED_TSV).numpy()
    pts = load_datasaurus("dino", SHARED_TSV)
    assert pts.shape == (142, 2)
    assert pts[0].tolist() == [55.3846, 97.1795]  # first row of the table, file order kept
    rng = np.random.default_rng(42)  # the template's draws: indices, x noise, y noise
    ix = rng.integers(0, 142, n)
    xs = pts[ix, 0] + rng.normal(size=n) * 0.15
    ys = pts[ix, 1] + rng.normal(size=n) * 0.15
    ref = np.stack(((xs / 54 - 1) * 4, (ys / 48 - 1) * 4), 1).astype(np.float32)
    np.testing.assert_array_equal(x, ref)
    assert -2.6 < x[:, 0].min() and x[:, 0].max() < 3.5
    assert -4.0 < x[:, 1].min() and x[:, 1].max() < 4.5


@needs_tsv
def test_datasaurus_cache_and_checksum(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # no path, empty cache, no network: a clear error naming what to do
    with pytest.raises(DatasaurusUnavailableError, match="pass path="):
        datasaurus_path()
    with pytest.raises(DatasaurusUnavailableError, match="download=False"):
        get_dataset("dino", 10, download=False)
    # a missing explicit path is an error too (no silent fallback)
    with pytest.raises(DatasaurusUnavailableError, match="path"):
        datasaurus_path(tmp_path / "missing.tsv")
    # a file with the wrong content is refused
    bad = tmp_path / "bad.tsv"
    bad.write_text("dataset\tx\ty\ndino\t1\t2\n")
    with pytest.raises(ValueError, match="sha256"):
        get_dataset("dino", 10, path=bad)
    # a cached copy is found and checked
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "DatasaurusDozen.tsv").write_bytes(SHARED_TSV.read_bytes())
    assert datasaurus_path() == cache / "DatasaurusDozen.tsv"
    assert torch.equal(get_dataset("dino", 50), get_dataset("dino", 50, path=SHARED_TSV))


@needs_tsv
def test_datasaurus_download_is_verified(tmp_path, monkeypatch):
    """The download path: fetched bytes land in the cache only when the checksum matches."""
    payload = {"data": SHARED_TSV.read_bytes()}

    class _Resp:
        def __init__(self, data):
            self._data, self._pos = data, 0

        def read(self, size=-1):
            chunk = self._data[self._pos:self._pos + size]
            self._pos += len(chunk)
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    seen = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return _Resp(payload["data"])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    cached = tmp_path / "cache" / "DatasaurusDozen.tsv"
    payload["data"] = b"corrupted"
    with pytest.raises(ValueError, match="sha256"):
        datasaurus_path()
    assert not cached.exists() and not list(cached.parent.glob("*.part"))
    payload["data"] = SHARED_TSV.read_bytes()
    assert datasaurus_path() == cached
    assert seen[-1] == toy2d.DATASAURUS_URL
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == DATASAURUS_SHA256


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        get_dataset("spiral")
    with pytest.raises(TypeError, match="name"):
        get_dataset(3)
    with pytest.raises(ValueError, match="n"):
        get_dataset("line", 0)
    with pytest.raises(TypeError, match="n"):
        get_dataset("line", 10.0)
    with pytest.raises(ValueError, match="path"):
        get_dataset("line", 10, path="x.tsv")
