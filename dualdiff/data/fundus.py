"""Fundus images for the vae experiment, grouped in environments (domains) for domain
generalisation: an embedded synthetic set, a DomainBed folder tree, and the splits.

Every dataset here returns ``(x, target, label, env)`` per item:

* ``x``: float32 ``[3, S, S]``, the model input, ImageNet-normalised:
  ``x = (target - IMAGENET_MEAN) / IMAGENET_STD``;
* ``target``: float32 ``[3, S, S]`` in [0, 1], the same image un-normalised (the reconstruction
  target, so no loss has to guess how the input was normalised);
* ``label``: int64 class (DR grade 0-4 for the synthetic set); ``env``: int64 environment index.

and exposes ``environments`` (names), ``classes`` (names), ``labels`` and ``env_labels`` (int64
numpy arrays, one entry per item, available without loading any image).

:class:`SyntheticFundus` — the embedded default, no download. Built from
``skimage.data.retina()`` (a CC0 fundus photograph shipped with scikit-image). Item ``i`` depends
only on ``(seed, i)`` (its own ``numpy`` generator). Environment ``i // num_per_env``; grade drawn
from that environment's class prior. Per item:

1. geometry: rotation by a uniform angle, a horizontal flip (p 0.5), zoom 0.95-1.15, a shift of
   up to 3 % and an elastic warp (a 5x5 grid of N(0, 0.015) displacements, bicubically
   upsampled), all in one ``grid_sample`` of the (cached) base image;
2. lesions by grade (in the fundus disc): microaneurysms (tiny dark-red dots, grade >= 1),
   haemorrhages (larger dark-red blots, >= 2), hard exudates (bright yellow spots, >= 2), new
   vessels (thin tortuous dark-red random walks, grade 4);
3. acquisition (the environment, each value jittered per image): colour cast (per-channel gain),
   gamma, contrast, Gaussian blur, vignetting, additive noise; black outside the disc.

:class:`DomainFolder` — a DomainBed tree ``root/<environment>/<class>/*.jpg`` (APTOS, EyePACS,
Messidor, Messidor-2 in VAE-DG); images resized (shorter side, bilinear, antialiased) and
centre-cropped to S. Classes are the union of the class folder names, sorted.

:func:`domain_split` — leave-one-domain-out splits: per training environment a seeded
holdout (``holdout_fraction`` of its images, 0.2, to ``val``; the rest to ``train``), optional
subset sampling (``subset_size`` images per training environment from its training part, seeded:
the seed's ``train_subset.py``); test environments whole.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dualdiff.data.checks import BadFileGuard, check_all, check_image, read_image
from dualdiff.errors import DataError
from dualdiff.utils.seed import derive_seed

__all__ = ["DatasetError", "IMAGENET_MEAN", "IMAGENET_STD", "FUNDUS_ENVIRONMENTS", "GRADES", "SyntheticFundus",
           "DomainFolder", "DomainSplit", "domain_split", "normalize", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRADES = ("no_dr", "mild", "moderate", "severe", "proliferative")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

class DatasetError(DataError):
    """The data cannot be used as configured (empty folder, subset larger than an environment)."""


# name -> acquisition parameters: colour gain (r, g, b), gamma, contrast, blur sigma (in pixels at
# 224², scaled with the size), vignetting strength, noise std, grade prior
FUNDUS_ENVIRONMENTS: dict[str, dict] = {
    "warm": dict(gain=(1.08, 0.97, 0.85), gamma=1.0, contrast=1.05, blur=0.0, vignette=0.10,
                 noise=0.010, prior=(0.50, 0.10, 0.22, 0.09, 0.09)),
    "dark": dict(gain=(0.92, 1.00, 1.12), gamma=1.45, contrast=0.80, blur=1.0, vignette=0.40,
                 noise=0.030, prior=(0.72, 0.07, 0.14, 0.035, 0.035)),
    "bright": dict(gain=(1.12, 1.02, 0.92), gamma=0.75, contrast=1.25, blur=0.4, vignette=0.0,
                   noise=0.005, prior=(0.45, 0.15, 0.20, 0.12, 0.08)),
    "blurry": dict(gain=(0.98, 1.08, 1.00), gamma=1.10, contrast=0.90, blur=2.0, vignette=0.22,
                   noise=0.020, prior=(0.30, 0.20, 0.20, 0.15, 0.15)),
}


def _tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def normalize(target: torch.Tensor) -> torch.Tensor:
    """[0, 1] image ``[..., 3, H, W]`` -> ImageNet-normalised model input."""
    mean, std = _tensor(IMAGENET_MEAN).to(target), _tensor(IMAGENET_STD).to(target)
    return (target - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    mean, std = _tensor(IMAGENET_MEAN).to(x), _tensor(IMAGENET_STD).to(x)
    return x * std + mean


# ---------------------------------------------------------------------------------------
# synthetic fundus


@functools.lru_cache(maxsize=4)
def _base_image(size: int) -> torch.Tensor:
    """``skimage.data.retina()`` at ``size`` x ``size``: [4, size, size] (RGB in [0, 1], disc mask)."""
    from skimage.data import retina

    img = torch.from_numpy(retina()).permute(2, 0, 1).float().div_(255.0)[None]
    img = F.interpolate(img, size=(size, size), mode="area")[0]
    mask = (img.max(dim=0, keepdim=True).values > 0.08).float()
    return torch.cat([img, mask])


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.3:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32).pow(2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(img)
    c = img.shape[0]
    x = F.pad(img[None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def _disc_points(rng: np.random.Generator, n: int, radius: float = 0.8) -> np.ndarray:
    """n uniform points in the disc of ``radius`` (normalised coordinates), [n, 2] (x, y)."""
    r = radius * np.sqrt(rng.random(n))
    a = rng.random(n) * 2 * np.pi
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _splat(img: torch.Tensor, centers: np.ndarray, sigmas: np.ndarray, amps: np.ndarray,
           colour: Sequence[float]) -> torch.Tensor:
    """Blend Gaussian spots of ``colour`` into ``img`` [3, S, S]: img·(1 - w) + colour·w."""
    if len(centers) == 0:
        return img
    s = img.shape[-1]
    coords = torch.linspace(-1, 1, s)
    c = torch.from_numpy(centers).float()
    sig = torch.from_numpy(sigmas).float()[:, None]
    gx = torch.exp(-(coords[None] - c[:, :1]).pow(2) / (2 * sig * sig))  # [K, S]
    gy = torch.exp(-(coords[None] - c[:, 1:]).pow(2) / (2 * sig * sig))
    a = torch.from_numpy(amps).float()[:, None, None]
    w = 1.0 - torch.prod(1.0 - a * gy[:, :, None] * gx[:, None, :], dim=0)  # [S, S]
    return img * (1 - w) + _tensor(colour) * w


def _new_vessels(rng: np.random.Generator, n: int, px: float) -> tuple[np.ndarray, np.ndarray]:
    pts = []
    for _ in range(n):
        p = _disc_points(rng, 1, 0.6)[0]
        angle = rng.random() * 2 * np.pi
        for _ in range(int(rng.integers(25, 45))):
            angle += rng.normal(0, 0.6)
            p = p + 0.018 * np.array([np.cos(angle), np.sin(angle)])
            pts.append(p.copy())
    pts_a = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts_a, np.full(len(pts_a), max(0.006, 0.7 * px))


class SyntheticFundus(torch.utils.data.Dataset):
    """The embedded fundus set: ``num_per_env`` images per environment (module docstring).

    Args:
        num_per_env: images per environment.
        image_size: S (>= 16).
        environments: names from :data:`FUNDUS_ENVIRONMENTS` (default: all four).
        seed: item i is a function of (seed, i) only.
        cache: keep generated images in memory (each is generated once).
    """

    def __init__(self, num_per_env: int = 200, image_size: int = 64, *,
                 environments: Sequence[str] | None = None, seed: int = 0, cache: bool = True) -> None:
        envs = list(FUNDUS_ENVIRONMENTS) if environments is None else list(environments)
        unknown = [e for e in envs if e not in FUNDUS_ENVIRONMENTS]
        if unknown or not envs:
            raise ValueError(f"environments must be names from {list(FUNDUS_ENVIRONMENTS)}, got {envs}")
        if isinstance(num_per_env, bool) or not isinstance(num_per_env, int) or num_per_env < 1:
            raise ValueError(f"num_per_env must be a positive int, got {num_per_env!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        self.environments, self.classes = envs, list(GRADES)
        self.num_per_env, self.image_size, self.seed, self.cache = num_per_env, image_size, seed, cache
        n = num_per_env * len(envs)
        self.env_labels = np.repeat(np.arange(len(envs)), num_per_env).astype(np.int64)
        self.labels = np.array([self._grade(i) for i in range(n)], dtype=np.int64)
        self._cache: dict[int, torch.Tensor] = {}

    def _grade(self, index: int) -> int:
        prior = FUNDUS_ENVIRONMENTS[self.environments[index // self.num_per_env]]["prior"]
        rng = np.random.default_rng(derive_seed(self.seed, "fundus-grade", index))
        return int(rng.choice(len(prior), p=np.asarray(prior) / sum(prior)))

    def __len__(self) -> int:
        return len(self.env_labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        target = self._cache.get(index)
        if target is None:
            target = self.render(index)
            if self.cache:
                self._cache[index] = target
        return (normalize(target), target, torch.tensor(self.labels[index]),
                torch.tensor(self.env_labels[index]))

    def render(self, index: int) -> torch.Tensor:
        """The [0, 1] image ``[3, S, S]`` of item ``index`` (no cache)."""
        s = self.image_size
        rng = np.random.default_rng(derive_seed(self.seed, "fundus", index))
        env = FUNDUS_ENVIRONMENTS[self.environments[int(self.env_labels[index])]]
        grade = int(self.labels[index])

        # 1. geometry: affine (rotation, flip, zoom, shift) + elastic warp, one grid_sample
        angle = rng.random() * 2 * np.pi
        zoom = rng.uniform(0.95, 1.15)
        flip = -1.0 if rng.random() < 0.5 else 1.0
        shift = rng.uniform(-0.03, 0.03, size=2)
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[flip * cos, -sin, shift[0]], [flip * sin, cos, shift[1]]],
                             dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 4, s, s], align_corners=False)
        warp = torch.from_numpy(rng.normal(0, 0.015, size=(1, 2, 5, 5))).float()
        grid = grid + F.interpolate(warp, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        base = _base_image(min(2 * s, 512))
        out = F.grid_sample(base[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        img, mask = out[:3], (out[3:] > 0.5).float()

        # 2. lesions (normalised coordinates; px = one pixel)
        px = 2.0 / s
        dark, haem_c, exud_c = (0.30, 0.04, 0.03), (0.40, 0.03, 0.02), (0.98, 0.90, 0.45)
        n_ma = (0, rng.integers(3, 9), rng.integers(6, 16), rng.integers(10, 26), rng.integers(10, 26))[grade]
        n_haem = (0, 0, rng.integers(2, 6), rng.integers(6, 13), rng.integers(8, 16))[grade]
        n_exud = (0, 0, rng.integers(2, 7), rng.integers(6, 16), rng.integers(8, 21))[grade]
        n_nv = 2 + int(rng.integers(0, 3)) if grade == 4 else 0
        img = _splat(img, _disc_points(rng, n_ma), np.full(n_ma, max(0.008, 0.6 * px)),
                     rng.uniform(0.6, 0.9, n_ma), dark)
        img = _splat(img, _disc_points(rng, n_haem), rng.uniform(0.02, 0.05, n_haem),
                     rng.uniform(0.5, 0.85, n_haem), haem_c)
        img = _splat(img, _disc_points(rng, n_exud, 0.6), rng.uniform(0.008, 0.02, n_exud) + 0.5 * px,
                     rng.uniform(0.6, 0.95, n_exud), exud_c)
        if n_nv:
            pts, sig = _new_vessels(rng, n_nv, px)
            img = _splat(img, pts, sig, np.full(len(pts), 0.55), dark)

        # 3. acquisition: colour cast, gamma, contrast, blur, vignetting, noise
        gain = np.asarray(env["gain"]) * (1 + rng.normal(0, 0.03, 3))
        img = (img * _tensor(gain.tolist())).clamp(0, 1)
        img = img.pow(env["gamma"] * math.exp(rng.normal(0, 0.05)))
        mean = (img * mask).sum() / mask.sum().clamp_min(1) / 3
        img = (img - mean) * env["contrast"] * (1 + rng.normal(0, 0.03)) + mean
        img = _gaussian_blur(img, env["blur"] * s / 224 * (1 + rng.uniform(-0.2, 0.2)))
        coords = torch.linspace(-1, 1, s)
        r2 = coords[None, :].pow(2) + coords[:, None].pow(2)
        img = img * (1 - env["vignette"] * r2.clamp(max=1.0))[None]
        noise = torch.from_numpy(rng.normal(0, env["noise"], size=(3, s, s))).float()
        return ((img + noise) * mask).clamp(0, 1).contiguous()


# ---------------------------------------------------------------------------------------
# DomainBed folder tree


class DomainFolder(torch.utils.data.Dataset):
    """``root/<environment>/<class>/<image>`` (DomainBed layout), resized and centre-cropped to
    ``image_size``; environments sorted by name, classes the sorted union of class folders.
    Raises ``FileNotFoundError`` when ``root`` is missing and :class:`DatasetError` naming the folder
    when it holds no environment folders or an environment holds no (readable) images.

    Every image is checked on construction (:func:`dualdiff.data.checks.check_image`: header and
    ``Image.verify()``; a full decode with ``verify=True``): a bad one raises :class:`DatasetError`
    naming it, or with ``skip_bad=True`` is dropped with a warning; one that fails to decode later
    raises the same way or, under ``skip_bad``, is skipped (the next good image is served)."""

    def __init__(self, root: str | os.PathLike, image_size: int = 224, *, verify: bool = False,
                 skip_bad: bool = False) -> None:
        root_p = Path(root).expanduser()
        if not root_p.is_dir():
            raise FileNotFoundError(f"data.path: no such folder: {str(root_p)!r}")
        env_dirs = sorted(p for p in root_p.iterdir() if p.is_dir())
        if not env_dirs:
            raise DatasetError(f"data.path {str(root_p)!r} has no environment folders "
                             "(expected root/<environment>/<class>/<image>)")
        self.environments = [p.name for p in env_dirs]
        self.classes = sorted({c.name for e in env_dirs for c in e.iterdir() if c.is_dir()})
        found: list[tuple[Path, int, int]] = []
        for ei, e in enumerate(env_dirs):
            n0 = len(found)
            for ci, c in enumerate(self.classes):
                d = e / c
                if not d.is_dir():
                    continue
                found += [(f, ci, ei) for f in sorted(d.rglob("*"))
                          if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
            if len(found) == n0:
                raise DatasetError(f"data.path: environment folder {str(e)!r} has no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)}) in class folders")
        try:
            good = [item for item, _ in check_all(found, lambda it: check_image(it[0], verify=verify),
                                                  skip_bad=skip_bad, what="images")]
        except DataError as e:
            raise DatasetError(str(e)) from e
        for ei, e in enumerate(env_dirs):
            if not any(env == ei for _, _, env in good):
                raise DatasetError(f"data.path: environment folder {str(e)!r} has no readable images")
        self.root, self.image_size = root_p, image_size
        self.files = [f for f, _, _ in good]
        self.labels = np.asarray([c for _, c, _ in good], dtype=np.int64)
        self.env_labels = np.asarray([e for _, _, e in good], dtype=np.int64)
        self._guard = BadFileGuard(skip_bad)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from torchvision.transforms import functional as TF

        im = TF.resize(read_image(self.files[index], mode="RGB"), self.image_size,
                       interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        target = TF.to_tensor(TF.center_crop(im, [self.image_size, self.image_size]))
        return (normalize(target), target, torch.tensor(self.labels[index]),
                torch.tensor(self.env_labels[index]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._guard.get(index, len(self.files), self._load)


# ---------------------------------------------------------------------------------------
# splits


@dataclass
class DomainSplit:
    """Item indices: ``train`` (training environments' in-splits, subsampled when asked),
    ``val`` (their out-splits), ``test`` (the test environments, whole)."""
    train: list[int]
    val: list[int]
    test: list[int]


def domain_split(env_labels: np.ndarray, test_envs: Sequence[int], *, holdout_fraction: float = 0.2,
                 seed: int = 0, subset_size: int | None = None,
                 environments: Sequence[str] | None = None) -> DomainSplit:
    """Leave-``test_envs``-out split (module docstring). Per training environment e: a permutation
    seeded by (seed, e); its first ``int(n_e · holdout_fraction)`` items go to ``val``, the rest
    to ``train`` — or, with ``subset_size=N``, N of them drawn without replacement (seeded).
    Raises :class:`DatasetError` (a ValueError) when N exceeds an environment's training part."""
    env_labels = np.asarray(env_labels)
    n_env = int(env_labels.max()) + 1 if len(env_labels) else 0
    names = list(environments) if environments is not None else [str(i) for i in range(n_env)]
    if not 0.0 <= holdout_fraction < 1.0:
        raise DatasetError(f"data.holdout_fraction must be in [0, 1), got {holdout_fraction}")
    bad = [t for t in test_envs if not 0 <= t < n_env]
    if bad:
        raise DatasetError(f"test environment index {bad[0]} out of range for {n_env} environments")
    if subset_size is not None and subset_size < 1:
        raise DatasetError(f"data.subset_size must be >= 1 or None, got {subset_size}")
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for e in range(n_env):
        idx = np.flatnonzero(env_labels == e)
        if e in test_envs:
            test += idx.tolist()
            continue
        rng = np.random.default_rng(derive_seed(seed, "holdout", e))
        perm = idx[rng.permutation(len(idx))]
        n_out = int(len(idx) * holdout_fraction)
        inside = perm[n_out:]
        val += sorted(perm[:n_out].tolist())
        if subset_size is not None:
            if subset_size > len(inside):
                raise DatasetError(f"data.subset_size={subset_size} is larger than environment "
                                 f"{names[e]!r} ({len(inside)} images in its training split)")
            pick = np.random.default_rng(derive_seed(seed, "subset", e)).choice(
                len(inside), size=subset_size, replace=False)
            inside = inside[pick]
        train += sorted(inside.tolist())
    if not train:
        raise DatasetError("no training images: every environment is a test environment")
    return DomainSplit(train=train, val=val, test=test)
