"""Checkpoints: atomic writes under a simulated crash, weights_only loading, clear errors
for missing / corrupt / foreign / incompatible files, pruning, RNG round trip."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from dualdiff.train import (CheckpointError, TrainConfig, Trainer, atomic_save, latest_checkpoint,
                            list_checkpoints, load_checkpoint, save_checkpoint)
from dualdiff.train.checkpoint import find_resumable
from dualdiff.train.state import rng_state as _rng_state, set_rng_state as _set_rng_state


def _dataset(n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _mlp(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))


def mse(model, batch):
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _trainer(tmp_path, model=None, **kw):
    cfg = dict(steps=6, batch_size=8, lr=1e-2, out_dir=str(tmp_path), progress=False,
               checkpoint_every=3, ema_decay=0.9, scheduler="cosine")
    cfg.update(kw)
    return Trainer(model or _mlp(), mse, _dataset(), TrainConfig(**cfg))


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    tr = _trainer(tmp_path)
    tr.fit()
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step_00000006.pt"
    state = torch.load(path, weights_only=True)  # plain torch, no allowlisting needed
    assert state["step"] == 6 and state["config"]["lr"] == 1e-2
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "data", "counters"):
        assert state[key] is not None, key
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["data"] == {"kind": "dataset", "epoch": 1, "batch_in_epoch": 2}
    assert (tmp_path / "config.yaml").read_text().startswith("steps: 6")


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, steps=6)
    tr.fit(until=3)
    good = tmp_path / "checkpoints/step_00000003.pt"
    good_bytes = good.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # bytes reach the file, then the "power cut"
        f.truncate(f.tell() // 2)
        raise OSError("simulated crash during checkpoint write")

    # crash while overwriting the same file, and while writing the next one
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_save({"format": "x"}, good)
    with pytest.raises(OSError, match="simulated crash"):
        tr.fit(until=6)
    monkeypatch.setattr(torch, "save", real_save)
    assert good.read_bytes() == good_bytes
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003.pt"]
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.endswith(".tmp")]
    # and the run resumes from it
    resumed = _trainer(tmp_path, resume="latest")
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == 6 and latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006.pt"


def test_crash_at_rename_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"a": torch.ones(3)}, path)

    def bad_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", bad_replace)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]


def _make_valid(tmp_path):
    tr = _trainer(tmp_path / "run", steps=3)
    tr.fit()
    return latest_checkpoint(tmp_path / "run/checkpoints")


class Foreign:
    pass


@pytest.mark.parametrize("kind, exc, needle", [
    ("missing", FileNotFoundError, "does not exist; checkpoints in"),
    ("empty", CheckpointError, "is empty (0 bytes)"),
    ("truncated", CheckpointError, "corrupt or truncated"),
    ("garbage", CheckpointError, "corrupt or truncated"),
    ("pickle_class", CheckpointError, "weights_only loading refuses"),
    ("tensor", CheckpointError, "holds a Tensor"),
    ("foreign_dict", CheckpointError, "is not a dualdiff training checkpoint"),
    ("future_version", CheckpointError, "format version 99"),
    ("directory", CheckpointError, "is a directory"),
])
def test_bad_checkpoint_files_give_clear_errors(tmp_path, kind, exc, needle):
    valid = _make_valid(tmp_path)
    bad = valid.parent / "step_00000099.pt"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    elif kind == "garbage":
        bad.write_bytes(os.urandom(1000))
    elif kind == "pickle_class":
        torch.save({"format": "x", "obj": Foreign()}, bad)
    elif kind == "tensor":
        torch.save(torch.ones(2), bad)
    elif kind == "foreign_dict":
        torch.save({"state_dict": {}}, bad)
    elif kind == "future_version":
        state = torch.load(valid, weights_only=True)
        state["version"] = 99
        torch.save(state, bad)
    elif kind == "directory":
        bad.mkdir()
    with pytest.raises(exc) as e:
        load_checkpoint(bad)
    assert needle in str(e.value) and "step_00000099.pt" in str(e.value)
    # resume='latest' skips a corrupt newest checkpoint with a warning, uses the good one
    if kind in ("truncated", "garbage", "empty"):
        with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
            path, _ = find_resumable(valid.parent)
        assert path == valid


def test_incompatible_checkpoints(tmp_path):
    valid = _make_valid(tmp_path)
    with pytest.raises(CheckpointError, match="(?s)does not fit this model.*size mismatch"):
        _trainer(tmp_path / "other", model=_mlp(width=16), resume=str(valid))
    with pytest.raises(CheckpointError, match="OneCycleLR.*LambdaLR|LambdaLR.*OneCycleLR"):
        _trainer(tmp_path / "other2", resume=str(valid), scheduler="onecycle")
    with pytest.raises(CheckpointError, match="data of kind 'dataset'"):
        Trainer(_mlp(), mse, lambda i, g: (torch.randn(8, 4), torch.randn(8, 1)),
                TrainConfig(steps=6, batch_size=8, out_dir=str(tmp_path / "o3"), progress=False,
                            ema_decay=0.9, scheduler="cosine", resume=str(valid)))
    with pytest.raises(CheckpointError, match="beyond config.steps=2"):
        _trainer(tmp_path / "o4", resume=str(valid), steps=2)
    with pytest.raises(FileNotFoundError, match="resume='latest' but no checkpoint"):
        _trainer(tmp_path / "empty", resume="latest")
    assert _trainer(tmp_path / "fresh", resume="auto").step == 0
    with pytest.warns(RuntimeWarning, match="changed config: batch_size"):
        Trainer(_mlp(), mse, _dataset(), TrainConfig(
            steps=6, batch_size=4, lr=1e-2, out_dir=str(tmp_path / "o5"), progress=False,
            ema_decay=0.9, scheduler="cosine", resume=str(valid)))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint({"model": {}}, tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000005.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 5


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leave a cached gaussian in numpy's legacy state
    atomic_save(_rng_state(), tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # must survive weights_only
    a = (torch.rand(3), np.random.randn(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    _set_rng_state(state)
    b = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --- crash safety (issue 19 item 3) ---------------------------------------------------------

def test_pruning_never_deletes_the_checkpoint_just_written_nor_newer(tmp_path):
    d = tmp_path / "checkpoints"
    save_checkpoint({"model": {}}, d, 1000, keep_last=1)
    (d / "step_00002000.pt").write_bytes(b"garbage from another run")  # unreadable, newer
    save_checkpoint({"model": {}}, d, 1500, keep_last=1)
    # 1000 is pruned (older), 1500 (just written) and 2000 (newer) stay
    assert [p.name for p in list_checkpoints(d)] == ["step_00001500.pt", "step_00002000.pt"]
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint.*step_00002000"):
        path, state = find_resumable(d)
    assert path.name == "step_00001500.pt" and state["step"] == 1500
    # keep_last=2 keeps the two newest at or below the step just written
    for step in (1600, 1700):
        save_checkpoint({"model": {}}, d, step, keep_last=2)
    assert [p.name for p in list_checkpoints(d)] == [
        "step_00001600.pt", "step_00001700.pt", "step_00002000.pt"]


def test_resume_auto_over_unloadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "step_00000003.pt").write_bytes(b"")
    (d / "step_00000006.pt").write_bytes(os.urandom(100))
    for resume in ("auto", "latest"):
        with pytest.warns(RuntimeWarning, match="skipping unreadable"):
            with pytest.raises(CheckpointError) as e:
                _trainer(tmp_path, resume=resume)
        msg = str(e.value)
        assert "step_00000003.pt" in msg and "step_00000006.pt" in msg
        assert "--resume PATH" in msg and "move these files away" in msg
    from dualdiff.errors import UserError
    assert isinstance(e.value, UserError)


def test_stale_tmp_of_a_killed_write_is_removed_at_start_with_a_warning(tmp_path):
    tr = _trainer(tmp_path, steps=3)
    tr.fit()
    d = tmp_path / "checkpoints"
    stale = d / ".step_00000006.pt.k2j4x9_a.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    other = d / "notes.tmp"  # not the checkpoint writer's: left alone
    other.write_text("x")
    with pytest.warns(RuntimeWarning, match=r"removed 1 partial checkpoint file\(s\).*"
                                            r"\.step_00000006\.pt\.k2j4x9_a\.tmp"):
        resumed = _trainer(tmp_path, steps=6, resume="auto")
    assert not stale.exists() and other.exists() and resumed.step == 3


def test_read_jsonl_drops_a_torn_last_line_and_names_a_torn_middle_line(tmp_path):
    from dualdiff.errors import DataError
    from dualdiff.train import read_jsonl

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match="dropped the torn last line 3"):
        assert [r["step"] for r in read_jsonl(p)] == [1, 2]
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.3}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2 is not valid JSON"):
        read_jsonl(p)


def test_torn_metrics_line_is_truncated_on_resume_and_appends_stay_valid(tmp_path):
    from dualdiff.train import read_jsonl

    tr = _trainer(tmp_path, steps=6, checkpoint_every=3)
    tr.fit(until=4, save_final=False)  # killed after logging step 4
    tr.close()
    jl, csv_path = tmp_path / "metrics.jsonl", tmp_path / "metrics.csv"
    with open(jl, "a") as f:  # the crash: half of step 5's line
        f.write('{"step": 5, "loss": 0.12')
    with open(csv_path, "a") as f:
        f.write("5,0.1")
    with pytest.warns(RuntimeWarning, match="dropped a torn last line"):
        resumed = _trainer(tmp_path, steps=6, checkpoint_every=3, resume="auto")
    assert resumed.step == 3
    resumed.fit()
    recs = read_jsonl(jl)  # no warning, no error: every line complete
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert jl.read_text().endswith("}\n")
    import csv
    with open(csv_path, newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def _big_state(n_bytes):
    return {"model": {"w": torch.zeros(n_bytes // 4)}}


def _assert_disk_full_error(err, directory, needed):
    msg = str(err)
    assert "\n" not in msg
    assert str(directory) in msg and "step_00000007.pt" in msg
    assert f"{needed:,}" in msg  # the bytes the tensors need
    assert not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_file_size_limit_is_one_checkpoint_error_and_leaves_no_tmp(tmp_path):
    import resource
    import signal

    d = tmp_path / "checkpoints"
    save_checkpoint({"model": {}}, d, 6)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(_big_state(4 << 20), d, 7, keep_last=1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert "file size limit" in str(e.value)
    _assert_disk_full_error(e.value, d, 4 << 20)
    assert [p.name for p in list_checkpoints(d)] == ["step_00000006.pt"]
    assert load_checkpoint(d / "step_00000006.pt")["step"] == 6


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount(8)); skipped where it cannot be mounted."""
    import shutil
    import subprocess

    d = tmp_path / "small_disk"
    d.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the RLIMIT_FSIZE test covers it")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_full_disk_is_one_checkpoint_error_and_leaves_no_tmp(tiny_tmpfs):
    d = tiny_tmpfs / "checkpoints"
    save_checkpoint({"model": {}}, d, 6)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(_big_state(4 << 20), d, 7, keep_last=1)
    assert "no space left on the device" in str(e.value)
    assert "inline_container" not in str(e.value)
    _assert_disk_full_error(e.value, d, 4 << 20)
    assert [p.name for p in list_checkpoints(d)] == ["step_00000006.pt"]


def test_trainer_state_dict_round_trips_through_load_state(tmp_path):
    import copy

    a = _trainer(tmp_path / "a", steps=6, checkpoint_every=0)
    a.fit(until=3)
    state = copy.deepcopy(a.state_dict())
    assert state["step"] == 3
    b = _trainer(tmp_path / "b", steps=6, checkpoint_every=0)
    b.load_state(state)
    assert b.step == 3
    a.fit()
    b.fit()
    sa, sb = a.state_dict(), b.state_dict()
    for k in ("model", "optimizer", "ema"):
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert sa["scheduler"] == sb["scheduler"] and sa["data"] == sb["data"]
    assert [r["loss"] for r in a.history[3:]] == [r["loss"] for r in b.history]
    with pytest.raises(CheckpointError, match="has no 'step'"):
        b.load_state({k: v for k, v in state.items() if k != "step"})
