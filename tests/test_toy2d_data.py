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
    DINO_SHA256,
    DatasaurusUnavailableError,
    datasaurus_path,
    embedded_dino_points,
    get_dataset,
    load_datasaurus,
)


@pytest.fixture
def table(tmp_path, monkeypatch) -> Path:
    """A small Datasaurus-Dozen-format table (another set's rows around the embedded dino rows,
    as in the real file) accepted as the real one: DATASAURUS_SHA256 is patched to its
    checksum. The real table (64 kB) is not in the repository; tests read nothing outside it."""
    dino = embedded_dino_points()
    rows = ["dataset\tx\ty", "away\t32.3311\t61.411"]
    rows += [f"dino\t{x!r}\t{y!r}" for x, y in dino.tolist()] + ["star\t58.2136\t91.8819"]
    path = tmp_path / "table" / "DatasaurusDozen.tsv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(toy2d, "DATASAURUS_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # every test gets an empty cache and no network, so nothing reads ~/.cache or the internet
    monkeypatch.setenv("DUALDIFF_CACHE", str(tmp_path / "cache"))

    def _no_network(*a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", _no_network)


@pytest.mark.parametrize("name", ["circle", "dino", "line", "moons"])
def test_shape_dtype_determinism(name):
    x = get_dataset(name, 3001)
    assert isinstance(x, torch.Tensor) and x.shape == (3001, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, get_dataset(name, 3001))  # fixed seed 42, as the template
    assert not torch.equal(x, get_dataset(name, 3001, seed=7))
    assert get_dataset(name, 1).shape == (1, 2)


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


def test_embedded_dino_points_are_the_shipped_file():
    """The 142 dino rows ship with the package, with their checksum and licence note."""
    import importlib.resources

    files = importlib.resources.files("dualdiff.data")
    raw = files.joinpath("datasaurus_dino.tsv").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == DINO_SHA256
    note = files.joinpath("datasaurus_dino.LICENSE.md").read_text()
    assert "MIT" in note and "datasauRus" in note and DINO_SHA256 in note
    assert toy2d.DATASAURUS_SHA256 in note  # the table the rows were taken from
    pts = embedded_dino_points()
    assert pts.shape == (142, 2) and pts.dtype == np.float64
    assert pts[0].tolist() == [55.3846, 97.1795]  # first row of the table, file order kept
    assert pts[-1].tolist() == [44.1026, 92.6923]
    # the Datasaurus Dozen's published summary statistics (every set of the dozen shares them)
    assert pts.mean(0) == pytest.approx([54.26, 47.83], abs=0.01)
    assert pts.std(0, ddof=1) == pytest.approx([16.76, 26.93], abs=0.01)
    assert np.corrcoef(pts.T)[0, 1] == pytest.approx(-0.06, abs=0.01)


def test_dino_construction_and_range():
    n = 20000
    x = get_dataset("dino", n).numpy()
    pts = embedded_dino_points()
    rng = np.random.default_rng(42)  # the template's draws: indices, x noise, y noise
    ix = rng.integers(0, 142, n)
    xs = pts[ix, 0] + rng.normal(size=n) * 0.15
    ys = pts[ix, 1] + rng.normal(size=n) * 0.15
    ref = np.stack(((xs / 54 - 1) * 4, (ys / 48 - 1) * 4), 1).astype(np.float32)
    np.testing.assert_array_equal(x, ref)
    assert -2.6 < x[:, 0].min() and x[:, 0].max() < 3.5
    assert -4.0 < x[:, 1].min() and x[:, 1].max() < 4.5


def test_table_source_reads_the_same_points(table):
    np.testing.assert_array_equal(load_datasaurus("dino", table), embedded_dino_points())
    assert torch.equal(get_dataset("dino", 500, source="table", path=table),
                       get_dataset("dino", 500))
    with pytest.raises(ValueError, match="no Datasaurus subset called 'trex'"):
        load_datasaurus("trex", table)


def test_datasaurus_cache_and_checksum(tmp_path, table):
    cache = tmp_path / "cache"
    # no path, empty cache, no network: a clear error naming what to do
    with pytest.raises(DatasaurusUnavailableError, match="pass path="):
        datasaurus_path()
    with pytest.raises(DatasaurusUnavailableError, match="download=False"):
        get_dataset("dino", 10, source="table", download=False)
    # a missing explicit path is an error too (no silent fallback)
    with pytest.raises(DatasaurusUnavailableError, match="path"):
        datasaurus_path(tmp_path / "missing.tsv")
    # a file with the wrong content is refused
    bad = tmp_path / "bad.tsv"
    bad.write_text("dataset\tx\ty\ndino\t1\t2\n")
    with pytest.raises(ValueError, match="sha256"):
        get_dataset("dino", 10, source="table", path=bad)
    # a cached copy is found and checked
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "DatasaurusDozen.tsv").write_bytes(table.read_bytes())
    assert datasaurus_path() == cache / "DatasaurusDozen.tsv"
    assert torch.equal(get_dataset("dino", 50, source="table"), get_dataset("dino", 50))


def test_datasaurus_download_is_verified(tmp_path, monkeypatch, table):
    """The download path: fetched bytes land in the cache only when the checksum matches."""
    payload = {"data": table.read_bytes()}

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
    payload["data"] = table.read_bytes()
    assert datasaurus_path() == cached
    assert seen[-1] == toy2d.DATASAURUS_URL
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == toy2d.DATASAURUS_SHA256


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
    with pytest.raises(ValueError, match="source='table'"):
        get_dataset("dino", 10, path="x.tsv")  # the embedded points take no file
    with pytest.raises(ValueError, match="source"):
        get_dataset("dino", 10, source="web")
