"""Image data for the LIFT experiment: every dataset yields float32 ``[3, S, S]`` tensors in
[-1, 1] (S = 64 by default); :func:`dual_scale_views` makes the 32x32 view by area averaging.

* :class:`ProceduralDualScaleImages` — the embedded default, no download: deterministic
  synthetic images with structure at both scales (below).
* :class:`ImageFolderDataset` — any folder of images (recursively), resized so the shorter
  side is S (bilinear, antialiased) and centre-cropped to S x S.
* :func:`hf_afhq` — AFHQ (``huggan/AFHQv2``, as the experiment's public code) through Hugging
  Face ``datasets``, same resize + centre crop; a clear error when ``datasets`` is missing or
  the hub cannot be reached.

Procedural images (image ``i`` of ``ProceduralDualScaleImages(n, seed)`` depends only on
``(seed, i)``, drawn from its own ``torch.Generator``):

* coarse scale (survives 2x area downsampling): a linear colour gradient between two random
  colours in a random direction, plus 2-4 soft Gaussian colour blobs (std 5-14 px) blended
  over it;
* fine scale (mostly averaged away at 32x32): a high-frequency luminance texture — oriented
  stripes with a period of 2-5 px, or a checkerboard with 1-3 px cells — of amplitude
  0.2-0.4 (times ``texture_scale``, 1 by default), confined to (a dilation of) one of the blobs or
  to a random half-plane, so the texture's location is tied to the coarse layout.

Values are clamped to [-1, 1].
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dualdiff.data.checks import BadFileGuard, check_all, check_image, read_image
from dualdiff.errors import DataError
from dualdiff.utils.seed import derive_seed

__all__ = ["ProceduralDualScaleImages", "ImageFolderDataset", "HFImageDataset", "hf_afhq",
           "dual_scale_views", "scale_labels", "IMAGE_EXTENSIONS", "DatasetUnavailableError", "AFHQ_DATASET"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AFHQ_DATASET = "huggan/AFHQv2"


class DatasetUnavailableError(DataError, RuntimeError):
    """A dataset cannot be loaded (library missing, offline, empty folder, bad file); says what to
    do. A :class:`~dualdiff.errors.DataError`: the CLI prints it as one line."""


def dual_scale_views(x64: torch.Tensor, mode: str = "area") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x64, x32)`` with x32 the 2x downsampled view of ``[B, C, H, W]`` or ``[C, H, W]``.

    ``mode="area"`` (default): mean over each 2x2 block (``F.avg_pool2d``); ``"bilinear"``: the
    experiment's public code (``F.interpolate(..., mode="bilinear", align_corners=False)``, which
    for an exact 2x reduction is also a 2x2 mean, without antialiasing beyond it).
    """
    if not isinstance(x64, torch.Tensor):
        raise TypeError(f"x64 must be a tensor, got {type(x64).__name__}")
    if x64.dim() not in (3, 4) or x64.shape[-1] % 2 or x64.shape[-2] % 2:
        raise ValueError(f"x64 must be [B, C, H, W] or [C, H, W] with even H, W, got shape {tuple(x64.shape)}")
    if not x64.is_floating_point():
        raise TypeError(f"x64 must be floating point, got {x64.dtype}")
    single = x64.dim() == 3
    x = x64.unsqueeze(0) if single else x64
    if mode == "area":
        x32 = F.avg_pool2d(x, 2)
    elif mode == "bilinear":
        x32 = F.interpolate(x, size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear",
                            align_corners=False)
    else:
        raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
    return x64, (x32[0] if single else x32)


def scale_labels(record) -> tuple[str, str]:
    """``("SxS", "S/2xS/2")``: the large and the small scale of a dual-scale result by size.

    ``record``: a mapping with the large side under ``"image_size"`` (a heatmap's ``meta``, an
    ``mse.json``); 64 when absent (files written before the size was recorded). Code names the
    scales ``64`` / ``32`` whatever their size; labels for people use this."""
    s = int(record.get("image_size", 64))
    return f"{s}x{s}", f"{s // 2}x{s // 2}"


class ProceduralDualScaleImages(torch.utils.data.Dataset):
    """``n`` deterministic synthetic RGB images ``[3, size, size]`` in [-1, 1] (module docstring)."""

    def __init__(self, n: int = 10000, seed: int = 0, size: int = 64, texture_scale: float = 1.0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 2:
            raise ValueError(f"size must be an even int >= 8, got {size!r}")
        if isinstance(texture_scale, bool) or not isinstance(texture_scale, (int, float)) or not texture_scale >= 0:
            raise ValueError(f"texture_scale must be a float >= 0, got {texture_scale!r}")
        self.n, self.seed, self.size, self.texture_scale = n, int(seed), size, float(texture_scale)
        c = (torch.arange(size, dtype=torch.float32) + 0.5)
        self._yy, self._xx = torch.meshgrid(c, c, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        return self.render(index)

    def render(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "procedural-dual-scale", index))

        def u(lo: float = 0.0, hi: float = 1.0, shape=()) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=g)

        s = float(self.size)
        xx, yy = self._xx / s, self._yy / s  # in (0, 1)
        # coarse: gradient background
        theta = float(u(0, 2 * math.pi))
        ramp = (math.cos(theta) * (xx - 0.5) + math.sin(theta) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
        ramp = ramp.clamp(0, 1)
        c0, c1 = u(-0.9, 0.9, (3,)), u(-0.9, 0.9, (3,))
        img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp
        # coarse: soft blobs
        n_blobs = int(torch.randint(2, 5, (), generator=g))
        masks = []
        for _ in range(n_blobs):
            cx, cy = float(u(0.15, 0.85)), float(u(0.15, 0.85))
            sigma = float(u(5.0, 14.0)) / s
            m = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
            col = u(-1.0, 1.0, (3,))
            img = img * (1 - m) + col[:, None, None] * m
            masks.append(m)
        # fine: high-frequency texture in a region tied to the coarse layout
        px, py = self._xx, self._yy  # pixel units
        if bool(torch.rand((), generator=g) < 0.5):
            period = float(u(2.0, 5.0))
            phi = float(u(0, math.pi))
            tex = torch.sin(2 * math.pi * (math.cos(phi) * px + math.sin(phi) * py) / period)
        else:
            cell = int(torch.randint(1, 4, (), generator=g))
            tex = (((px.floor() // cell) + (py.floor() // cell)) % 2) * 2 - 1
        if bool(torch.rand((), generator=g) < 0.5):
            region = masks[int(torch.randint(0, n_blobs, (), generator=g))]
            region = (region * 3.0).clamp(max=1.0)
        else:
            a = float(u(0, 2 * math.pi))
            d = math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)
            region = torch.sigmoid(d * s / 2.0)
        amp = float(u(0.2, 0.4)) * self.texture_scale
        img = img + amp * tex * region
        return img.clamp(-1.0, 1.0).to(torch.float32).contiguous()

    def tensors(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """``[N, 3, size, size]`` stack of the given images (default: all)."""
        idx = range(self.n) if indices is None else indices
        return torch.stack([self[i] for i in idx])


def _to_tensor_resized(img, size: int) -> torch.Tensor:
    """PIL image -> float32 [3, size, size] in [-1, 1]: RGB, shorter side to size, centre crop."""
    from torchvision.transforms import functional as TF
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    img = TF.center_crop(img, [size, size])
    return TF.to_tensor(img).mul_(2.0).sub_(1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image file under ``path`` (recursive, sorted, by extension in ``extensions``) as
    float32 ``[3, size, size]`` in [-1, 1]: converted to RGB, resized so the shorter side is
    ``size`` (bilinear, antialiased), centre-cropped. Raises :class:`DatasetUnavailableError`
    when the folder is missing or holds no images.

    On construction every file is checked (:func:`dualdiff.data.checks.check_image`: header and
    ``Image.verify()``; a full decode with ``verify=True``): a bad file raises
    :class:`DatasetUnavailableError` naming it, or with ``skip_bad=True`` is dropped with a
    warning. A file that fails to decode later raises the same way (or is skipped: the next good
    image is served)."""

    def __init__(self, path: str | os.PathLike, size: int = 64,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, *, verify: bool = False,
                 skip_bad: bool = False) -> None:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise DatasetUnavailableError(f"image folder {str(root)!r} does not exist or is not a directory")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        exts = tuple(e.lower() for e in extensions)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise DatasetUnavailableError(f"no images ({', '.join(exts)}) found under {str(root)!r}")
        try:
            self.files = [f for f, _ in check_all(files, lambda f: check_image(f, verify=verify),
                                                  skip_bad=skip_bad, what="images")]
        except DataError as e:
            raise DatasetUnavailableError(str(e)) from e
        if not self.files:
            raise DatasetUnavailableError(f"no readable images under {str(root)!r}: every one is bad")
        self.root, self.size = root, size
        self._guard = BadFileGuard(skip_bad)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> torch.Tensor:
        try:
            return _to_tensor_resized(read_image(self.files[index]), self.size)
        except DataError as e:
            raise DatasetUnavailableError(str(e)) from e

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._guard.get(index, len(self.files), self._load)


class HFImageDataset(torch.utils.data.Dataset):
    """A Hugging Face dataset's ``image_key`` column as float32 ``[3, size, size]`` in [-1, 1]."""

    def __init__(self, hf_dataset, size: int = 64, image_key: str = "image") -> None:
        self.dataset, self.size, self.image_key = hf_dataset, size, image_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_tensor_resized(self.dataset[int(index)][self.image_key], self.size)


def hf_afhq(split: str = "train", cache_dir: str | os.PathLike | None = None, size: int = 64,
            name: str = AFHQ_DATASET) -> HFImageDataset:
    """AFHQ through Hugging Face ``datasets`` (``load_dataset(name, split=split)``), resized and
    centre-cropped to ``size``. Raises :class:`DatasetUnavailableError` with what to do when
    ``datasets`` is not installed or the dataset cannot be downloaded / found in the cache."""
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise DatasetUnavailableError(
            "AFHQ needs the Hugging Face 'datasets' package: pip install datasets "
            "(or use an image folder: data.source=folder data.path=DIR, or the embedded "
            "procedural default)") from e
    try:
        ds = datasets.load_dataset(name, split=split,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # network errors, missing cache offline, bad split: all surface here
        raise DatasetUnavailableError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}, cache_dir "
            f"{cache_dir!r}): {type(e).__name__}: {e}. It must be downloadable (network, "
            f"HF_DATASETS_OFFLINE unset) or already in the cache; otherwise export the images to "
            f"a folder and use data.source=folder data.path=DIR") from e
    return HFImageDataset(ds, size=size)
