"""Toy 2-D point sets of the ``toy2d`` experiment: circle, dino, line and moons.

The four generators reproduce, value for value, the public 2-D diffusion template this
experiment builds on (SakanaAI/AI-Scientist ``templates/2d_diffusion``, itself taken from
tanelp/tiny-diffusion ``datasets.py``): the same numpy generator (``default_rng(42)``), the
same draws in the same order, the same rescaling, float32 output.

=======  ==================================================================  ====================
name     construction                                                        range (n = 100 000)
=======  ==================================================================  ====================
circle   directions from a coarse grid (each coordinate round(u/2, 1)*2 with  radius 2.91..3.09,
         u ~ U(-0.5, 0.5), i.e. in {-0.4, -0.2, 0, 0.2, 0.4}) normalised,      except ~4 % of the
         plus a jitter r ~ U(0, 0.03) at a uniform angle, scaled by 3. When   points: radius
         both grid values are 0 (probability 0.2^2 = 4 %) the direction is    <= 0.09 (see left)
         (0, 0): the template's circle has a small blob at the origin, and
         this reproduces it
dino     ``n`` draws (with replacement) of the 142 Datasaurus "dino" points,  about [-2.4, 3.3] x
         + N(0, 0.15^2) jitter, x -> (x/54 - 1)*4, y -> (y/48 - 1)*4          [-3.8, 4.3]
line     x ~ U(-0.5, 0.5), y ~ U(-1, 1), both scaled by 4                     [-2, 2] x [-4, 4]
moons    scikit-learn ``make_moons(n, noise=0.03, random_state=42)``,         about [-2.6, 3.8] x
         x -> (x + 0.3)*2 - 1, y -> (y + 0.3)*3 - 1                           [-1.9, 3.2]
=======  ==================================================================  ====================

The template's default size is ``n = 8000``; its training runs use ``n = 100_000``.

:func:`get_dataset` returns a plain ``float32`` tensor of shape ``[n, 2]`` (the template wraps the
same tensor in a ``TensorDataset``; wrap it yourself with ``TensorDataset(x)`` if you want that):
the training loop samples batches from the tensor directly on the device.

The dino set's 142 points ship with the package (``datasaurus_dino.tsv``, the ``dino`` rows of
the Datasaurus Dozen, Matejka & Fitzmaurice 2017, published under MIT by the R package
datasauRus: see ``datasaurus_dino.LICENSE.md`` beside it), so the default needs no network:
:func:`embedded_dino_points` reads them and checks :data:`DINO_SHA256`. ``source="table"`` reads
them from the full Datasaurus Dozen table instead (tiny-diffusion's ``static/DatasaurusDozen.tsv``,
the same values): :func:`datasaurus_path` finds it (an explicit path, else the cache
``$DUALDIFF_CACHE`` or ``~/.cache/dualdiff``, else a download from :data:`DATASAURUS_URL` into the
cache), and every file used is checked against :data:`DATASAURUS_SHA256`.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.resources
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DATASAURUS_URL",
    "DATASAURUS_SHA256",
    "DINO_SHA256",
    "DINO_SOURCES",
    "DatasaurusUnavailableError",
    "embedded_dino_points",
    "cache_dir",
    "datasaurus_path",
    "load_datasaurus",
    "circle_dataset",
    "dino_dataset",
    "line_dataset",
    "moons_dataset",
    "get_dataset",
]

DATASETS = ("circle", "dino", "line", "moons")

DATASAURUS_URL = (
    "https://raw.githubusercontent.com/tanelp/tiny-diffusion/master/static/DatasaurusDozen.tsv"
)
DATASAURUS_SHA256 = "c8c4792c3ed15238ba07dad6ab778adc79d72e3e1324ead4d8c1ae52849780f8"
_DATASAURUS_NAME = "DatasaurusDozen.tsv"
DINO_FILE = "datasaurus_dino.tsv"  # package data: the table's 142 dino rows, columns x, y
DINO_SHA256 = "da28cdadc746dff4a19aa5dd382c25b11f14543d65bd078a95c8d79c35036642"
DINO_SOURCES = ("embedded", "table")


class DatasaurusUnavailableError(FileNotFoundError):
    """The Datasaurus Dozen table could neither be found nor downloaded."""


# ---------------------------------------------------------------------------------------------
# the Datasaurus table
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Directory for downloaded data: ``$DUALDIFF_CACHE`` or ``~/.cache/dualdiff``."""
    env = os.environ.get("DUALDIFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dualdiff"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path) -> None:
    digest = _sha256(path)
    if digest != DATASAURUS_SHA256:
        raise ValueError(
            f"path: {path} is not the Datasaurus Dozen table expected "
            f"(sha256 {digest}, expected {DATASAURUS_SHA256})"
        )


def _download(url: str, dest: Path, timeout: float) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # write to a temporary file in the same folder, check, then rename: a reader never sees a
    # half-written or unverified file in the cache
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while True:
                block = resp.read(1 << 16)
                if not block:
                    break
                out.write(block)
        _check_sha(Path(tmp))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def datasaurus_path(
    path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str = DATASAURUS_URL,
    timeout: float = 30.0,
) -> Path:
    """Locate (and if needed download) ``DatasaurusDozen.tsv``; return a checksum-verified path.

    Order: ``path`` if given (it must exist; no fallback when it does not), else
    ``cache_dir()/DatasaurusDozen.tsv``, else (``download=True``) a download from ``url`` into
    that cache file. Raises :class:`DatasaurusUnavailableError` when no file can be had and
    ``ValueError`` when a file does not match :data:`DATASAURUS_SHA256`.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DatasaurusUnavailableError(f"path: no Datasaurus Dozen table at {p}")
        _check_sha(p)
        return p
    cached = cache_dir() / _DATASAURUS_NAME
    if cached.is_file():
        _check_sha(cached)
        return cached
    if not download:
        raise DatasaurusUnavailableError(
            f"the Datasaurus Dozen table is not in the cache ({cached}) and download=False; "
            "pass path=... to the dino loader"
        )
    try:
        _download(url, cached, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DatasaurusUnavailableError(
            f"could not download the Datasaurus Dozen table from {url} into {cached} ({exc}); "
            f"without network, pass path=... pointing at a copy of {_DATASAURUS_NAME} "
            f"(sha256 {DATASAURUS_SHA256}) or place it at {cached}"
        ) from exc
    return cached


def load_datasaurus(name: str = "dino", path: str | os.PathLike | None = None, **kw) -> np.ndarray:
    """The ``name`` subset of the Datasaurus Dozen table as a float64 array ``[m, 2]`` in file order.

    ``path`` and ``**kw`` go to :func:`datasaurus_path`.
    """
    p = datasaurus_path(path, **kw)
    rows = []
    with open(p, newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if header[:3] != ["dataset", "x", "y"]:
            raise ValueError(f"path: unexpected header {header} in {p}")
        for rec in reader:
            if rec and rec[0] == name:
                rows.append((float(rec[1]), float(rec[2])))
    if not rows:
        raise ValueError(f"name: no Datasaurus subset called {name!r} in {p}")
    return np.asarray(rows, dtype=np.float64)


def embedded_dino_points() -> np.ndarray:
    """The Datasaurus dino shipped with the package: float64 ``[142, 2]`` (x, y), file order.

    The same numbers as the ``dino`` rows of the full table (``load_datasaurus("dino")``); the
    file is checked against :data:`DINO_SHA256`.
    """
    raw = importlib.resources.files("dualdiff.data").joinpath(DINO_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DINO_SHA256:
        raise ValueError(f"the package's {DINO_FILE} is damaged (sha256 {digest}, expected "
                         f"{DINO_SHA256}); reinstall dualdiff")
    reader = csv.reader(raw.decode("ascii").splitlines(), delimiter="\t")
    if next(reader) != ["x", "y"]:  # pragma: no cover - guarded by the checksum
        raise ValueError(f"{DINO_FILE}: unexpected header")
    return np.asarray([(float(x), float(y)) for x, y in reader], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# generators (the template's, draw for draw)
# ---------------------------------------------------------------------------------------------
def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    return int(n)


def _to_tensor(x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack((x, y), axis=1).astype(np.float32))


def moons_dataset(n: int = 8000, seed: int = 42) -> torch.Tensor:
    """Two interleaved half circles (scikit-learn ``make_moons``, noise 0.03), rescaled."""
    n = _check_n(n)
    try:
        from sklearn.datasets import make_moons
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the moons dataset needs scikit-learn (pip install scikit-learn)") from exc
    pts, _ = make_moons(n_samples=n, random_state=seed, noise=0.03)
    return _to_tensor((pts[:, 0] + 0.3) * 2 - 1, (pts[:, 1] + 0.3) * 3 - 1)


def line_dataset(n: int = 8000, seed: int = 42) -> torch.Tensor:
    """A uniformly filled 1 x 2 rectangle scaled by 4 (thin vertical band)."""
    n = _check_n(n)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, n)
    y = rng.uniform(-1, 1, n)
    return _to_tensor(x * 4, y * 4)


def circle_dataset(n: int = 8000, seed: int = 42) -> torch.Tensor:
    """Points near the circle of radius 3, at directions from a coarse grid."""
    n = _check_n(n)
    rng = np.random.default_rng(seed)
    # directions: both coordinates on the grid {-0.4, -0.2, 0, 0.2, 0.4}, normalised; (0, 0)
    # stays (0, 0) thanks to the 1e-10 (as in the template)
    x = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    y = np.round(rng.uniform(-0.5, 0.5, n) / 2, 1) * 2
    norm = np.sqrt(x**2 + y**2) + 1e-10
    x = x / norm
    y = y / norm
    theta = 2 * np.pi * rng.uniform(0, 1, n)
    r = rng.uniform(0, 0.03, n)
    x = x + r * np.cos(theta)
    y = y + r * np.sin(theta)
    return _to_tensor(x * 3, y * 3)


def dino_dataset(
    n: int = 8000, seed: int = 42, source: str = "embedded",
    path: str | os.PathLike | None = None, **kw
) -> torch.Tensor:
    """The Datasaurus dino resampled ``n`` times with N(0, 0.15^2) jitter, rescaled to about [-4, 4].

    ``source``: ``"embedded"`` (the 142 points shipped with the package, no file options) or
    ``"table"`` (the full Datasaurus Dozen table; ``path`` / ``**kw`` as in
    :func:`datasaurus_path`). Both give the same points.
    """
    n = _check_n(n)
    if source == "embedded":
        extra = (["path"] if path is not None else []) + sorted(kw)
        if extra:
            raise ValueError(f"{extra[0]}: the embedded dino points take no file options; "
                             "pass source='table' to read the Datasaurus Dozen table")
        pts = embedded_dino_points()
    elif source == "table":
        pts = load_datasaurus("dino", path, **kw)
    else:
        raise ValueError(f"source: must be one of {', '.join(DINO_SOURCES)}, got {source!r}")
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, len(pts), n)
    # same draw order as the template: indices, x jitter, y jitter
    x = pts[ix, 0] + rng.normal(size=n) * 0.15
    y = pts[ix, 1] + rng.normal(size=n) * 0.15
    return _to_tensor((x / 54 - 1) * 4, (y / 48 - 1) * 4)


_GENERATORS = {
    "circle": circle_dataset,
    "dino": dino_dataset,
    "line": line_dataset,
    "moons": moons_dataset,
}


def get_dataset(name: str, n: int = 8000, *, seed: int = 42, **dino_kw) -> torch.Tensor:
    """Generate toy set ``name`` (one of :data:`DATASETS`) as a float32 CPU tensor ``[n, 2]``.

    ``n`` defaults to the template's 8000 (its training runs use 100 000). ``seed`` is the
    template's fixed 42 by default (for moons it is scikit-learn's ``random_state``).
    ``**dino_kw`` (``source``, ``path``, ``download``, ``url``, ``timeout``) only apply to
    ``dino``: see :func:`dino_dataset`. The same arguments always give the same points.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if name not in _GENERATORS:
        raise ValueError(f"name: unknown toy dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "dino":
        return dino_dataset(n, seed=seed, **dino_kw)
    if dino_kw:
        raise ValueError(f"{sorted(dino_kw)[0]}: only the dino dataset takes these options, "
                         f"not {name!r}")
    return _GENERATORS[name](n, seed=seed)
