"""`dualdiff lift ...`: --help on every command; the pipeline end to end on a tiny checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import torch.distributed as dist

from dualdiff.cli_lift import main, register_lift_commands

COMMANDS = ["train", "heatmap", "path", "plot", "generate", "generate-for-fid", "fid", "mse", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["lift", cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and cmd in out


def test_register_into_an_existing_parser(capsys):
    parser = argparse.ArgumentParser(prog="dualdiff")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    register_lift_commands(sub)
    args = parser.parse_args(["lift", "heatmap", "--checkpoint", "c", "--out-dir", "o", "num_points=3"])
    assert args.lift_command == "heatmap" and args.overrides == ["num_points=3"] and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["lift", "spiral"])


def test_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    """train (3 steps) -> heatmap -> path -> plot -> generate -> generate-for-fid -> mse -> fid (no weights)."""
    pytest.importorskip("dualdiff.experiments.lift")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["lift", "train", "--preset", "tiny", "--out-dir", str(run), "train.steps=3", "train.batch_size=4",
                 "data.num_images=16", "train.checkpoint_every=3", "train.log_every=1"]) == 0
    small = ["device=cpu", "num_points=3", "heatmap_samples=2", "probes=1", "cells_per_batch=9", "num_steps=3",
             "fixed_steps=3", "max_jump=2", "grid_images=2", "batch_size=2", "mse_samples=3"]
    assert main(["lift", "heatmap", "--checkpoint", str(run), "--out-dir", str(out), *small]) == 0
    hm = torch.load(out / "heatmap.pt", weights_only=True)
    assert hm["error_64"].shape == (3, 3) and torch.isfinite(hm["error_total"]).all()
    assert (hm["error_total"] > 0).all()
    assert json.loads((out / "heatmap.json").read_text())["meta"]["probes"] == 1
    assert not list(out.glob("heatmap_partial*"))  # the progress file goes once the map is saved

    assert main(["lift", "path", "--heatmap", str(out / "heatmap.pt"), "--out-dir", str(out), *small,
                 "paths=[diagonal, dp_total, dp_64, fixed_total]"]) == 0
    paths = json.loads((out / "paths.json").read_text())["paths"]
    for k in ("dp_total", "dp_64", "greedy_total", "fixed_total", "fixed_64"):
        pts = np.array(paths[k]["points"])
        assert (np.diff(pts, axis=0) >= 0).all()
    p = json.loads((out / "path_dp_total.json").read_text())
    assert len(p["t64"]) == 3 and all(0 <= t < 1000 for t in p["t64"] + p["t32"])

    assert main(["lift", "mse", "--checkpoint", str(run), "--out-dir", str(out), *small]) == 0
    mse = json.loads((out / "mse.json").read_text())
    assert mse["num_samples"] == 3 and mse["test1_both_noisy"]["mse_64"] > 0

    assert main(["lift", "plot", "--heatmap", str(out / "heatmap.pt"), "--out-dir", str(out), "--mse",
                 str(out / "mse.json"), *small]) == 0
    assert Image.open(out / "heatmap.png").size[0] > 500 and (out / "mse.png").exists()

    assert main(["lift", "generate", "--checkpoint", str(run), "--out-dir", str(out), "--heatmap",
                 str(out / "heatmap.pt"), "--path", "diagonal", "--path", str(out / "path_dp_64.json"), *small]) == 0
    assert Image.open(out / "samples_diagonal.png").size == (2 * 64 + 3 * 2, 64 + 2 * 2)
    assert (out / "samples_path_dp_64.png").exists() and (out / "samples.png").exists()

    gen = tmp_path / "gen"
    assert main(["lift", "generate-for-fid", "--checkpoint", str(run), "--out-dir", str(gen), "--path", "dp_total",
                 "--heatmap", str(out / "heatmap.pt"), "-n", "3", *small]) == 0
    files = sorted(os.listdir(gen))
    assert files == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(gen / files[0]).size == (64, 64)

    capsys.readouterr()
    assert main(["lift", "fid", str(gen), str(gen), "--no-download", "--device", "cpu"]) == 2
    assert "--inception-weights" in capsys.readouterr().out


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed")
def test_heatmap_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m dualdiff lift heatmap`: each rank computes every other cell
    and writes its shard, rank 0 merges; the merged map equals the single-process one."""
    run = tmp_path / "run"
    assert main(["lift", "train", "--preset", "tiny", "--out-dir", str(run), "train.steps=2", "train.batch_size=4",
                 "data.num_images=8", "train.checkpoint_every=2"]) == 0
    small = ["device=cpu", "num_points=3", "heatmap_samples=2", "probes=2", "cells_per_batch=2"]
    assert main(["lift", "heatmap", "--checkpoint", str(run), "--out-dir", str(tmp_path / "one"), *small]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dualdiff",
           "lift", "heatmap", "--checkpoint", str(run), "--out-dir", str(tmp_path / "two"), *small]
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
