"""`dualdiff lift ...`: --help on every command; the pipeline end to end on a tiny checkpoint;
the shared options (preset=, --show-config, --resume); every kind of user error -> one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from dualdiff.cli import main
from dualdiff.cli_lift import register_lift_commands
from dualdiff.experiments.lift import LIFTConfig

COMMANDS = ["train", "heatmap", "path", "plot", "generate", "generate-for-fid", "fid", "mse", "demo"]
# a LIFT training run small enough for a shared CPU
TRAIN_SMALL = ["preset=tiny", "train.steps=2", "train.batch_size=2", "data.num_images=8", "model.channels=[8, 16]",
               "train.log_every=1"]
# analysis keys of the same size
SMALL = ["device=cpu", "num_points=3", "heatmap_samples=2", "probes=1", "cells_per_batch=9", "num_steps=3",
         "fixed_steps=3", "max_jump=2", "grid_images=2", "batch_size=2", "mse_samples=3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny trained run shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("lift") / "run"
    assert main(["lift", "train", "--out-dir", str(run), *TRAIN_SMALL]) == 0
    return run


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lift", cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and cmd in out
    if cmd not in ("plot",):
        assert "--show-config" in out and "--device" in out and "key=value" in out
    assert ("--resume" in out) == (cmd == "train")


def test_register_into_an_existing_parser():
    parser = argparse.ArgumentParser(prog="dualdiff")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    register_lift_commands(sub)
    args = parser.parse_args(["lift", "heatmap", "--checkpoint", "c", "--out-dir", "o", "num_points=3"])
    assert args.lift_command == "heatmap" and args.overrides == ["num_points=3"] and callable(args.func)
    args = parser.parse_args(["lift", "fid", "a", "b", "fid_dims=64"])  # folders first, keys after
    assert (args.folder_a, args.folder_b, args.overrides) == ("a", "b", ["fid_dims=64"])
    with pytest.raises(SystemExit):
        parser.parse_args(["lift", "spiral"])


def test_readme_train_example_and_resume(tmp_path, capsys):
    """The README's `dualdiff lift train preset=tiny train.lr=2e-4 --out-dir ...` (tiny sizes
    appended), then `--resume` continues the run to a later step."""
    run = tmp_path / "run"
    argv = ["lift", "train", "preset=tiny", "train.lr=2e-4", "--out-dir", str(run), *TRAIN_SMALL[1:]]
    assert main(argv) == 0
    cfg = json.loads(json.dumps(torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=True)["run_config"]))
    assert cfg["train"]["lr"] == 2e-4 and cfg["model"]["channels"] == [8, 16]
    assert cfg["train"]["min_lr"] == LIFTConfig.from_name("tiny").train.min_lr  # not rewritten from another key
    capsys.readouterr()
    assert main([*argv, "train.steps=4", "--resume"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))[-1] == "step_00000004.pt"


def test_show_config_lists_keys_with_types_defaults_and_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lift", "train", "preset=tiny", "train.lr=3e-4", "--device", "cpu", "--show-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(preset tiny)" in out
    assert "train.lr: float = 0.0001 -> 0.0003" in out and "train.device: str = 'auto' -> 'cpu'" in out
    assert "train.min_lr: float" in out and "\nmin_lr" not in out
    # key=value words on both sides of options (cli.main gathers the ones after them)
    with pytest.raises(SystemExit):
        main(["lift", "train", "preset=tiny", "--device", "cpu", "train.lr=5e-4", "--show-config", "train.steps=9"])
    out = capsys.readouterr().out
    assert "train.lr: float = 0.0001 -> 0.0005" in out and "train.steps: int = 7000 -> 9" in out
    with pytest.raises(SystemExit):
        main(["lift", "demo", "lift.train.steps=7", "--show-config"])
    out = capsys.readouterr().out
    assert "lift.train.steps: int" in out and "-> 7" in out and "analysis.num_steps: int" in out


def test_pipeline_end_to_end(run_dir, tmp_path, monkeypatch, capsys):
    """heatmap -> path -> mse -> plot (reads paths.json) -> generate -> generate-for-fid -> fid (no weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    run, out = run_dir, tmp_path / "out"
    assert main(["lift", "heatmap", "--checkpoint", str(run), "--out-dir", str(out), *SMALL]) == 0
    hm = torch.load(out / "heatmap.pt", weights_only=True)
    assert hm["error_64"].shape == (3, 3) and torch.isfinite(hm["error_total"]).all()
    assert (hm["error_total"] > 0).all()
    meta = json.loads((out / "heatmap.json").read_text())["meta"]
    assert meta["probes"] == 1 and meta["image_size"] == 32
    assert not list(out.glob("heatmap_partial*"))  # the progress file goes once the map is saved

    assert main(["lift", "path", "--heatmap", str(out / "heatmap.pt"), "--out-dir", str(out), *SMALL,
                 "paths=[diagonal, dp_total, dp_64, fixed_total]"]) == 0
    paths = json.loads((out / "paths.json").read_text())["paths"]
    for k in ("dp_total", "dp_64", "greedy_total", "fixed_total", "fixed_64"):
        pts = np.array(paths[k]["points"])
        assert (np.diff(pts, axis=0) >= 0).all()
    p = json.loads((out / "path_dp_total.json").read_text())
    assert len(p["t64"]) == 3 and all(0 <= t < 1000 for t in p["t64"] + p["t32"])

    assert main(["lift", "mse", "--checkpoint", str(run), "--out-dir", str(out), *SMALL]) == 0
    mse = json.loads((out / "mse.json").read_text())
    assert mse["num_samples"] == 3 and mse["test1_both_noisy"]["mse_64"] > 0
    assert mse["image_size"] == 32 and "MSE 32x32  MSE 16x16" in capsys.readouterr().out

    saved = (out / "paths.json").read_bytes()
    mtime = (out / "paths.json").stat().st_mtime_ns
    assert main(["lift", "plot", "--heatmap", str(out / "heatmap.pt"), "--out-dir", str(out), "--mse",
                 str(out / "mse.json")]) == 0
    assert Image.open(out / "heatmap.png").size[0] > 500 and (out / "mse.png").exists()
    assert (out / "paths.json").read_bytes() == saved and (out / "paths.json").stat().st_mtime_ns == mtime

    assert main(["lift", "generate", "--checkpoint", str(run), "--out-dir", str(out), "--heatmap",
                 str(out / "heatmap.pt"), *SMALL, f"paths=[diagonal, {out / 'path_dp_64.json'}]"]) == 0
    s = LIFTConfig.from_name("tiny").model.image_size  # 32: the run samples at its own size
    assert Image.open(out / "samples_diagonal.png").size == (2 * s + 3 * 2, s + 2 * 2)
    assert (out / "samples_path_dp_64.png").exists() and (out / "samples.png").exists()

    gen = tmp_path / "gen"
    assert main(["lift", "generate-for-fid", "--checkpoint", str(run), "--out-dir", str(gen),
                 "--heatmap", str(out / "heatmap.pt"), *SMALL, "fid_path=dp_total", "num_images=3"]) == 0
    files = sorted(os.listdir(gen))
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(gen / files[0]).size == (s, s)

    capsys.readouterr()
    assert main(["lift", "fid", str(gen), str(gen), "fid_download=false", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:") and "inception_weights" in err[0]


def test_plot_draws_the_saved_paths_not_recomputed_ones(run_dir, tmp_path):
    """run_plot reads paths.json: an edited path is what gets drawn (and the file is left alone)."""
    from dualdiff.experiments.lift_analysis import LIFTAnalysisConfig, load_grid_paths, run_paths, run_plot

    out = tmp_path / "out"
    hm = _heatmap(3)
    cfg = LIFTAnalysisConfig(num_points=3, fixed_steps=3, max_jump=2, paths=[])
    run_paths(hm, out, cfg)
    raw = json.loads((out / "paths.json").read_text())
    raw["paths"] = {"mine": {**raw["paths"]["dp_total"], "points": [[0, 2], [1, 2], [2, 2]]}}
    (out / "paths.json").write_text(json.dumps(raw))
    loaded = load_grid_paths(out / "paths.json")
    assert list(loaded) == ["mine"] and loaded["mine"].points.tolist() == [[0, 2], [1, 2], [2, 2]]
    run_plot(hm, out)
    assert json.loads((out / "paths.json").read_text()) == raw
    raw["paths"]["mine"]["points"] = [[0, 0], [5, 5]]
    (out / "paths.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="do not fit the 3x3 heatmap"):
        run_plot(hm, out)


def _heatmap(n: int):
    """A made-up n x n heatmap (random positive errors)."""
    from dualdiff.analysis.heatmap import HeatmapResult

    g = torch.logspace(-2, 2, n, dtype=torch.float64)
    e = torch.rand(2, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) + 0.1
    return HeatmapResult(gammas=g, timesteps=torch.linspace(900, 100, n).long(), snr=g, error_64=e[0], error_32=e[1],
                         computed=torch.ones(n, n, dtype=torch.bool), meta={"target": "x0"})


def _user_error(argv, capsys, *words):
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualdiff: error: "), captured.err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_user_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    # bad key (with a suggestion), bad value, unknown preset, missing --config file
    _user_error(["lift", "train", "--out-dir", out, "preset=tiny", "train.lrr=1"], capsys, "train.lrr", "train.lr")
    _user_error(["lift", "train", "--out-dir", out, "train.lr=fast"], capsys, "train.lr", "float")
    _user_error(["lift", "train", "--out-dir", out, "preset=huge"], capsys, "huge", "tiny")
    _user_error(["lift", "train", "--out-dir", out, "--config", str(tmp_path / "none.yaml")], capsys, "none.yaml")
    _user_error(["lift", "heatmap", "--checkpoint", str(run_dir), "--out-dir", out, "num_points=1"], capsys,
                "num_points")
    # one thing named twice
    _user_error(["lift", "train", "--out-dir", out, "train.out_dir=elsewhere"], capsys, "--out-dir", "train.out_dir")
    _user_error(["lift", "demo", "--out-dir", out, "analysis.device=cpu"], capsys, "analysis.device", "device=cpu")
    # missing files: checkpoint, resume checkpoint, heatmap, paths.json, image folder
    _user_error(["lift", "heatmap", "--checkpoint", str(tmp_path / "nope"), "--out-dir", out, *SMALL], capsys, "nope")
    _user_error(["lift", "train", "--out-dir", out, *TRAIN_SMALL, "--resume", str(tmp_path / "c.pt")], capsys,
                "c.pt")
    _user_error(["lift", "path", "--heatmap", str(tmp_path / "hm.pt"), "--out-dir", out], capsys, "hm.pt")
    hm_dir = tmp_path / "hm"
    hm_dir.mkdir()
    _heatmap(2).save(hm_dir / "heatmap")
    _user_error(["lift", "plot", "--heatmap", str(hm_dir / "heatmap.pt"), "--out-dir", str(hm_dir)], capsys,
                "paths.json", "dualdiff lift path")
    _user_error(["lift", "fid", str(tmp_path / "a"), str(tmp_path / "b")], capsys, "does not exist")
    # a corrupt checkpoint
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _user_error(["lift", "mse", "--checkpoint", str(bad), "--out-dir", out, *SMALL], capsys, "bad.pt")
    # missing FID weights (no download)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    _user_error(["lift", "fid", str(tmp_path / "a"), str(tmp_path / "a"), "fid_download=false",
                 f"inception_weights={tmp_path / 'w.pth'}"], capsys, "w.pth")
    # --debug shows the traceback instead
    with pytest.raises(FileNotFoundError):
        main(["--debug", "lift", "path", "--heatmap", str(tmp_path / "hm.pt"), "--out-dir", out])


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed")
def test_heatmap_under_torchrun_equals_one_process(run_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m dualdiff lift heatmap`: each rank computes every other cell
    and writes its shard, rank 0 merges after torch.distributed's barrier; the merged map
    equals the single-process one."""
    small = ["device=cpu", "num_points=3", "heatmap_samples=2", "probes=2", "cells_per_batch=2"]
    assert main(["lift", "heatmap", "--checkpoint", str(run_dir), "--out-dir", str(tmp_path / "one"), *small]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dualdiff",
           "lift", "heatmap", "--checkpoint", str(run_dir), "--out-dir", str(tmp_path / "two"), *small]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "two").glob("heatmap_shard*.pt"))
    assert shards == ["heatmap_shard000of002.pt", "heatmap_shard001of002.pt"]
    assert not list((tmp_path / "two").glob("heatmap_partial*"))
    counts = [int(torch.load(tmp_path / "two" / s, weights_only=True)["computed"].sum()) for s in shards]
    assert counts == [5, 4]
    one = torch.load(tmp_path / "one" / "heatmap.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "heatmap.pt", weights_only=True)
    assert two["meta"]["merged_from"] == 2 and bool(two["computed"].all())
    torch.testing.assert_close(two["error_64"], one["error_64"], rtol=1e-5, atol=0)
    torch.testing.assert_close(two["error_32"], one["error_32"], rtol=1e-5, atol=0)


def test_cli_hides_torchs_own_jit_script_deprecation(capsys):
    """torch's first forward-mode jvp scripts its decompositions and warns about torch.jit.script;
    the CLI filters exactly that warning (issued by torch.jit._script), nothing else."""
    import warnings

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            main(["lift", "train", "preset=tiny", "--show-config"])
        torch.jit.script(f)
        warnings.warn("`torch.jit.script` is deprecated (from elsewhere)", FutureWarning)
    capsys.readouterr()
    messages = [str(w.message) for w in seen if issubclass(w.category, FutureWarning)]
    assert messages == ["`torch.jit.script` is deprecated (from elsewhere)"]
