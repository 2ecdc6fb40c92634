"""FID between image folders: pytorch-fid's InceptionV3 features + dualdiff's Fréchet distance.

    FID = ||μ_a - μ_b||² + tr Σ_a + tr Σ_b - 2 tr (Σ_a Σ_b)^½

with (μ, Σ) the mean and covariance (``np.cov``, N-1 normalisation, as pytorch-fid) of the
2048-d pool features of ``pytorch_fid.inception.InceptionV3`` (the TF-FID Inception), images
read as RGB in [0, 1] (pytorch-fid resizes to 299 and rescales inside the network). The
distance itself is :func:`dualdiff.ops.frechet_distance`.

Inception weights (``pt_inception-2015-12-05-6726825d.pth``), in this order:

1. ``inception_weights=`` a local file (CLI ``--inception-weights``);
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where pytorch-fid's own download puts it;
3. pytorch-fid's download (skipped when ``allow_download=False`` or ``DUALDIFF_NO_DOWNLOAD=1``).

If none works :class:`InceptionWeightsError` says how to provide the file.

Any feature extractor can replace Inception (tests use a tiny one): a callable mapping float
images ``[B, 3, H, W]`` in [0, 1] to ``[B, D]`` (or ``[B, D, 1, 1]``); its ``cache_id``
attribute (default: the class name) keys the statistics cache.

Statistics of a folder are cached as ``.npz`` (mu, sigma, n) under ``cache_dir`` (default
``~/.cache/dualdiff/fid_stats``), keyed by a SHA-1 of the folder's image file names and bytes
plus the extractor id and dims: changing, adding or removing an image gives a new key.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dualdiff.errors import UserError
from dualdiff.ops.frechet import frechet_distance

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "IMAGE_EXTENSIONS",
    "InceptionWeightsError",
    "activation_statistics",
    "check_images",
    "fid_from_folders",
    "fid_from_stats",
    "folder_key",
    "folder_statistics",
    "list_images",
    "load_inception",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}


class InceptionWeightsError(UserError, RuntimeError):
    """The FID Inception weights are neither given, cached nor downloadable (a user error: the
    CLI prints it as one line)."""


def _hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _how_to() -> str:
    return (f"FID needs pytorch-fid's Inception weights ({FID_WEIGHTS_FILE}). Provide them in one of "
            f"these ways: (1) pass --inception-weights /path/to/{FID_WEIGHTS_FILE} "
            f"(inception_weights= in Python); (2) put the file at {_hub_weights_path()} "
            f"(the torch hub cache; set TORCH_HOME to move it); (3) run once with network access "
            f"so pytorch-fid downloads it from {FID_WEIGHTS_URL}")


class _InceptionFeatures(torch.nn.Module):
    """pytorch-fid's InceptionV3 returning ``[B, dims]``."""

    def __init__(self, net, dims: int):
        super().__init__()
        self.net, self.dims = net, dims
        self.cache_id = f"pytorch-fid-inception-v3-{dims}"

    def forward(self, x):
        f = self.net(x)[0]
        if f.shape[-1] != 1 or f.shape[-2] != 1:  # blocks below the final pool: spatial mean (pytorch-fid)
            f = torch.nn.functional.adaptive_avg_pool2d(f, (1, 1))
        return f.reshape(x.shape[0], -1)


def load_inception(dims: int = 2048, inception_weights: str | os.PathLike | None = None, device=None,
                   allow_download: bool | None = None) -> torch.nn.Module:
    """pytorch-fid's FID InceptionV3 (eval mode) as a ``[B,3,H,W] in [0,1] -> [B, dims]`` module.

    Raises :class:`InceptionWeightsError` (with instructions) when the weights are unavailable.
    """
    from pytorch_fid import inception as pfi

    if dims not in pfi.InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims must be one of {sorted(pfi.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
    if allow_download is None:
        allow_download = os.environ.get("DUALDIFF_NO_DOWNLOAD", "0") not in ("1", "true", "yes")
    local = None
    if inception_weights is not None:
        local = Path(inception_weights)
        if not local.is_file():
            raise InceptionWeightsError(f"inception_weights file {local} does not exist. " + _how_to())
    elif _hub_weights_path().is_file():
        local = _hub_weights_path()
    elif not allow_download:
        raise InceptionWeightsError("downloads are disabled and no local copy was found. " + _how_to())

    if local is not None:
        def loader(url, *args, **kwargs):
            return torch.load(local, map_location="cpu", weights_only=True)
        ctx = _patched(pfi, "load_state_dict_from_url", loader)
    else:
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except InceptionWeightsError:
        raise
    except Exception as e:  # network failure (URLError, OSError, HTTPError, ...) or a bad file
        where = f"loading {local}" if local is not None else "downloading"
        raise InceptionWeightsError(f"{where} failed ({type(e).__name__}: {e}). " + _how_to()) from e
    model = _InceptionFeatures(net, dims).eval()
    return model.to(device) if device is not None else model


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (pytorch-fid's extensions), sorted by name."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {d} does not exist")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {d}")
    return files


def check_images(files: Sequence[Path], *, verify: bool = False, skip_bad: bool = False) -> list[Path]:
    """The files that pass :func:`dualdiff.data.checks.check_image` (header + ``Image.verify()``;
    a full decode with ``verify``): a bad one raises :class:`~dualdiff.errors.DataError` naming it,
    or with ``skip_bad`` is dropped with a warning."""
    from dualdiff.data.checks import check_all, check_image

    return [f for f, _ in check_all(list(files), lambda f: check_image(f, verify=verify), skip_bad=skip_bad,
                                    what="images", hint="skip_bad=True")]


def _load_batch(files: Sequence[Path], skip_bad: bool = False) -> torch.Tensor | None:
    """RGB uint8 -> float [B, 3, H, W] in [0, 1]; a file that fails to decode raises DataError naming
    it, or under ``skip_bad`` is left out with a warning (None when none is left)."""
    import warnings

    from dualdiff.data.checks import BadDataWarning, read_image
    from dualdiff.errors import DataError

    arrs = []
    for f in files:
        try:
            arrs.append(np.asarray(read_image(f, mode="RGB"), dtype=np.uint8))
        except DataError as e:
            if not skip_bad:
                raise
            warnings.warn(f"{e}; skipped (skip_bad=True)", BadDataWarning, stacklevel=2)
    if not arrs:
        return None
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch differ in size: {sorted(shapes)}; use batch_size=1 or resize")
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def activation_statistics(images, extractor: Callable, *, batch_size: int = 50, device=None,
                          progress: bool = False, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) float64 of ``extractor`` features.

    images: a list of image files, or a float tensor ``[N, 3, H, W]`` in [0, 1]. A file that fails
    to decode raises :class:`~dualdiff.errors.DataError` naming it (``skip_bad``: left out, warned).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    if device is None:
        p = next(iter(extractor.parameters()), None) if hasattr(extractor, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    it = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="inception features", total=(n + batch_size - 1) // batch_size)
    feats = []
    for s in it:
        chunk = images[s:s + batch_size]
        x = _load_batch(chunk, skip_bad) if not isinstance(chunk, torch.Tensor) else chunk.float()
        if x is None:
            continue
        f = extractor(x.to(device))
        feats.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
    act = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0))
    if act.shape[0] < 2:
        raise ValueError(f"need at least 2 readable images for a covariance, got {act.shape[0]}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def folder_key(folder: str | os.PathLike, extractor_id: str) -> str:
    """SHA-1 of the folder's image names and bytes and the extractor id (the cache key)."""
    h = hashlib.sha1(extractor_id.encode())
    for f in list_images(folder):
        h.update(f.name.encode())
        h.update(b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\1")
    return h.hexdigest()


def _default_cache_dir() -> Path:
    return Path(os.environ.get("DUALDIFF_CACHE", Path.home() / ".cache" / "dualdiff")) / "fid_stats"


def folder_statistics(folder: str | os.PathLike, extractor: Callable, *, batch_size: int = 50, device=None,
                      cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                      progress: bool = False, verify: bool = False,
                      skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a folder's images, read from / written to the .npz cache. Before features
    are computed (a cache miss) every image is checked (:func:`check_images`; ``verify``: a full
    decode): a bad one raises :class:`~dualdiff.errors.DataError` naming it, or with ``skip_bad``
    is left out with a warning."""
    files = list_images(folder)
    ext_id = str(getattr(extractor, "cache_id", type(extractor).__name__))
    cache = None
    if use_cache:
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        cache = cache / f"{folder_key(folder, ext_id)}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                return z["mu"], z["sigma"]
    files = check_images(files, verify=verify, skip_bad=skip_bad)
    mu, sigma = activation_statistics(files, extractor, batch_size=batch_size, device=device, progress=progress,
                                      skip_bad=skip_bad)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, n=len(files), folder=str(Path(folder).resolve()), extractor=ext_id)
        os.replace(tmp, cache)
    return mu, sigma


def fid_from_stats(stats_a, stats_b) -> float:
    """FID from two (mu, sigma) pairs (or .npz files with mu and sigma)."""
    def get(s):
        if isinstance(s, (str, os.PathLike)):
            with np.load(s) as z:
                return z["mu"], z["sigma"]
        return s
    (m1, s1), (m2, s2) = get(stats_a), get(stats_b)
    return frechet_distance(np.asarray(m1, np.float64), np.atleast_2d(np.asarray(s1, np.float64)),
                            np.asarray(m2, np.float64), np.atleast_2d(np.asarray(s2, np.float64)))


def fid_from_folders(folder_a: str | os.PathLike, folder_b: str | os.PathLike, *,
                     extractor: Callable | None = None, inception_weights: str | os.PathLike | None = None,
                     dims: int = 2048, batch_size: int = 50, device=None,
                     cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                     allow_download: bool | None = None, progress: bool = False, verify: bool = False,
                     skip_bad: bool = False) -> float:
    """FID between the images of two folders (module docstring for weights and caching; bad
    image files: :func:`folder_statistics`)."""
    if extractor is None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        extractor = load_inception(dims, inception_weights, device=device, allow_download=allow_download)
    kw = dict(batch_size=batch_size, device=device, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
              verify=verify, skip_bad=skip_bad)
    return fid_from_stats(folder_statistics(folder_a, extractor, **kw), folder_statistics(folder_b, extractor, **kw))
