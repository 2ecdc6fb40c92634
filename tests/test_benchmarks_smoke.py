"""The GPU report's code path on the CPU at smoke sizes (``gpu_report.py --device cpu --smoke``),
so that gpu_report.py and every bench module's ``gpu_rows`` cannot rot unseen between GPU runs;
its failure handling (non-zero exit, rows kept as they come); and ``pytest --benchmark-only``."""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", BENCH / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| op |")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_report_smoke_on_cpu_covers_every_bench_module(tmp_path, capsys):
    report = _gpu_report()
    out = tmp_path / "rows.json"
    assert report.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    with_rows = {p.stem for p in BENCH.glob("bench_*.py") if "\ndef gpu_rows(" in p.read_text()}
    assert with_rows >= {"bench_weighted_dice", "bench_vae_loss", "bench_timestep_embedding", "bench_lift"}
    assert {r["module"] for r in data["rows"]} == with_rows and data["failed"] == []
    for r in data["rows"]:
        assert r["time_us"] > 0 and r["op"] and r["variant"] and r["shape"], r
    # every (op, shape) group has its eager baseline, and the printed table has one line per row
    groups = {(r["op"], r["shape"]) for r in data["rows"]}
    eager = {(r["op"], r["shape"]) for r in data["rows"] if r["variant"] == "eager"}
    assert eager == groups - {(r["op"], r["shape"]) for r in data["rows"] if r["op"] == "frechet_distance"}
    printed = _table_rows(capsys.readouterr().out)
    assert len(printed) == len(data["rows"])
    assert all(row[2] != "FAILED" for row in printed)


def _fake(name: str, gpu_rows) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.gpu_rows = gpu_rows
    return mod


def test_report_keeps_rows_and_exits_nonzero_when_an_op_fails(tmp_path, capsys, monkeypatch):
    report = _gpu_report()

    def good(timeit, device, smoke=False):
        yield {"op": "good_op", "variant": "eager", "shape": "s", "time_us": timeit(lambda: None), "bytes": 8}

    def half(timeit, device, smoke=False):  # one row measured, then a crash
        yield {"op": "half_op", "variant": "eager", "shape": "s", "time_us": 2.0, "bytes": None}
        raise RuntimeError("kernel exploded")

    def good_after(timeit, device, smoke=False):
        return [{"op": "after_op", "variant": "fast", "shape": "s", "time_us": 1.0, "bytes": None}]

    mods = [_fake("bench_good", good), _fake("bench_half", half), _fake("bench_after", good_after)]
    monkeypatch.setattr(report, "load_bench_modules", lambda only=None, skip=(): mods)
    out = tmp_path / "rows.json"
    assert report.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    printed = _table_rows(captured.out)
    assert [row[0] for row in printed] == ["good_op", "half_op", "bench_half", "after_op"]
    assert printed[2][2] == "FAILED" and "kernel exploded" in printed[2][7]
    assert "kernel exploded" in captured.err and "bench_half" in captured.err
    data = json.loads(out.read_text())
    assert [r["op"] for r in data["rows"]] == ["good_op", "half_op", "after_op"]
    assert data["failed"][0]["module"] == "bench_half"


def test_report_refuses_a_module_without_smoke_sizes(capsys, monkeypatch):
    report = _gpu_report()
    monkeypatch.setattr(report, "load_bench_modules",
                        lambda only=None, skip=(): [_fake("bench_old", lambda timeit, device: [])])
    assert report.main(["--device", "cpu", "--smoke"]) == 1
    assert "no smoke parameter" in capsys.readouterr().out


def test_report_bad_arguments():
    report = _gpu_report()
    assert report.main(["--device", "mps"]) == 2
    with pytest.raises(SystemExit, match="bench_nope"):
        report.main(["--device", "cpu", "--smoke", "--only", "bench_nope"])


def test_benchmark_only_runs_the_benchmarks(tmp_path):
    """``pytest --benchmark-only`` collects bench_*.py and times them (here at smoke sizes)."""
    env = dict(os.environ, DUALDIFF_BENCH_SIZE="smoke", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_frechet.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "dualdiff", "--benchmark-storage", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "frechet-cpu-32" in proc.stdout and "test_dualdiff_eigh" in proc.stdout  # the timing table
    assert "2 passed" in proc.stdout


def test_cpu_table_training_row_runs(capsys):
    """The README table's LIFT training-step row (``cpu_table.py --what train``) still builds
    its 64x64 step from the tiny preset, whatever size the demo's preset trains at."""
    spec = importlib.util.spec_from_file_location("cpu_table", BENCH / "cpu_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--what", "train", "--rounds", "1"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[:2] for r in rows if r[0] != "what"] == [["LIFT tiny training step", "B=8, 64x64"]]
