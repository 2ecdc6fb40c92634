"""tadiff data: the procedural generator is deterministic; the .npy / NIfTI loaders read what
was written; bad files get clear errors."""
import sys

import numpy as np
import pytest
import torch

from dualdiff.cli_common import UserError
from dualdiff.data.tadiff import make_patient, write_procedural_patients
from dualdiff.data.checks import BadDataWarning
from dualdiff.data.tadiff_io import (TaDiffDataError, TaDiffSlices, center_crop_pad, crop_foreground,
                                     list_npy_patients, load_nifti_patient, load_npy_patient, load_patients)
from dualdiff.errors import DataError

KW = dict(size=16, depth=6, sessions=5)


def test_generator_is_deterministic_and_patients_differ():
    a, b, c = make_patient(3, 1, **KW), make_patient(3, 1, **KW), make_patient(3, 2, **KW)
    for f in ("image", "label", "days", "treatment"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (5, 3, 16, 16, 6) and a.label.shape == (5, 16, 16, 6)
    assert a.image.dtype == np.float32 and 0 <= a.image.min() and a.image.max() <= 1
    assert (np.diff(a.days) > 0).all() and a.days[0] == 0
    vol = (a.label > 0).sum(axis=(1, 2, 3))
    assert (vol > 0).all() and len(set(vol.tolist())) > 1          # a tumour in every session, changing
    assert set(np.unique(a.label)) <= {0, 1, 3}


def test_loader_reads_what_the_writer_wrote(tmp_path):
    write_procedural_patients(tmp_path, 2, seed=5, **KW)
    assert list_npy_patients(tmp_path) == ["sub-000", "sub-001"]
    img = np.load(tmp_path / "sub-001_image.npy")
    assert img.shape == (3 * 5, 16, 16, 6)                          # modality-major (M·T, H, W, D)
    p = load_npy_patient(tmp_path, "sub-001")
    ref = make_patient(5, 1, **KW)
    assert np.array_equal(p.image, ref.image) and np.array_equal(p.label, ref.label)
    assert np.array_equal(p.days, ref.days) and np.array_equal(p.treatment, ref.treatment)
    q = center_crop_pad(crop_foreground(p), 16)
    assert q.image.shape[2:4] == (16, 16)
    ds = TaDiffSlices([q], window=4)
    assert len(ds) > 0
    item = ds[0]
    assert item["image"].shape == (4, 3, 16, 16) and item["label"].shape == (4, 16, 16)
    assert item["days"].shape == (4,) and item["treatments"].dtype == torch.float32
    for k in range(len(ds)):
        assert ds[k]["label"].sum() > 0                            # only slices with tumour


def test_missing_and_malformed_files(tmp_path):
    write_procedural_patients(tmp_path, 1, seed=0, **KW)
    (tmp_path / "sub-000_days.npy").unlink()
    with pytest.raises(FileNotFoundError, match="days file of patient sub-000"):
        load_npy_patient(tmp_path, "sub-000")
    write_procedural_patients(tmp_path, 1, seed=0, **KW)
    np.save(tmp_path / "sub-000_image.npy", np.zeros((2 * 5, 16, 16, 6), np.float32))
    with pytest.raises(TaDiffDataError, match="2 modalities"):
        load_npy_patient(tmp_path, "sub-000")
    np.save(tmp_path / "sub-000_image.npy", np.zeros((7, 16, 16, 6), np.float32))
    with pytest.raises(TaDiffDataError, match=r"\(M\*T, H, W, D\)"):
        load_npy_patient(tmp_path, "sub-000")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_npy_is_named_before_any_array_is_read(tmp_path, monkeypatch):
    write_procedural_patients(tmp_path, 3, seed=0, **KW)
    _truncate(tmp_path / "sub-001_label.npy")
    reads = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    with pytest.raises(DataError, match=r"bad label file '.*sub-001_label\.npy': truncated.*"
                                        r"data\.skip_bad=true skips it"):
        load_patients(tmp_path, ["sub-000", "sub-001", "sub-002"])
    assert reads == []  # found from the headers, before any patient was loaded


def test_npy_shape_mismatch_named_from_the_headers(tmp_path):
    write_procedural_patients(tmp_path, 1, seed=0, **KW)
    np.save(tmp_path / "sub-000_days.npy", np.arange(4))
    with pytest.raises(TaDiffDataError, match=r"'.*sub-000_days\.npy' has 4 entries.*per session \(5\)"):
        load_patients(tmp_path, ["sub-000"])
    np.save(tmp_path / "sub-000_days.npy", np.array(["a"] * 5, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"sub-000_days\.npy.*Python objects"):
        load_patients(tmp_path, ["sub-000"])
    (tmp_path / "sub-000_days.npy").write_bytes(b"not npy at all")
    with pytest.raises(DataError, match=r"sub-000_days\.npy.*not a readable \.npy"):
        load_patients(tmp_path, ["sub-000"])


def test_skip_bad_patients_and_verify(tmp_path):
    write_procedural_patients(tmp_path, 3, seed=0, **KW)
    _truncate(tmp_path / "sub-001_image.npy", 0.9)
    with pytest.warns(BadDataWarning, match=r"sub-001_image\.npy.*skipped \(data\.skip_bad=true\)"):
        got = load_patients(tmp_path, ["sub-000", "sub-001", "sub-002"], skip_bad=True)
    assert [p.pid for p in got] == ["sub-000", "sub-002"]
    img = np.load(tmp_path / "sub-002_image.npy")
    img[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "sub-002_image.npy", img)
    assert len(load_patients(tmp_path, ["sub-000", "sub-002"])) == 2  # verify off: values not scanned
    with pytest.raises(TaDiffDataError, match="sub-002.*NaN or inf"):
        load_patients(tmp_path, ["sub-000", "sub-002"], verify=True)


def _write_nifti(nib, root, pid, sessions=4, shape=(12, 12, 5), drop=None):
    pdir = root / pid
    rows = ["session,day,treatment"]
    rng = np.random.default_rng(0)
    for s in range(sessions):
        sdir = pdir / f"ses-{s:02d}"
        sdir.mkdir(parents=True)
        rows.append(f"ses-{s:02d},{s * 60},{s % 3}")
        for fn in ("T1.nii.gz", "T1c.nii.gz", "Flair.nii.gz"):
            v = np.zeros(shape, np.float32)
            v[2:10, 2:10] = rng.uniform(1, 100, size=(8, 8, shape[2]))
            nib.save(nib.Nifti1Image(v, np.eye(4)), sdir / fn)
        for fn in ("EdemaMask-CL.nii.gz", "ContrastEnhancedMask-CL.nii.gz"):
            m = np.zeros(shape, np.uint8)
            m[5:7, 5:7, 2] = 1
            nib.save(nib.Nifti1Image(m, np.eye(4)), sdir / fn)
    (pdir / "sessions.csv").write_text("\n".join(rows) + "\n")
    if drop:
        (pdir / drop).unlink()


def test_nifti_loader(tmp_path, require):
    nib = require("nibabel")
    _write_nifti(nib, tmp_path, "p1")
    p = load_nifti_patient(tmp_path, "p1")
    assert p.image.shape == (4, 3, 12, 12, 5) and p.label.shape == (4, 12, 12, 5)
    assert p.image.min() >= 0 and p.image.max() == pytest.approx(1.0)
    assert p.days.tolist() == [0, 60, 120, 180] and p.treatment.tolist() == [0, 1, 2, 0]
    assert p.label[:, 5:7, 5:7, 2].all() and p.label.sum() == 4 * 4
    _write_nifti(nib, tmp_path, "p2", drop="ses-02/Flair.nii.gz")
    with pytest.raises(FileNotFoundError, match="FLAIR image of p2/ses-02"):
        load_nifti_patient(tmp_path, "p2")


def test_truncated_nifti_is_named_at_check_time(tmp_path, require):
    nib = require("nibabel")
    _write_nifti(nib, tmp_path, "p1")
    _write_nifti(nib, tmp_path, "p2")
    bad = tmp_path / "p2" / "ses-01" / "T1c.nii.gz"
    _truncate(bad, 0.7)
    assert nib.load(bad).shape == (12, 12, 5)  # the header alone still reads
    with pytest.raises(DataError, match=r"bad T1c volume '.*p2/ses-01/T1c\.nii\.gz'"):
        load_patients(tmp_path, ["p1", "p2"], "nifti")
    with pytest.warns(BadDataWarning, match=r"T1c\.nii\.gz"):
        assert [p.pid for p in load_patients(tmp_path, ["p1", "p2"], "nifti", skip_bad=True)] == ["p1"]
    mask = tmp_path / "p1" / "ses-03" / "EdemaMask-CL.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 4), np.uint8), np.eye(4)), mask)
    with pytest.raises(TaDiffDataError, match=r"EdemaMask-CL\.nii\.gz' has shape \(12, 12, 4\)"):
        load_patients(tmp_path, ["p1"], "nifti")


def test_nifti_uncompressed_truncation(tmp_path, require):
    nib = require("nibabel")
    from dualdiff.data.checks import check_nifti

    f = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), f)
    assert check_nifti(f, ndim=3).shape == (8, 8, 8)
    with pytest.raises(DataError, match=r"'.*v\.nii'.*3 dimensions.*expected 2"):
        check_nifti(f, ndim=2)
    _truncate(f, 0.8)
    with pytest.raises(DataError, match=r"bad NIfTI volume '.*v\.nii': truncated"):
        check_nifti(f)


def test_nifti_without_nibabel_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(UserError, match=r"pip install 'dualdiff\[nifti\]'"):
        load_nifti_patient(tmp_path, "p1")
