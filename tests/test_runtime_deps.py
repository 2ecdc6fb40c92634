"""The README's main job needs only the runtime dependencies.

`pip install . && dualdiff lift demo` once died on a fresh machine (torchvision was only a test
extra, and CI installs the extras). Here the demo's code path runs through the console entry
point of ``[project.scripts]`` in a subprocess where every installed top-level module that is
not provided by ``[project.dependencies]`` (or what they require) is blocked
(``sys.modules[name] = None``): monai, diffusers, nibabel, pytest, ... Both lists are read
from pyproject.toml, so the test stays true when they change.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
from packaging.requirements import Requirement  # noqa: E402  (pytest's own dependency)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_closure() -> set[str]:
    """Normalised names of the runtime dependencies and, installed, everything they require."""
    todo = [Requirement(r) for r in PYPROJECT["dependencies"]]
    seen: set[str] = {_norm(PYPROJECT["name"])}
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in md.requires(req.name) or []]
        except md.PackageNotFoundError:
            pass
    return seen


def _blocked_modules() -> list[str]:
    """Installed top-level modules that no runtime dependency provides."""
    allowed = _runtime_closure()
    return sorted(mod for mod, dists in md.packages_distributions().items()
                  if mod.isidentifier() and not any(_norm(d) in allowed for d in dists))


def test_blocked_set_is_the_test_extras_not_the_runtime_dependencies():
    blocked = set(_blocked_modules())
    installed = set(md.packages_distributions())
    for extra in ("monai", "diffusers", "nibabel", "pytest", "pytest_benchmark"):
        assert extra not in installed or extra in blocked, extra
    for runtime in ("torch", "torchvision", "pytorch_fid", "skimage", "numba", "PIL", "yaml", "dualdiff"):
        assert runtime not in blocked, runtime


DEMO_TINY = ["lift.train.steps=3", "lift.train.batch_size=2", "lift.train.log_every=1", "lift.data.num_images=8",
             "lift.model.channels=[8, 16]", "analysis.num_points=3", "analysis.heatmap_samples=2",
             "analysis.probes=1", "analysis.num_steps=3", "analysis.fixed_steps=3", "analysis.max_jump=2",
             "analysis.grid_images=2", "analysis.batch_size=2", "analysis.mse_samples=3", "analysis.num_images=2",
             "analysis.fid_download=false"]

_CHILD = """
import importlib, json, sys
blocked, entry, argv = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
for name in blocked:
    sys.modules[name] = None   # `import name` now raises ImportError
module, _, func = entry.partition(":")
sys.exit(getattr(importlib.import_module(module), func)(argv))
"""


def test_demo_runs_with_only_the_runtime_dependencies(tmp_path):
    blocked = _blocked_modules()
    entry = PYPROJECT["scripts"]["dualdiff"]
    out = tmp_path / "demo"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "hub"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("DUALDIFF_BACKEND", None)
    argv = ["lift", "demo", "--out-dir", str(out), "--device", "cpu", *DEMO_TINY]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(blocked), entry, json.dumps(argv)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in ("report.txt", "heatmap.pt", "paths.json", "heatmap.png", "mse.json", "mse.png",
              "training_images.png", "samples.png", "data_vs_samples.png", "samples_diagonal.png",
              "samples_dp_total.png", "samples_fixed_total.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert list((out / "run" / "checkpoints").glob("step_*.pt"))
    report = (out / "report.txt").read_text()
    assert "3 training steps" in report and "sampling steps" in report and "FID: skipped" in report
    assert json.loads((out / "mse.json").read_text())["num_samples"] == 3
