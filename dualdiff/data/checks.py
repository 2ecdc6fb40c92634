"""Checks of data files when a dataset is built, and file reads that name the file on failure.

Every dataset that reads files (lift image folders, ldm images + masks, vae DomainBed folders,
tadiff ``.npy`` / NIfTI patients, FID image folders) goes through this module, so a bad file is
reported as one :class:`~dualdiff.errors.DataError` naming it, before training starts, instead of
a traceback hours in.

Build-time checks (no pixel decode, no array read):

* image (:func:`check_image`): ``PIL.Image.open`` parses the header (format, size, mode), then
  ``Image.verify()``: for PNG it walks every chunk and checks its CRC (a truncated or damaged PNG
  fails; costs one read of the file, no decompression); for JPEG and most other formats it checks
  the header only, so a truncated JPEG is found by ``verify=True`` or when it is read.
* ``.npy`` (:func:`check_npy`): magic string and header (shape, dtype, order) parsed with
  ``numpy.lib.format``, no object dtype, and the file holds at least header + prod(shape) x
  itemsize bytes (a truncated file fails); reads a few hundred bytes.
* NIfTI (:func:`check_nifti`): the nibabel header (shape, dtype, data offset); ``.nii``: the file
  covers offset + data; ``.nii.gz``: the gzip trailer's length field (ISIZE) is compared with the
  size the header implies, and only when they disagree is the file decompressed to confirm.

``verify=True`` adds a full decode of every file at build time (``Image.load()``; reading the
whole array): it finds everything a later read would, at the cost of one pass over the data.

:func:`check_all` applies a check to every file: without ``skip_bad`` the first bad file raises
(the message counts the others), with it each bad file is dropped with a :class:`BadDataWarning`.
:class:`BadFileGuard` does the same mid-run for map-style datasets: a file that fails to load
raises :class:`DataError` naming it, or under ``skip_bad`` is skipped (the next good item is
served instead) with a warning.
"""
from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dualdiff.errors import DataError, UserError

__all__ = ["BadDataWarning", "BadFileGuard", "ImageInfo", "ArrayInfo", "bad_file", "check_all",
           "check_image", "read_image", "check_npy", "load_npy", "check_nifti", "load_nifti"]

T = TypeVar("T")
R = TypeVar("R")


class BadDataWarning(UserWarning):
    """A bad data file was skipped (``skip_bad``); the message names it."""


def bad_file(path: str | Path, what: str, reason: str) -> DataError:
    """The :class:`DataError` for a bad file: ``bad <what> '<path>': <reason>``."""
    return DataError(f"bad {what} {str(path)!r}: {reason}")


def _image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError,
            Image.DecompressionBombError)


# ------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says."""
    path: Path
    width: int
    height: int
    mode: str
    format: str | None


def check_image(path: str | Path, *, what: str = "image", verify: bool = False,
                modes: Sequence[str] | None = None) -> ImageInfo:
    """Header + ``Image.verify()`` of ``path`` (a full decode too with ``verify``); raises
    :class:`DataError` naming the file when it is unreadable, empty or not in ``modes``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            info = ImageInfo(Path(path), int(im.width), int(im.height), str(im.mode), im.format)
            im.verify()
        if verify:
            with Image.open(path) as im:
                im.load()
    except _image_errors() as e:
        raise bad_file(path, what, f"{type(e).__name__}: {e}") from e
    if info.width < 1 or info.height < 1:
        raise bad_file(path, what, f"size {info.width}x{info.height}")
    if modes is not None and info.mode not in modes:
        raise bad_file(path, what, f"mode {info.mode!r}, expected one of {list(modes)}")
    return info


def read_image(path: str | Path, *, what: str = "image", mode: str | None = None) -> Any:
    """The decoded PIL image of ``path`` (converted to ``mode`` when given), detached from the
    file; raises :class:`DataError` naming the file when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except _image_errors() as e:
        raise bad_file(path, what, f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class ArrayInfo:
    """What an array file's header says."""
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(f)
    else:  # 3.0 (utf-8 field names): no public reader
        shape, _, dtype = fmt._read_array_header(f, version)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def check_npy(path: str | Path, *, what: str = "array file", ndim: int | None = None,
              kinds: str | None = None, verify: bool = False) -> ArrayInfo:
    """Header and size of a ``.npy`` file (module docstring; a full read too with ``verify``).
    ``ndim``: the required number of dimensions; ``kinds``: allowed ``dtype.kind`` letters
    (e.g. ``"fiub"``). Raises :class:`DataError` naming the file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            shape, dtype = _npy_header(f)
            offset = f.tell()
        size = p.stat().st_size
    except (ValueError, SyntaxError, EOFError, struct.error) as e:
        raise bad_file(p, what, f"not a readable .npy file ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise bad_file(p, what, f"cannot be read ({e})") from e
    if dtype.hasobject:
        raise bad_file(p, what, f"dtype {dtype} holds Python objects (needs pickle; not loaded)")
    need = offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise bad_file(p, what, f"truncated: {size} bytes, but its header ({shape}, {dtype}) needs {need}")
    if ndim is not None and len(shape) != ndim:
        raise bad_file(p, what, f"has {len(shape)} dimensions {shape}, expected {ndim}")
    if kinds is not None and dtype.kind not in kinds:
        raise bad_file(p, what, f"dtype {dtype} is not allowed (dtype kinds {kinds!r}: f float, "
                                "i/u integer, b bool)")
    if verify:
        load_npy(p, what=what)
    return ArrayInfo(p, shape, dtype)


def load_npy(path: str | Path, *, what: str = "array file") -> np.ndarray:
    """``np.load(path, allow_pickle=False)``; raises :class:`DataError` naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as e:
        raise bad_file(path, what, f"{type(e).__name__}: {e}") from e


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError as e:
        raise UserError("reading NIfTI needs nibabel: pip install 'dualdiff[nifti]' "
                        "(or pip install nibabel)") from e
    return nibabel


def _nifti_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    return (OSError, EOFError, ValueError, zlib.error, struct.error, ImageFileError, HeaderDataError)


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file by decompressing it (raises on a damaged stream)."""
    n = 0
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            n += len(block)
    return n


def check_nifti(path: str | Path, *, what: str = "NIfTI volume", ndim: int | None = None,
                verify: bool = False) -> ArrayInfo:
    """Header and size of a NIfTI file (module docstring; a full read too with ``verify``).
    Raises :class:`DataError` naming the file."""
    nib = _nibabel()
    p = Path(path)
    try:
        img = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype())
        offset = getattr(img.dataobj, "offset", None)
        if offset is not None:
            need = int(offset) + math.prod(shape) * dtype.itemsize
            if p.suffix == ".gz":
                with open(p, "rb") as f:
                    f.seek(-4, 2)
                    isize = struct.unpack("<I", f.read(4))[0]
                if isize != need % 2**32 and _gzip_length(p) < need:  # decompress only if suspicious
                    raise bad_file(p, what, f"truncated: the header ({shape}, {dtype}) needs {need} "
                                            "uncompressed bytes")
            elif p.stat().st_size < need:
                raise bad_file(p, what, f"truncated: {p.stat().st_size} bytes, the header ({shape}, "
                                        f"{dtype}) needs {need}")
    except DataError:
        raise
    except FileNotFoundError:
        raise
    except _nifti_errors() as e:
        raise bad_file(p, what, f"{type(e).__name__}: {e}") from e
    if ndim is not None and len(shape) != ndim:
        raise bad_file(p, what, f"has {len(shape)} dimensions {shape}, expected {ndim}")
    if verify:
        load_nifti(p, what=what)
    return ArrayInfo(p, shape, dtype)


def load_nifti(path: str | Path, *, what: str = "NIfTI volume") -> np.ndarray:
    """The voxel array of a NIfTI file; raises :class:`DataError` naming the file."""
    nib = _nibabel()
    try:
        return np.asanyarray(nib.load(path).dataobj)
    except FileNotFoundError:
        raise
    except _nifti_errors() as e:
        raise bad_file(path, what, f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- many files, mid-run
def check_all(items: Sequence[T], check: Callable[[T], R], *, skip_bad: bool = False,
              what: str = "files", hint: str = "data.skip_bad=true") -> list[tuple[T, R]]:
    """``[(item, check(item))]`` for every item whose check passes. A failing check (a
    :class:`DataError`) raises the first one (its class, the others counted), unless ``skip_bad``: then
    each is dropped with a :class:`BadDataWarning`. ``hint`` names the option in the message."""
    good: list[tuple[T, R]] = []
    bad: list[DataError] = []
    for item in items:
        try:
            good.append((item, check(item)))
        except DataError as e:
            bad.append(e)
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad {what}; {hint} skips them)" if len(bad) > 1 else \
            f" ({hint} skips it)"
        try:  # the first error's own class (e.g. TaDiffDataError), the count appended
            err = type(bad[0])(f"{bad[0]}{more}")
        except TypeError:
            err = DataError(f"{bad[0]}{more}")
        raise err from bad[0]
    for e in bad:
        warnings.warn(f"{e}; skipped ({hint})", BadDataWarning, stacklevel=2)
    return good


class BadFileGuard:
    """Loads items of a map-style dataset of ``n`` items; a load that fails with
    :class:`DataError` re-raises, or under ``skip_bad`` marks the item bad, warns and serves the
    next good item (cyclically)."""

    def __init__(self, skip_bad: bool = False, hint: str = "data.skip_bad=true") -> None:
        self.skip_bad, self.hint = bool(skip_bad), hint
        self.bad: set[int] = set()

    def get(self, index: int, n: int, load: Callable[[int], T]) -> T:
        """``load(index)``, or under ``skip_bad`` that of the next index whose load succeeds."""
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for k in range(n):
            j = (index + k) % n
            if j in self.bad:
                continue
            try:
                return load(j)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad.add(j)
                warnings.warn(f"{e}; skipped ({self.hint})", BadDataWarning, stacklevel=2)
        raise DataError(f"every one of the {n} files of this dataset failed to load")
