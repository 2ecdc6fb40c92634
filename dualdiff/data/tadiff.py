"""Procedural longitudinal brain-tumour "patients" for the tadiff experiment (no download).

Each patient is deterministic in (seed, patient index): a 3-D head (ellipsoidal skull shell,
brain with a smooth grey/white texture, two ventricles) imaged in T1, T1c and FLAIR with
per-modality tissue contrasts, a smooth multiplicative bias field and Gaussian noise; a
lobulated tumour (enhancing rim, necrotic core) with surrounding oedema. Over ``sessions``
(>= 4) exams the tumour radius changes with the treatment given in the preceding interval,
``r_{s+1} = r_s · exp(rate(treat_s) · gap_days / 100)`` (CRT shrinks, TMZ shrinks slowly,
none grows), clipped to [0.04, 0.4] of the head radius.

:func:`write_procedural_patients` writes them in the public TaDiff per-patient ``.npy`` layout
(``{pid}_image.npy`` ``(M·T, H, W, D)`` float32 modality-major in [0, 1], ``{pid}_label.npy``
``(T, H, W, D)`` int8 (0 background, 1 oedema, 3 enhancing tumour as in the public
preprocessing), ``{pid}_days.npy`` ``(T,)`` cumulative days, ``{pid}_treatment.npy`` ``(T,)``
codes), so the real loader (:mod:`dualdiff.data.tadiff_io`) is what reads them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualdiff.utils.seed import derive_seed

__all__ = ["Patient", "make_patient", "write_procedural_patients", "patient_ids", "TREATMENTS",
           "MODALITIES"]

MODALITIES = ("T1", "T1c", "FLAIR")
TREATMENTS = {0: "CRT", 1: "TMZ", 2: "none"}
_RATE = {0: -0.45, 1: -0.12, 2: 0.35}   # log-radius change per 100 days by treatment
# intensities (T1, T1c, FLAIR) per tissue
_SKULL = (0.85, 0.85, 0.30)
_CSF = (0.15, 0.15, 0.08)
_WHITE = (0.70, 0.70, 0.42)
_GREY = (0.52, 0.52, 0.52)
_OEDEMA = (0.42, 0.45, 0.92)
_RIM = (0.40, 0.98, 0.80)
_CORE = (0.22, 0.25, 0.62)


@dataclass
class Patient:
    """One patient: ``image [T, M, H, W, D]`` float32 in [0, 1], ``label [T, H, W, D]`` int8,
    ``days [T]`` int64 cumulative, ``treatment [T]`` int64, ``pid``."""
    pid: str
    image: np.ndarray
    label: np.ndarray
    days: np.ndarray
    treatment: np.ndarray


def patient_ids(n: int) -> list[str]:
    """``['sub-000', 'sub-001', ...]``."""
    return [f"sub-{i:03d}" for i in range(n)]


def _unit(rng: np.random.Generator, k: int) -> np.ndarray:
    v = rng.normal(size=(k, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_patient(seed: int, index: int, size: int = 32, depth: int = 16, sessions: int = 5) -> Patient:
    """Patient ``index`` of the procedural set ``seed``: volumes of ``size x size x depth``
    voxels (axial slices along the last axis), ``sessions`` exams."""
    if size < 8 or depth < 1:
        raise ValueError(f"size must be >= 8 and depth >= 1, got size={size}, depth={depth}")
    if sessions < 4:
        raise ValueError(f"sessions must be >= 4 (a window of 4 exams), got {sessions}")
    rng = np.random.default_rng(derive_seed(seed, "tadiff-patient", index))
    half = depth / size                                     # isotropic voxels
    y, x, z = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                          np.linspace(-half, half, depth) if depth > 1 else np.zeros(1), indexing="ij")
    p = np.stack([y, x, z], axis=-1).astype(np.float32)     # [H, W, D, 3]

    radii = np.array([0.82, 0.70, 0.80]) * rng.uniform(0.92, 1.05, size=3)
    r_head = np.sqrt(((p / radii) ** 2).sum(-1))
    head = r_head < 1.0
    brain = r_head < 0.88
    vent = np.zeros_like(head)
    for sx in (-1.0, 1.0):
        c = np.array([rng.uniform(-0.1, 0.05), sx * rng.uniform(0.08, 0.14), 0.0])
        vent |= np.sqrt((((p - c) / np.array([0.22, 0.06, 0.18])) ** 2).sum(-1)) < 1.0
    waves = _unit(rng, 4)
    tex = sum(np.cos(6.0 * (p @ w) + rng.uniform(0, 2 * np.pi)) for w in waves) / 4.0
    white = tex > 0.0

    # tumour geometry (fixed shape, radius per session)
    for _ in range(100):
        centre = rng.uniform(-0.45, 0.45, size=3) * np.array([radii[0], radii[1], min(radii[2], half)])
        if np.sqrt(((centre / radii) ** 2).sum()) < 0.6 and abs(centre[1]) > 0.15:
            break
    d = p - centre
    dist = np.linalg.norm(d, axis=-1)
    u = d / np.maximum(dist, 1e-6)[..., None]
    lobes = _unit(rng, 3)
    lob = 1.0 + 0.22 * sum(np.cos(4.0 * (u @ n) + rng.uniform(0, 2 * np.pi)) for n in lobes) / 3.0
    rel = dist / lob                                          # lobulated radial coordinate

    gaps = rng.integers(40, 121, size=sessions - 1)
    days = np.concatenate([[0], np.cumsum(gaps)]).astype(np.int64)
    treatment = rng.integers(0, 3, size=sessions).astype(np.int64)
    r = rng.uniform(0.10, 0.22)
    radius = [r]
    for s in range(sessions - 1):
        r = float(np.clip(r * np.exp(_RATE[int(treatment[s])] * gaps[s] / 100.0), 0.04, 0.40))
        radius.append(r)

    M = len(MODALITIES)
    image = np.zeros((sessions, M, size, size, depth), np.float32)
    label = np.zeros((sessions, size, size, depth), np.int8)
    skull = head & ~brain
    for s in range(sessions):
        tumour = brain & (rel < radius[s])
        oedema = brain & (rel < 1.7 * radius[s]) & ~tumour
        core = tumour & (rel < 0.55 * radius[s])
        label[s][oedema] = 1
        label[s][tumour] = 3
        bias = 1.0 + 0.12 * (p @ _unit(rng, 1)[0]) + 0.05 * rng.uniform(-1, 1)
        for m in range(M):
            v = np.zeros((size, size, depth), np.float32)
            v[skull] = _SKULL[m]
            v[brain & white] = _WHITE[m]
            v[brain & ~white] = _GREY[m]
            v[brain & vent] = _CSF[m]
            v[oedema] = _OEDEMA[m]
            v[tumour] = _RIM[m]
            v[core] = _CORE[m]
            v = v * bias + rng.normal(0.0, 0.02, size=v.shape) * head
            image[s, m] = np.clip(v, 0.0, 1.0)
    return Patient(patient_ids(index + 1)[-1], image, label, days, treatment)


def write_procedural_patients(out_dir: str | os.PathLike, num_patients: int, *, seed: int = 0,
                              size: int = 32, depth: int = 16, sessions: int = 5) -> list[Path]:
    """Write ``num_patients`` procedural patients to ``out_dir`` in the public ``.npy`` layout
    (module docstring); returns the written ``{pid}_image.npy`` paths."""
    if num_patients <= 0:
        raise ValueError(f"num_patients must be > 0, got {num_patients}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(num_patients):
        pt = make_patient(seed, i, size=size, depth=depth, sessions=sessions)
        T, M = pt.image.shape[:2]
        # modality-major (M·T, H, W, D), as the public preprocessing writes it
        image = pt.image.transpose(1, 0, 2, 3, 4).reshape(M * T, *pt.image.shape[2:])
        np.save(out / f"{pt.pid}_image.npy", image)
        np.save(out / f"{pt.pid}_label.npy", pt.label)
        np.save(out / f"{pt.pid}_days.npy", pt.days)
        np.save(out / f"{pt.pid}_treatment.npy", pt.treatment)
        written.append(out / f"{pt.pid}_image.npy")
    return written
