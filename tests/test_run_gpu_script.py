"""benchmarks/run_gpu.sh, read as the GPU machine would run it, checked on the CPU: the plan fits the
budget and the 8 files that come back; without a GPU `all` stops at once with one reason; and no
failure of a stage (pytest, the sanitizer, a time limit) is ever reported as ok."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
STAGES = ["preflight", "build", "kernel-tests", "cuda-tests", "report", "sanitizer"]


def _run(args: list[str], tmp_path: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _fake_tool(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _summary(tmp_path: Path) -> str:
    return (tmp_path / "out" / "summary.txt").read_text()


def test_plan_fits_the_budget_and_the_files_that_come_back(tmp_path):
    r = _run(["plan"], tmp_path)
    assert r.returncode == 0, r.stderr
    limits = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s+(\S+)\s+(\d+) s\s+(.+?)\s{2,}", line)
        if m:
            limits[m.group(1)] = (int(m.group(2)), m.group(3).split())
    assert list(limits) == STAGES
    total = sum(limit for limit, _ in limits.values())
    assert f"sum of the limits: {total} s (BUDGET_S 420)" in r.stdout
    assert total <= 420
    files = {f for _, fs in limits.values() for f in fs}
    assert len(files) <= 8, files
    kernel_files = re.search(r"kernel test files: (.*)", r.stdout).group(1).split()
    for name in ("test_weighted_dice.py", "test_vae_loss.py", "test_timestep_embedding.py"):
        assert f"tests/{name}" in kernel_files
    assert all((ROOT / f).is_file() for f in kernel_files)
    assert not (tmp_path / "out").exists()  # the plan writes nothing


def test_plan_refuses_limits_over_the_budget(tmp_path):
    r = _run(["plan"], tmp_path, BUDGET_S="300")
    assert r.returncode != 0 and "more than BUDGET_S" in r.stderr


def test_all_without_a_gpu_stops_at_once_with_one_reason(tmp_path):
    t0 = time.monotonic()
    r = _run(["all"], tmp_path, PATH="/usr/bin:/bin")  # no nvidia-smi
    assert r.returncode == 1
    assert time.monotonic() - t0 < 30
    lines = [l for l in r.stdout.splitlines() if l.startswith("preflight:")]
    assert lines == ["preflight: FAILED rc=1 (0 s) - no CUDA device: nvidia-smi not found"] or (
        len(lines) == 1 and "no CUDA device: nvidia-smi not found" in lines[0]), r.stdout
    summary = _summary(tmp_path)
    assert "preflight: FAILED" in summary and "FAILED stages: preflight" in summary
    assert "build:" not in summary  # nothing after a failed preflight
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
def test_all_with_nvidia_smi_but_no_cuda_in_torch(tmp_path):
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir, "nvidia-smi", 'echo "GPU 0: Fake GPU (UUID: GPU-0)"')
    r = _run(["all"], tmp_path, PATH=f"{bin_dir}:/usr/bin:/bin")
    assert r.returncode == 1
    assert "preflight: FAILED rc=1" in _summary(tmp_path)
    assert "torch.cuda.is_available() is False" in _summary(tmp_path)


def test_missing_compute_sanitizer_is_a_failed_stage(tmp_path):
    r = _run(["sanitizer"], tmp_path, RUN_GPU_NO_PREFLIGHT="1", COMPUTE_SANITIZER="")
    assert r.returncode == 1
    assert re.search(r"^sanitizer: FAILED rc=1 .*compute-sanitizer not found", _summary(tmp_path), re.M)


@pytest.mark.parametrize("exit_code, status", [(0, "ok"), (3, "FAILED rc=3 (sanitizer errors)"),
                                                (1, "FAILED rc=1")])
def test_each_sanitizer_tool_reports_its_own_status(tmp_path, exit_code, status):
    fake = _fake_tool(tmp_path / "bin", "compute-sanitizer",
                      'echo "sanitize_kernels: 9 cases, 0 failed, 9 ok"\n'
                      f'echo "========= ERROR SUMMARY: {exit_code} errors"\nexit {exit_code}')
    r = _run(["sanitizer"], tmp_path, RUN_GPU_NO_PREFLIGHT="1", COMPUTE_SANITIZER=str(fake))
    summary = _summary(tmp_path)
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert re.search(rf"^sanitizer {tool}: {re.escape(status)} - sanitize_kernels: 9 cases.*"
                         rf"ERROR SUMMARY: {exit_code} errors$", summary, re.M), summary
    assert r.returncode == (0 if exit_code == 0 else 1)
    stage = re.search(r"^sanitizer: (\S+)", summary, re.M).group(1)
    assert stage == ("ok" if exit_code == 0 else "FAILED")
    log = (tmp_path / "out" / "sanitizer.log").read_text()
    assert log.count("=== compute-sanitizer --tool") == 3


def test_a_sanitizer_tool_past_its_limit_is_a_timeout(tmp_path):
    fake = _fake_tool(tmp_path / "bin", "compute-sanitizer", "sleep 30")
    t0 = time.monotonic()
    r = _run(["sanitizer"], tmp_path, RUN_GPU_NO_PREFLIGHT="1", COMPUTE_SANITIZER=str(fake), SANITIZER_S="2")
    assert time.monotonic() - t0 < 20  # the three ran side by side, each stopped at 2 s
    assert r.returncode == 1
    assert len(re.findall(r"^sanitizer \w+: TIMEOUT", _summary(tmp_path), re.M)) == 3


def test_failing_kernel_tests_fail_the_stage_with_pytest_closing_line(tmp_path):
    test = tmp_path / "test_fails.py"
    test.write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    r = _run(["kernel-tests"], tmp_path, RUN_GPU_NO_PREFLIGHT="1", KERNEL_TESTS=str(test), XDIST_WORKERS="2")
    assert r.returncode == 1
    line = re.search(r"^kernel-tests: .*$", _summary(tmp_path), re.M).group(0)
    assert line.startswith("kernel-tests: FAILED rc=1") and re.search(r"1 failed, 1 passed", line), line
