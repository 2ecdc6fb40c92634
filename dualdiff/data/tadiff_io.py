"""Reading longitudinal patients for tadiff (``.npy`` layout or NIfTI) and slicing them.

``.npy`` (the public TaDiff layout): in ``root``, per patient ``{pid}_image.npy`` ``(M·T, H, W, D)``
modality-major float (M >= 3: T1, T1c, FLAIR[, T2]; the first three are used),
``{pid}_label.npy`` ``(T, H, W, D)`` (any label > 0 is tumour), ``{pid}_days.npy`` ``(T,)``,
``{pid}_treatment.npy`` ``(T,)``.

NIfTI (needs ``nibabel``, the optional ``dualdiff[nifti]`` extra): ``root/{pid}/sessions.csv``
with a header ``session,day,treatment`` and one row per exam, and per session a folder
``root/{pid}/{session}/`` holding ``T1.nii.gz``, ``T1c.nii.gz``, ``Flair.nii.gz`` and the masks
``EdemaMask-CL.nii.gz``, ``ContrastEnhancedMask-CL.nii.gz`` (the public dataset's names); each
image volume is intensity-normalised over its non-zero voxels (percentile clip, z-score, then
min-max to [0, 1], as the public preprocessing).

Both loaders then crop the common foreground bounding box (in H, W over every session and
modality) and centre-crop / zero-pad H and W to ``image_size``. :class:`TaDiffSlices` serves
axial slices (last axis) of windows of 4 consecutive sessions, only slices where the window
has tumour (the public sampling), as dicts ``image [4, 3, S, S]`` in [0, 1], ``label [4, S, S]``
(0/1 float), ``days [4]``, ``treatments [4]`` (float32).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from dualdiff.data.tadiff import Patient
from dualdiff.errors import DataError

__all__ = ["TaDiffDataError", "load_npy_patient", "load_nifti_patient", "list_npy_patients", "list_nifti_patients",
           "crop_foreground", "center_crop_pad", "nonzero_normalize", "TaDiffSlices", "NIFTI_FILES"]

NIFTI_FILES = {"T1": "T1.nii.gz", "T1c": "T1c.nii.gz", "FLAIR": "Flair.nii.gz"}
NIFTI_MASKS = ("EdemaMask-CL.nii.gz", "ContrastEnhancedMask-CL.nii.gz")
_NPY_PARTS = ("image", "label", "days", "treatment")


class TaDiffDataError(DataError):
    """A data file's content does not fit the layout (the CLI reports it as a user error)."""


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {str(path)!r}")
    return path


def list_npy_patients(root: str | os.PathLike) -> list[str]:
    """Patient ids ``pid`` with a ``{pid}_image.npy`` in ``root`` (sorted)."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"data.path {str(r)!r} is not a directory")
    return sorted(p.name[: -len("_image.npy")] for p in r.glob("*_image.npy"))


def load_npy_patient(root: str | os.PathLike, pid: str) -> Patient:
    """One patient in the ``.npy`` layout (module docstring); checks that the four files agree."""
    r = Path(root)
    arr = {k: np.load(_need(r / f"{pid}_{k}.npy", f"{k} file of patient {pid}")) for k in _NPY_PARTS}
    label, days, treat = arr["label"], arr["days"].reshape(-1), arr["treatment"].reshape(-1)
    if label.ndim != 4:
        raise TaDiffDataError(f"{pid}_label.npy must be (T, H, W, D), got shape {label.shape}")
    T = label.shape[0]
    image = arr["image"]
    if image.ndim != 4 or image.shape[0] % T or image.shape[1:] != label.shape[1:]:
        raise TaDiffDataError(f"{pid}_image.npy must be (M*T, H, W, D) with T={T} sessions and the "
                         f"label's spatial shape {label.shape[1:]}, got {image.shape}")
    M = image.shape[0] // T
    if M < 3:
        raise TaDiffDataError(f"{pid}_image.npy has {M} modalities per session; T1, T1c and FLAIR (3) are needed")
    if days.shape[0] != T or treat.shape[0] != T:
        raise TaDiffDataError(f"{pid}: days ({days.shape[0]}) and treatment ({treat.shape[0]}) must have "
                         f"one entry per session ({T})")
    image = image.reshape(M, T, *image.shape[1:])[:3].transpose(1, 0, 2, 3, 4).astype(np.float32)
    return Patient(pid, image, label.astype(np.int8), days.astype(np.int64), treat.astype(np.int64))


def nonzero_normalize(v: np.ndarray, clip_percent: float = 0.2) -> np.ndarray:
    """Percentile-clip and z-score the non-zero voxels, then min-max the volume to [0, 1]."""
    v = np.asarray(v, dtype=np.float64).copy()
    nz = v > 0
    if not nz.any():
        return v.astype(np.float32)
    lo, hi = np.percentile(v[nz], [clip_percent, 100 - clip_percent])
    v[nz] = np.clip(v[nz], lo, hi)
    std = v[nz].std()
    v = (v - v[nz].mean()) / (std if std > 0 else 1.0)
    span = v.max() - v.min()
    return ((v - v.min()) / (span if span > 0 else 1.0)).astype(np.float32)


def _nibabel():
    try:
        import nibabel
    except ImportError as e:
        from dualdiff.errors import UserError

        raise UserError("reading NIfTI needs nibabel: pip install 'dualdiff[nifti]' "
                        "(or pip install nibabel)") from e
    return nibabel


def list_nifti_patients(root: str | os.PathLike) -> list[str]:
    """Patient folders of ``root`` that hold a ``sessions.csv`` (sorted)."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"data.path {str(r)!r} is not a directory")
    return sorted(p.name for p in r.iterdir() if (p / "sessions.csv").is_file())


def load_nifti_patient(root: str | os.PathLike, pid: str) -> Patient:
    """One patient from NIfTI sessions (module docstring)."""
    nib = _nibabel()
    pdir = Path(root) / pid
    table = _need(pdir / "sessions.csv", f"session table of patient {pid}")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"session", "day", "treatment"} <= set(rows[0]):
        raise TaDiffDataError(f"{str(table)!r} must have a header session,day,treatment and one row per exam")
    images, labels = [], []
    for row in rows:
        sdir = pdir / row["session"]
        vols = [nonzero_normalize(np.asanyarray(nib.load(_need(sdir / fn, f"{m} image of {pid}/{row['session']}")).dataobj))
                for m, fn in NIFTI_FILES.items()]
        masks = [np.asanyarray(nib.load(_need(sdir / fn, f"mask of {pid}/{row['session']}")).dataobj) > 0
                 for fn in NIFTI_MASKS]
        shapes = {v.shape for v in vols} | {m.shape for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise TaDiffDataError(f"{pid}/{row['session']}: volumes must be 3-D and of one shape, got {sorted(shapes)}")
        images.append(np.stack(vols))
        labels.append(np.logical_or.reduce(masks).astype(np.int8))
    if len({im.shape for im in images}) != 1:
        raise TaDiffDataError(f"{pid}: sessions have different volume shapes; register them first")
    days = np.array([int(float(r["day"])) for r in rows], np.int64)
    treat = np.array([int(float(r["treatment"])) for r in rows], np.int64)
    return Patient(pid, np.stack(images), np.stack(labels), days, treat)


def crop_foreground(p: Patient) -> Patient:
    """Crop H and W to the bounding box of ``image > 0`` over every session and modality."""
    fg = (p.image > 0).any(axis=(0, 1, 4))                    # [H, W]
    if not fg.any():
        return p
    ys, xs = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
    sl = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    return Patient(p.pid, p.image[:, :, sl[0], sl[1]], p.label[:, sl[0], sl[1]], p.days, p.treatment)


def _crop_pad_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    n = a.shape[axis]
    if n > size:
        start = (n - size) // 2
        return np.take(a, np.arange(start, start + size), axis=axis)
    if n < size:
        before = (size - n) // 2
        pad = [(0, 0)] * a.ndim
        pad[axis] = (before, size - n - before)
        return np.pad(a, pad)
    return a


def center_crop_pad(p: Patient, image_size: int) -> Patient:
    """Centre-crop or zero-pad H and W to ``image_size``."""
    img, lab = p.image, p.label
    for ax_img, ax_lab in ((2, 1), (3, 2)):
        img, lab = _crop_pad_axis(img, ax_img, image_size), _crop_pad_axis(lab, ax_lab, image_size)
    return Patient(p.pid, np.ascontiguousarray(img), np.ascontiguousarray(lab), p.days, p.treatment)


class TaDiffSlices(torch.utils.data.Dataset):
    """Axial slices of 4-session windows with tumour (module docstring).

    ``patients``: loaded :class:`Patient` s (already cropped to ``image_size``); ``window``:
    sessions per sample (the model's S). Index ``i`` -> (patient, first session, slice).
    """

    def __init__(self, patients: list[Patient], window: int = 4) -> None:
        if not patients:
            raise TaDiffDataError("TaDiffSlices needs at least one patient")
        self.patients, self.window = patients, window
        self.index: list[tuple[int, int, int]] = []
        for i, p in enumerate(patients):
            T = p.label.shape[0]
            if T < window:
                raise TaDiffDataError(f"patient {p.pid} has {T} sessions; a window needs {window}")
            for w in range(T - window + 1):
                has = (p.label[w:w + window] > 0).any(axis=(0, 1, 2))    # [D]
                self.index += [(i, w, int(z)) for z in np.nonzero(has)[0]]
        if not self.index:
            raise TaDiffDataError("no slice of any patient window contains tumour")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i, w, z = self.index[k]
        p, s = self.patients[i], slice(w, w + self.window)
        return {"image": torch.from_numpy(np.ascontiguousarray(p.image[s, :, :, :, z])).float(),
                "label": torch.from_numpy((p.label[s, :, :, z] > 0).astype(np.float32)),
                "days": torch.from_numpy(p.days[s].astype(np.float32)),
                "treatments": torch.from_numpy(p.treatment[s].astype(np.float32))}
