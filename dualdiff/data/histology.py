"""Histology tiles with 5-class stain masks for the ldm experiment.

Items are dicts ``{"image": [3, S, S] float32 in [0, 1], "mask": [S, S] int64, "dist": [K]
float32 (per-class pixel fractions, rows sum to 1; zeros when there is no mask), "has_mask":
bool}``.

Sources:

* :class:`EmbeddedHistology` (no download): tiles of ``skimage.data.immunohistochemistry()``
  (512², bundled with scikit-image; a procedural H-DAB-like image when scikit-image is missing)
  with masks from :class:`StainRule`. Split by region: the right ``test_fraction`` of the
  columns is the held-out test region; crops of size S at seeded positions with one of the 8
  dihedral transforms.
* :class:`HistologyFolder`: ``root/images/*`` + ``root/masks/*`` (same stem, integer classes
  0..K-1) + optional ``root/unlabelled/*`` (no mask: always the null condition), resized to S;
  the seed's 90/10 train/validation split (seeded) by :func:`split_indices`; class counts are
  printed by :func:`describe_classes`.

The stain rule (:class:`StainRule`) on an RGB image in [0, 1], from the colour deconvolution
of Ruifrok & Johnston (``skimage.color.rgb2hed``; :func:`rgb_to_hed` is the same on torch
batches): 0 background (mean intensity > ``background``), 4 strong DAB (D > ``dab_strong``),
3 weak DAB (D > ``dab_weak``), 2 haematoxylin nuclei (H > ``hematoxylin``), 1 other tissue.

Class-balanced sampling (``sampling="class_balanced"``): the seed's ``DatasetLung`` cutoffs
``c_k = p + (1 - p)·k/(K - 1)`` for k = 0..K-1. Draw u ~ U(0, 1): u < c_0 picks a tile
uniformly; otherwise the k with c_(k-1) <= u < c_k picks foreground class k (1..K-1) and a
tile uniformly among the tiles containing it. So p is the *uniform* share and 1 - p the
balanced share:

* p = 0   -> [0, 0.25, 0.5, 0.75, 1.0]: fully class-balanced (u < 0 never happens; each
  foreground class is drawn with probability 1/(K-1)). These are the seed's **test** cutoffs.
* p = 0.5 -> [0.5, 0.625, 0.75, 0.875, 1.0]: half uniform, half balanced. The seed's
  **training** cutoffs.
* p = 1   -> [1, 1, 1, 1, 1]: plain uniform sampling, no balancing.

The seed therefore trained at p = 0.5 and tested at p = 0: a train/test mismatch of the class
mix. Here one ``balance_p`` serves both (matched by default); ``balance_p=0`` is the seed's
test behaviour and ``balance_p=0.5`` its training behaviour (``dualdiff ldm study`` compares
the seed's mismatch with matched cutoffs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor



__all__ = ["StainRule", "rgb_to_hed", "class_distribution", "EmbeddedHistology", "HistologyFolder",
           "DataError", "split_indices", "balanced_cutoffs", "balanced_indices", "describe_classes",
           "source_image", "CLASS_NAMES", "IMAGE_EXTENSIONS"]

CLASS_NAMES = ("background", "other tissue", "haematoxylin nuclei", "weak DAB", "strong DAB")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# rgb_from_hed of Ruifrok & Johnston (2001), as in skimage.color
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


from dualdiff.data.checks import BadFileGuard, bad_file, check_all, check_image, read_image  # noqa: E402
from dualdiff.errors import DataError  # noqa: E402  (re-exported here for older imports)


def _hed_from_rgb() -> np.ndarray:
    try:
        from skimage.color.colorconv import hed_from_rgb
        return np.asarray(hed_from_rgb, dtype=np.float64)
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        return np.linalg.inv(np.asarray(_RGB_FROM_HED, dtype=np.float64))


def rgb_to_hed(x: Tensor) -> Tensor:
    """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, 3, H, W]`` (H, E, D) stain densities, as
    ``skimage.color.rgb2hed``: ``max(log(max(x, 1e-6)) / log(1e-6) @ hed_from_rgb, 0)``."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be [B, 3, H, W], got {tuple(x.shape)}")
    m = torch.as_tensor(_hed_from_rgb(), dtype=torch.float32, device=x.device)
    od = torch.log(x.float().clamp_min(1e-6)) / np.log(1e-6)
    return torch.einsum("bchw,cd->bdhw", od, m).clamp_min(0)


@dataclass(frozen=True)
class StainRule:
    """Thresholds of the 5-class stain mask (module docstring)."""
    background: float = 0.8
    hematoxylin: float = 0.035
    dab_weak: float = 0.08
    dab_strong: float = 0.13

    def __call__(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> ``[B, H, W]`` int64 classes 0..4."""
        hed = rgb_to_hed(x)
        h, d = hed[:, 0], hed[:, 2]
        out = torch.ones_like(h, dtype=torch.long)
        out[h > self.hematoxylin] = 2
        out[d > self.dab_weak] = 3
        out[d > self.dab_strong] = 4
        out[x.float().mean(1) > self.background] = 0
        return out


def class_distribution(mask: Tensor, num_classes: int) -> Tensor:
    """Per-class pixel fractions: ``[..., H, W]`` int -> ``[..., K]`` float32 (rows sum to 1).
    Raises DataError when a value is outside ``[0, num_classes)``."""
    if mask.is_floating_point():
        raise DataError(f"mask must hold integers, got {mask.dtype}")
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"mask values must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                        f"got min {lo}, max {hi}")
    onehot = torch.nn.functional.one_hot(mask.long(), num_classes).float()
    return onehot.flatten(-3, -2).mean(-2)


def source_image(seed: int = 0) -> tuple[np.ndarray, str]:
    """``(HxWx3 float32 in [0, 1], name)``: scikit-image's immunohistochemistry image, or a
    procedural substitute (pink tissue, blue nuclei, brown DAB blobs) without scikit-image."""
    try:
        from skimage import data
        return data.immunohistochemistry().astype(np.float32) / 255.0, "immunohistochemistry"
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        pass
    rng = np.random.default_rng(seed)
    n = 512
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    img = np.ones((n, n, 3), np.float32) * np.array([0.93, 0.92, 0.94], np.float32)
    tissue = (np.sin(xx / 37.0) + np.cos(yy / 53.0) + rng.normal(0, 0.2, (n, n))) > -0.3
    img[tissue] = [0.85, 0.72, 0.80]
    for colour, count, radius in (([0.35, 0.35, 0.65], 400, 5), ([0.55, 0.35, 0.20], 120, 9),
                                  ([0.40, 0.22, 0.10], 60, 7)):
        for cy, cx in rng.integers(0, n, (count, 2)):
            r = radius * rng.uniform(0.6, 1.4)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[blob & tissue] = colour
    return np.clip(img + rng.normal(0, 0.02, img.shape).astype(np.float32), 0, 1), "procedural"


def _dihedral(x: Tensor, k: int) -> Tensor:
    """One of the 8 symmetries of the square on the last two dims (k in 0..7)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def _item(image: Tensor, mask: Tensor | None, num_classes: int) -> dict[str, Any]:
    if mask is None:
        return {"image": image, "mask": torch.zeros(image.shape[-2:], dtype=torch.long),
                "dist": torch.zeros(num_classes), "has_mask": False}
    return {"image": image, "mask": mask, "dist": class_distribution(mask, num_classes), "has_mask": True}


class EmbeddedHistology(torch.utils.data.Dataset):
    """``n`` seeded ``size``² crops (with a dihedral transform) of the train or test region of
    :func:`source_image`, masks by ``rule`` (module docstring)."""

    num_classes = 5

    def __init__(self, split: str = "train", n: int = 256, size: int = 64, *, test_fraction: float = 0.25,
                 seed: int = 0, rule: StainRule | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        img, self.source = source_image(seed)
        full = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        H, W = full.shape[1:]
        cut = int(round(W * (1.0 - test_fraction)))
        lo, hi = (0, cut) if split == "train" else (cut, W)
        if size > min(H, hi - lo):
            raise DataError(f"data.image_size={size} does not fit the {split} region ({H}x{hi - lo} px; "
                            f"test_fraction={test_fraction})")
        self.rule = rule or StainRule()
        full_mask = self.rule(full[None])[0]
        g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        ys = torch.randint(0, H - size + 1, (n,), generator=g)
        xs = torch.randint(lo, hi - size + 1, (n,), generator=g)
        ks = torch.randint(0, 8, (n,), generator=g)
        self.images = torch.stack([_dihedral(full[:, y:y + size, x:x + size], int(k))
                                   for y, x, k in zip(ys.tolist(), xs.tolist(), ks.tolist())])
        self.masks = torch.stack([_dihedral(full_mask[y:y + size, x:x + size], int(k))
                                  for y, x, k in zip(ys.tolist(), xs.tolist(), ks.tolist())])
        self.dists = class_distribution(self.masks, self.num_classes)
        self.has_mask = torch.ones(n, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "mask": self.masks[i], "dist": self.dists[i], "has_mask": True}


def _files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


class HistologyFolder(torch.utils.data.Dataset):
    """``root/images`` + ``root/masks`` (+ ``root/unlabelled``), every image resized to
    ``size``² (bilinear; masks nearest). Checks on construction, each bad file named in a
    :class:`DataError`: the folders exist; every image passes
    :func:`dualdiff.data.checks.check_image` (header + ``Image.verify()``; a full decode with
    ``verify=True``) and has a mask; every mask is decoded (its class counts are needed anyway)
    and must be a single-channel image of its image's size with values in ``[0, num_classes)``.
    With ``skip_bad=True`` a bad image / mask pair (or unlabelled image) is dropped with a
    warning instead; a file that fails to decode later is skipped the same way (the next good
    tile is served) or raises :class:`DataError` naming it."""

    def __init__(self, root: str | Path, size: int = 512, num_classes: int = 5, *,
                 verify: bool = False, skip_bad: bool = False) -> None:
        self.root, self.size, self.num_classes = Path(root), int(size), int(num_classes)
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise DataError(f"data.path: {str(d)!r} is not a directory (expected images/ and masks/)")
        images, masks = _files(img_dir), _files(mask_dir)
        if not images:
            raise DataError(f"data.path: no images in {str(img_dir)!r}")
        pairs = [(p, masks.get(stem)) for stem, p in images.items()]
        checked = check_all(pairs, lambda pm: self._check_pair(pm[0], pm[1], verify),
                            skip_bad=skip_bad, what="image / mask pairs")
        self.entries: list[tuple[Path, Path | None]] = [pm for pm, _ in checked]
        self.pixel_counts = sum((c for _, c in checked), np.zeros(self.num_classes, np.int64))
        if not self.entries:
            raise DataError(f"data.path: no usable image / mask pair in {str(self.root)!r}")
        unl = self.root / "unlabelled"
        if unl.is_dir():
            self.entries += [(p, None) for p, _ in check_all(
                list(_files(unl).values()), lambda p: check_image(p, verify=verify),
                skip_bad=skip_bad, what="unlabelled images")]
        self._guard = BadFileGuard(skip_bad)

    def _check_pair(self, img: Path, mask: Path | None, verify: bool) -> np.ndarray:
        """Per-class pixel counts of ``mask`` after checking the pair; raises DataError."""
        if mask is None:
            raise DataError(f"missing mask file for image {str(img)!r}: expected "
                            f"{str(self.root / 'masks' / img.stem)!r} + an image extension")
        info = check_image(img, verify=verify)
        m = np.asarray(read_image(mask, what="mask"))
        if m.ndim != 2:
            raise bad_file(mask, "mask", f"must be a single-channel integer image, got shape {m.shape}")
        if m.shape != (info.height, info.width):
            raise bad_file(mask, "mask", f"is {m.shape[1]}x{m.shape[0]} but its image {str(img)!r} is "
                                         f"{info.width}x{info.height}")
        if m.min() < 0 or m.max() >= self.num_classes:
            raise bad_file(mask, "mask", f"has values {int(m.min())}..{int(m.max())}; they must be in "
                                         f"[0, {self.num_classes - 1}] (num_classes={self.num_classes})")
        return np.bincount(m.ravel().astype(np.int64), minlength=self.num_classes)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict[str, Any]:
        from PIL import Image

        img_path, mask_path = self.entries[i]
        im = read_image(img_path, mode="RGB").resize((self.size, self.size), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1).contiguous()
        if mask_path is None:
            return _item(image, None, self.num_classes)
        mk = read_image(mask_path, what="mask").resize((self.size, self.size), Image.NEAREST)
        mask = torch.from_numpy(np.asarray(mk).astype(np.int64))
        return _item(image, mask, self.num_classes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._guard.get(i, len(self.entries), self._load)


def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """The seed's 90/10 split: a seeded permutation, the last ``round(n·val_fraction)`` (at least
    1 when n > 1 and val_fraction > 0) for validation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    return sorted(perm[:n - n_val]), sorted(perm[n - n_val:])


def describe_classes(dists: Tensor, has_mask: Tensor, names=CLASS_NAMES) -> str:
    """One line per class: tiles containing it and its mean pixel fraction over masked tiles."""
    d = dists[has_mask]
    lines = [f"{int(has_mask.sum())} tiles with masks, {int((~has_mask).sum())} without"]
    for k in range(d.shape[1]):
        name = names[k] if k < len(names) else f"class {k}"
        lines.append(f"  {k} {name:20s} in {int((d[:, k] > 0).sum()):6d} tiles, "
                     f"mean fraction {float(d[:, k].mean()) if len(d) else 0.0:.3f}")
    return "\n".join(lines)


def balanced_cutoffs(p: float, num_classes: int = 5) -> list[float]:
    """``[p + (1 - p)·k/(K - 1) for k in 0..K-1]`` (K = 5): p = 0.5 -> [0.5, 0.625, 0.75, 0.875,
    1.0], the seed's training cutoffs; p = 0 -> [0, 0.25, 0.5, 0.75, 1], the seed's test cutoffs
    (fully balanced); p = 1 -> [1, 1, 1, 1, 1], no balancing (uniform)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"balance_p must be in [0, 1], got {p}")
    n_fg = num_classes - 1
    return [p + (1.0 - p) * k / n_fg for k in range(n_fg + 1)]


def balanced_indices(dists: Tensor, batch: int, p: float, generator: torch.Generator) -> Tensor:
    """``batch`` tile indices by the cutoff rule (module docstring); a class no tile contains
    falls back to a uniform draw. ``dists``: [N, K] class fractions (zeros = no mask)."""
    cut = torch.tensor(balanced_cutoffs(p, dists.shape[1]), dtype=torch.float64)
    n = dists.shape[0]
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    out = torch.randint(0, n, (batch,), generator=generator)
    r = torch.rand(batch, generator=generator)
    for i in range(batch):
        if u[i] < cut[0]:
            continue
        k = int(torch.searchsorted(cut, u[i], right=True).clamp(max=len(cut) - 1))  # c_(k-1) <= u < c_k: class k
        holders = torch.nonzero(dists[:, k] > 0).flatten()
        if len(holders):
            out[i] = holders[min(int(r[i] * len(holders)), len(holders) - 1)]
    return out
