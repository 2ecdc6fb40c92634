"""Backend discovery, forcing and the `info` report."""
import subprocess
import sys

import pytest
import torch

import dualdiff
from dualdiff._backend import BackendUnavailableError, select_backend
from dualdiff.testing import forced_backend

PREFER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def test_extension_builds_and_imports_without_gpu():
    report = dualdiff.backends()
    assert report["extension"]["built"], report["extension"]["error"]
    assert report["cpu"]["cpp"]["usable"]
    assert report["cpu"]["torch"]["usable"]


def test_auto_picks_cpp_on_cpu():
    assert select_backend("op", torch.device("cpu"), ("triton", "cpp", "torch"), PREFER) == "cpp"
    assert select_backend("op", torch.device("cpu"), ("triton", "torch"), PREFER) == "torch"


def test_forced_backend_unavailable_is_an_error_not_a_fallback():
    with forced_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        select_backend("op", torch.device("cpu"), ("cuda", "cpp", "torch"), PREFER)
    with forced_backend("cpp"), pytest.raises(BackendUnavailableError, match="has no 'cpp'"):
        select_backend("op", torch.device("cpu"), ("triton", "torch"), PREFER)
    with forced_backend("bogus"), pytest.raises(BackendUnavailableError, match="not a backend"):
        select_backend("op", torch.device("cpu"), ("torch",), PREFER)
    with forced_backend("torch"):
        assert select_backend("op", torch.device("cpu"), ("cpp", "torch"), PREFER) == "torch"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with forced_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        select_backend("op", torch.device("cpu"), ("triton", "torch"), PREFER)


def test_info_command_runs(tmp_path):
    # cwd outside the checkout, so the installed package is the one imported
    out = subprocess.run([sys.executable, "-m", "dualdiff", "info"], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert "dualdiff._C built: True" in out.stdout
    assert "cpp" in out.stdout
