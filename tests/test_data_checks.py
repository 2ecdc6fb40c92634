"""Bad data files: named in one line when a dataset is built, through every experiment's
``data.verify`` / ``data.skip_bad`` keys and the CLI (dualdiff.data.checks)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dualdiff.cli import main
from dualdiff.config import apply_overrides
from dualdiff.data.checks import BadDataWarning, BadFileGuard, check_all, check_npy
from dualdiff.data.tadiff import write_procedural_patients
from dualdiff.errors import DataError


def _png(path, value=0, size=16, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ---------------------------------------------------------------------------------- helpers
def test_check_all_counts_and_skips():
    def check(x):
        if x % 2:
            raise DataError(f"bad item {x}")
        return x * 10

    assert check_all([0, 2], check) == [(0, 0), (2, 20)]
    with pytest.raises(DataError, match=r"^bad item 1 \(and 1 more bad files; data.skip_bad=true skips them\)$"):
        check_all([0, 1, 2, 3], check)
    with pytest.warns(BadDataWarning) as rec:
        assert check_all([0, 1, 2, 3], check, skip_bad=True) == [(0, 0), (2, 20)]
    assert [str(w.message) for w in rec] == ["bad item 1; skipped (data.skip_bad=true)",
                                             "bad item 3; skipped (data.skip_bad=true)"]


def test_guard_raises_or_serves_the_next_good_item():
    def load(i):
        if i in (1, 2):
            raise DataError(f"bad file {i}")
        return i

    with pytest.raises(DataError, match="bad file 1"):
        BadFileGuard().get(1, 4, load)
    g = BadFileGuard(skip_bad=True)
    with pytest.warns(BadDataWarning):
        assert g.get(1, 4, load) == 3 and g.get(-3, 4, load) == 3
    assert g.bad == {1, 2} and g.get(0, 4, load) == 0
    with pytest.raises(IndexError):
        g.get(4, 4, load)
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match="every one of the 2 files"):
        BadFileGuard(skip_bad=True).get(0, 2, lambda i: load(i + 1))


def test_check_npy_reads_only_the_header(tmp_path):
    f = tmp_path / "a.npy"
    np.save(f, np.zeros((3, 4), np.float32))
    info = check_npy(f, ndim=2, kinds="f")
    assert info.shape == (3, 4) and info.dtype == np.float32
    np.save(f, np.zeros((3, 4), np.int64))
    with pytest.raises(DataError, match=r"'.*a\.npy': dtype int64 is not allowed \(dtype kinds 'f'"):
        check_npy(f, kinds="f")
    with pytest.raises(DataError, match=r"a\.npy.*2 dimensions \(3, 4\), expected 3"):
        check_npy(f, ndim=3)
    _truncate(f, 0.9)
    with pytest.raises(DataError, match=r"a\.npy': truncated: \d+ bytes, but its header \(\(3, 4\), int64\) needs 224"):
        check_npy(f)


# ------------------------------------------------------------ each experiment's data config
def test_lift_data_keys_reach_the_dataset(tmp_path):
    from dualdiff.experiments.lift import LIFTConfig, build_lift_dataset

    for k in range(3):
        _png(tmp_path / f"{k}.png", 50 * k)
    _truncate(tmp_path / "1.png")
    cfg = apply_overrides(LIFTConfig(), ["data.source=folder", f"data.path={tmp_path}", "data.image_size=32",
                                         "model.image_size=32"])
    with pytest.raises(DataError, match=r"bad image '.*1\.png'"):
        build_lift_dataset(cfg.data)
    cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    with pytest.warns(BadDataWarning, match=r"1\.png"):
        assert len(build_lift_dataset(cfg.data)) == 2


def test_ldm_data_keys_reach_the_dataset(tmp_path):
    from dualdiff.experiments.ldm import LDMConfig, _datasets

    for k in range(4):
        _png(tmp_path / "images" / f"t{k}.png", 30 * k)
        _png(tmp_path / "masks" / f"t{k}.png", k % 5, mode="L")
    _png(tmp_path / "masks" / "t2.png", 1, size=8, mode="L")  # wrong-shape mask
    cfg = apply_overrides(LDMConfig(), ["data.source=folder", f"data.path={tmp_path}", "data.image_size=32"])
    with pytest.raises(DataError, match=r"bad mask '.*masks/t2\.png'.*is 8x8 but its image"):
        _datasets(cfg)
    cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    with pytest.warns(BadDataWarning, match=r"t2\.png"):
        train, val = _datasets(cfg)
    assert len(train) + len(val) == 3


def test_vae_data_keys_reach_the_dataset(tmp_path):
    from dualdiff.experiments.vae import VAEConfig, build_vae_data

    for e in ("a", "b"):
        for k in range(5):
            _png(tmp_path / e / "0" / f"{k}.png", 20 * k)
    (tmp_path / "b" / "0" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cfg = apply_overrides(VAEConfig(), ["data.source=folder", f"data.path={tmp_path}"])
    with pytest.raises(DataError, match=r"bad image '.*b/0/3\.png'"):
        build_vae_data(cfg.data, 16)
    cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    with pytest.warns(BadDataWarning, match=r"3\.png"):
        ds, split, _ = build_vae_data(cfg.data, 16)
    assert len(ds) == 9 and len(split.train) + len(split.val) == 9


def test_tadiff_data_keys_reach_the_loader(tmp_path):
    from dualdiff.experiments.tadiff import TaDiffConfig, build_tadiff_datasets

    write_procedural_patients(tmp_path, 4, size=16, depth=4, sessions=5)
    _truncate(tmp_path / "sub-002_image.npy")
    cfg = apply_overrides(TaDiffConfig(), ["data.source=npy", f"data.path={tmp_path}", "model.image_size=16",
                                           "data.num_patients=4", "data.val_patients=1"])
    with pytest.raises(DataError, match=r"bad image file '.*sub-002_image\.npy': truncated"):
        build_tadiff_datasets(cfg)
    cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    with pytest.warns(BadDataWarning, match=r"sub-002_image\.npy"):
        train, val = build_tadiff_datasets(cfg)
    assert {p.pid for p in train.patients + val.patients} == {"sub-000", "sub-001", "sub-003"}


# --------------------------------------------------------------------------------------- CLI
def test_cli_prints_one_line_naming_the_file_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    write_procedural_patients(data, 3, size=16, depth=4, sessions=5)
    bad = data / "sub-001_label.npy"
    _truncate(bad)
    out = tmp_path / "run"
    argv = ["tadiff", "train", "--out-dir", str(out), "preset=tiny", "model.image_size=16", "data.source=npy",
            f"data.path={data}", "data.num_patients=3", "data.val_patients=1", "data.depth=4", "train.steps=1"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("dualdiff: error: bad label file ") and repr(str(bad)) in err[0]
    assert "truncated" in err[0] and "data.skip_bad=true" in err[0]
    assert not list(out.rglob("*.pt"))  # nothing was trained
