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
import math
import os
from pathlib import Path

import numpy as np
import torch

from dualdiff.data.checks import _nibabel, check_all, check_nifti, check_npy, load_nifti, load_npy
from dualdiff.data.tadiff import Patient
from dualdiff.errors import DataError

__all__ = ["TaDiffDataError", "check_npy_patient", "check_nifti_patient", "load_patients",
           "load_npy_patient", "load_nifti_patient", "list_npy_patients", "list_nifti_patients",
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


def check_npy_patient(root: str | os.PathLike, pid: str, *, verify: bool = False) -> None:
    """Build-time check of one ``.npy`` patient from the four headers alone (no array is read;
    a full read too with ``verify``): each file is a readable, untruncated, numeric ``.npy``, and
    their shapes agree. Raises :class:`TaDiffDataError` naming the file."""
    r = Path(root)
    info = {k: check_npy(_need(r / f"{pid}_{k}.npy", f"{k} file of patient {pid}"), what=f"{k} file",
                         kinds="fiub", verify=verify) for k in _NPY_PARTS}
    label, image = info["label"], info["image"]
    if len(label.shape) != 4:
        raise TaDiffDataError(f"{str(label.path)!r} must be (T, H, W, D), got shape {label.shape}")
    T = label.shape[0]
    if T < 1 or len(image.shape) != 4 or image.shape[0] % T or image.shape[1:] != label.shape[1:]:
        raise TaDiffDataError(f"{str(image.path)!r} must be (M*T, H, W, D) with T={T} sessions and the "
                              f"label's spatial shape {label.shape[1:]}, got {image.shape}")
    if image.shape[0] // T < 3:
        raise TaDiffDataError(f"{str(image.path)!r} has {image.shape[0] // T} modalities per session; "
                              "T1, T1c and FLAIR (3) are needed")
    for k in ("days", "treatment"):
        n = math.prod(info[k].shape)
        if n != T:
            raise TaDiffDataError(f"{str(info[k].path)!r} has {n} entries; it needs one per session ({T})")


def load_npy_patient(root: str | os.PathLike, pid: str, *, verify: bool = False) -> Patient:
    """One patient in the ``.npy`` layout (module docstring): :func:`check_npy_patient`, then the
    arrays (a :class:`TaDiffDataError` naming the file when one cannot be read)."""
    check_npy_patient(root, pid, verify=verify)
    r = Path(root)
    arr = {k: load_npy(r / f"{pid}_{k}.npy", what=f"{k} file") for k in _NPY_PARTS}
    label, days, treat, image = arr["label"], arr["days"].reshape(-1), arr["treatment"].reshape(-1), arr["image"]
    T = label.shape[0]
    M = image.shape[0] // T
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


def list_nifti_patients(root: str | os.PathLike) -> list[str]:
    """Patient folders of ``root`` that hold a ``sessions.csv`` (sorted)."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"data.path {str(r)!r} is not a directory")
    return sorted(p.name for p in r.iterdir() if (p / "sessions.csv").is_file())


def _session_rows(root: str | os.PathLike, pid: str) -> list[dict[str, str]]:
    table = _need(Path(root) / pid / "sessions.csv", f"session table of patient {pid}")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"session", "day", "treatment"} <= set(rows[0]):
        raise TaDiffDataError(f"{str(table)!r} must have a header session,day,treatment and one row per exam")
    for row in rows:
        for k in ("day", "treatment"):
            try:
                float(row[k])
            except (TypeError, ValueError):
                raise TaDiffDataError(f"{str(table)!r}: session {row['session']!r} has {k} {row[k]!r}, "
                                      "not a number") from None
    return rows


def _session_files(pdir: Path, pid: str, session: str) -> list[tuple[Path, str]]:
    sdir = pdir / session
    return ([(_need(sdir / fn, f"{m} image of {pid}/{session}"), f"{m} volume") for m, fn in NIFTI_FILES.items()]
            + [(_need(sdir / fn, f"mask of {pid}/{session}"), "mask volume") for fn in NIFTI_MASKS])


def check_nifti_patient(root: str | os.PathLike, pid: str, *, verify: bool = False) -> None:
    """Build-time check of one NIfTI patient from its session table and the volumes' headers
    (:func:`dualdiff.data.checks.check_nifti`; a full read too with ``verify``): every volume
    readable, untruncated, 3-D, one shape for all. Raises :class:`TaDiffDataError` naming the file."""
    _nibabel()  # a clear error first when nibabel is missing
    pdir = Path(root) / pid
    first: tuple[Path, tuple[int, ...]] | None = None
    for row in _session_rows(root, pid):
        for path, what in _session_files(pdir, pid, row["session"]):
            info = check_nifti(path, what=what, ndim=3, verify=verify)
            if first is None:
                first = (path, info.shape)
            elif info.shape != first[1]:
                raise TaDiffDataError(f"{str(path)!r} has shape {info.shape} but {str(first[0])!r} has "
                                      f"{first[1]}; the volumes of a patient must be registered to one grid")


def load_nifti_patient(root: str | os.PathLike, pid: str, *, verify: bool = False) -> Patient:
    """One patient from NIfTI sessions (module docstring): :func:`check_nifti_patient`, then the
    volumes (a :class:`TaDiffDataError` naming the file when one cannot be read)."""
    check_nifti_patient(root, pid, verify=verify)
    pdir = Path(root) / pid
    rows = _session_rows(root, pid)
    images, labels = [], []
    for row in rows:
        files = _session_files(pdir, pid, row["session"])
        vols = [load_nifti(p, what=w) for p, w in files]
        images.append(np.stack([nonzero_normalize(v) for v in vols[:len(NIFTI_FILES)]]))
        labels.append(np.logical_or.reduce([v > 0 for v in vols[len(NIFTI_FILES):]]).astype(np.int8))
    days = np.array([int(float(r["day"])) for r in rows], np.int64)
    treat = np.array([int(float(r["treatment"])) for r in rows], np.int64)
    return Patient(pid, np.stack(images), np.stack(labels), days, treat)


def load_patients(root: str | os.PathLike, ids: list[str], source: str = "npy", *, verify: bool = False,
                  skip_bad: bool = False) -> list[Patient]:
    """Patients ``ids`` of ``root`` in the ``npy`` or ``nifti`` layout. Every patient's files are
    checked first from their headers (:func:`check_npy_patient` / :func:`check_nifti_patient`,
    cheap), so a bad file is named before any volume is read; then the patients are read. A bad
    patient raises :class:`TaDiffDataError` naming the file, or with ``skip_bad`` is dropped with
    a :class:`~dualdiff.data.checks.BadDataWarning`. ``verify``: a full read of every file during
    the check, and the image volumes must be finite."""
    if source not in ("npy", "nifti"):
        raise ValueError(f"source must be 'npy' or 'nifti', got {source!r}")
    check = check_npy_patient if source == "npy" else check_nifti_patient
    load = load_npy_patient if source == "npy" else load_nifti_patient
    ok = [pid for pid, _ in check_all(ids, lambda pid: check(root, pid, verify=verify),
                                      skip_bad=skip_bad, what="patients")]

    def read(pid: str) -> Patient:
        p = load(root, pid)
        if verify and not np.isfinite(p.image).all():
            raise TaDiffDataError(f"patient {pid} in {str(root)!r}: its image volumes hold NaN or inf")
        return p

    return [p for _, p in check_all(ok, read, skip_bad=skip_bad, what="patients")]


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
