"""dualdiff.study.runner: runs = arms x seeds, resumable (finished runs skipped, failed and
crashed ones redone), failures reported, and 2 torchrun ranks (gloo, CPU) sharing the runs
with one report from rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from dualdiff.errors import ConfigError
from dualdiff.study import Claim, Comparison, Metric, Study, run_study
from dualdiff.study.runner import plan_runs, run_dir, shard
from dualdiff.study.stats import INCONCLUSIVE, SUPPORTED

ARMS = ["base", "better", "worse"]


def metric_value(arm: str, seed: int) -> float:
    """A seed effect shared by all arms (common random numbers) plus a per-arm shift."""
    shift = {"base": 0.0, "better": -0.5, "worse": 0.4}[arm]
    return 1.0 + 0.3 * ((seed * 7919) % 5) + shift + 0.01 * ((seed * 31 + len(arm)) % 3)


def make_study(calls: list, seeds=(0, 1, 2, 3), fail: set | None = None, drop: set | None = None,
               fingerprint: str = "f1") -> Study:
    fail, drop = fail or set(), drop or set()

    def execute(seed, arms, work_dir):
        calls.append((seed, tuple(arms)))
        assert "WORLD_SIZE" not in os.environ  # the experiment runs as one process
        if seed in fail:
            raise RuntimeError(f"boom at seed {seed}")
        return {a: {"score": metric_value(a, seed), "extra": "x"} for a in arms
                if (a, seed) not in drop}

    return Study(
        name="fake", arms=list(ARMS), seeds=list(seeds), metrics=[Metric("score", "score")],
        execute=execute,
        claims=[Claim("better<base", "better lowers the score", "better", "base", "score",
                      "lower", cited="seed: -0.5"),
                Claim("worse<base", "worse lowers the score", "worse", "base", "score", "lower")],
        comparisons=[Comparison("better", "base", "score")],
        cited={("base", "score"): 1.0}, fingerprint=fingerprint)


def test_plan_and_shard_round_robin():
    runs = plan_runs(ARMS, [5, 6])
    assert [(r.index, r.arm, r.seed) for r in runs[:4]] == [
        (0, "base", 5), (1, "better", 5), (2, "worse", 5), (3, "base", 6)]
    parts = [shard(runs, r, 2) for r in range(2)]
    assert [r.index for r in parts[0]] == [0, 2, 4]
    assert sorted(r.index for p in parts for r in p) == list(range(6))
    with pytest.raises(ValueError):
        shard(runs, 2, 2)


def test_rerun_skips_finished_runs(tmp_path):
    calls: list = []
    rep = run_study(make_study(calls), tmp_path, progress=False)
    assert [c[0] for c in calls] == [0, 1, 2, 3]          # one batch per seed
    assert all(c[1] == tuple(ARMS) for c in calls)
    assert rep["complete"] and len(rep["runs"]) == 12
    for r in plan_runs(ARMS, [0, 1, 2, 3]):
        res = json.loads((run_dir(tmp_path, r) / "result.json").read_text())
        assert res["metrics"]["score"] == pytest.approx(metric_value(r.arm, r.seed))
        assert res["info"]["extra"] == "x"
    verdicts = {c["name"]: c["verdict"] for c in rep["claims"]}
    assert verdicts == {"better<base": SUPPORTED, "worse<base": "contradicted"}
    for f in ("study.md", "study.json", "study.png"):
        assert (tmp_path / f).is_file()

    calls.clear()
    rep2 = run_study(make_study(calls), tmp_path, progress=False)
    assert calls == []                                     # nothing redone
    assert all(r["cached"] for r in rep2["runs"])
    assert rep2["claims"] == rep["claims"]


def test_failed_run_is_reported_then_redone(tmp_path):
    calls: list = []
    rep = run_study(make_study(calls, fail={2}, drop={("worse", 1)}), tmp_path, progress=False)
    failed = {f["run"] for f in rep["failed_runs"]}
    assert failed == {"base/seed_2", "better/seed_2", "worse/seed_2", "worse/seed_1"}
    assert not rep["complete"]
    assert "boom at seed 2" in json.loads(
        (tmp_path / "runs/base/seed_2/error.json").read_text())["error"]
    assert "no result for arm 'worse'" in rep["runs"][5]["error"]
    # every arm stays in the report, and claims missing a seed are inconclusive
    assert set(rep["arm_results"]) == set(ARMS)
    assert rep["arm_results"]["better"]["score"]["missing_seeds"] == [2]
    assert {c["verdict"] for c in rep["claims"]} == {INCONCLUSIVE}
    md = (tmp_path / "study.md").read_text()
    assert "INCOMPLETE: 4 of 12 runs failed" in md and "worse/seed_1" in md
    assert "| worse | " in md and "no value for seeds [1, 2]" in md

    calls.clear()
    rep2 = run_study(make_study(calls), tmp_path, progress=False)
    assert sorted(calls) == [(1, ("worse",)), (2, tuple(ARMS))]   # only the failed runs
    assert rep2["complete"] and rep2["failed_runs"] == []
    assert not (tmp_path / "runs/base/seed_2/error.json").exists()
    assert {c["name"]: c["verdict"] for c in rep2["claims"]}["better<base"] == SUPPORTED


def test_crashed_run_is_redone(tmp_path):
    calls: list = []
    run_study(make_study(calls), tmp_path, progress=False, write=False)
    runs = plan_runs(ARMS, [0, 1, 2, 3])
    # a run killed before its result was written (none), and one whose file is cut short
    (run_dir(tmp_path, runs[4]) / "result.json").unlink()
    (run_dir(tmp_path, runs[7]) / "result.json").write_text('{"arm": "better", "se')
    calls.clear()
    rep = run_study(make_study(calls), tmp_path, progress=False, write=False)
    assert sorted(calls) == [(1, (runs[4].arm,)), (2, (runs[7].arm,))]
    assert rep["complete"]


def test_rerun_with_other_config_or_fewer_seeds_is_refused(tmp_path):
    run_study(make_study([], seeds=(0, 1)), tmp_path, progress=False, write=False)
    with pytest.raises(ConfigError, match="another config"):
        run_study(make_study([], seeds=(0, 1), fingerprint="f2"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"seeds \[1\]"):
        run_study(make_study([], seeds=(0,)), tmp_path, progress=False)
    calls: list = []
    rep = run_study(make_study(calls, seeds=(0, 1, 2)), tmp_path, progress=False,
                    write=False)  # more seeds: fine
    assert calls == [(2, tuple(ARMS))] and rep["seeds"] == [0, 1, 2]


def test_threads_setting_applies_only_while_runs_execute(tmp_path):
    import torch

    seen = []
    study = make_study([], seeds=(0, 1))
    inner = study.execute
    study.execute = lambda s, a, w: (seen.append(torch.get_num_threads()), inner(s, a, w))[1]
    before = torch.get_num_threads()
    study.threads = 1 if before != 1 else 2
    run_study(study, tmp_path, progress=False, write=False)
    assert seen == [study.threads] * 2 and torch.get_num_threads() == before


WORKER = textwrap.dedent('''
    import os, sys
    import torch.distributed as dist
    sys.path.insert(0, os.environ["STUDY_TEST_DIR"])
    from test_study_runner import make_study
    from dualdiff.study import run_study

    study = make_study([])
    inner = study.execute
    def execute(seed, arms, work_dir):
        assert not dist.is_initialized()   # no DDP group while the experiment runs
        out = inner(seed, arms, work_dir)
        for a in out:
            out[a]["rank"] = int(os.environ["LOCAL_RANK"])
        return out
    study.execute = execute
    rep = run_study(study, sys.argv[1], progress=False)
    rank = int(os.environ["RANK"])
    assert (rep is None) == (rank != 0)
    open(os.path.join(sys.argv[1], f"done{rank}"), "w").write("ok")
''')


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_two_ranks_share_the_runs_and_rank0_reports(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "study"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", STUDY_TEST_DIR=str(Path(__file__).parent),
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "done0").is_file() and (out / "done1").is_file()
    rep = json.loads((out / "study.json").read_text())
    assert rep["timing"]["world_size"] == 2
    assert len(rep["runs"]) == 12 and rep["complete"]
    for r in rep["runs"]:
        assert r["info"]["rank"] == r["index"] % 2        # round-robin by run index
        assert r["metrics"]["score"] == pytest.approx(metric_value(r["arm"], r["seed"]))
    assert {c["name"]: c["verdict"] for c in rep["claims"]}["better<base"] == SUPPORTED
    assert sorted(p.name for p in out.glob("study.*")) == ["study.json", "study.md", "study.png"]
