"""Backend discovery, forcing and the `info` report."""
import subprocess
import sys

import pytest
import torch

import dualdiff
from dualdiff import _backend
from dualdiff._backend import BackendUnavailableError, backend_status, select_backend
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


# ---- "usable" includes a one-time probe launch -------------------------------------------------
@pytest.fixture
def failing_cpp_probe(monkeypatch):
    """Simulates a compiled backend whose kernels cannot run here (no kernel image for the GPU,
    a driver older than the CUDA runtime): its probe launch raises."""
    calls = []

    def probe_launch(name, device):
        calls.append((name, device.type))
        if name == "cpp":
            raise RuntimeError("no kernel image is available for execution on the device")
        return real(name, device)

    real = _backend._probe_launch
    monkeypatch.setattr(_backend, "_probe_launch", probe_launch)
    monkeypatch.setattr(_backend, "_PROBE_RESULTS", {})
    return calls


def test_probe_runs_once_and_is_cached(failing_cpp_probe):
    for _ in range(3):
        ok, why = backend_status("cpp", "cpu")
    assert not ok and "probe launch on cpu failed" in why and "no kernel image" in why
    assert failing_cpp_probe == [("cpp", "cpu")]


def test_auto_falls_back_when_the_probe_fails(failing_cpp_probe):
    assert select_backend("op", torch.device("cpu"), ("triton", "cpp", "torch"), PREFER) == "torch"


def test_forced_backend_with_failing_probe_raises_the_reason(failing_cpp_probe):
    with forced_backend("cpp"), pytest.raises(BackendUnavailableError, match="no kernel image"):
        select_backend("op", torch.device("cpu"), ("cpp", "torch"), PREFER)
    with pytest.raises(BackendUnavailableError, match="forced but unusable.*probe launch"):
        select_backend("op", torch.device("cpu"), ("cpp", "torch"), PREFER, backend="cpp")


def test_ops_fall_back_or_raise_on_a_failing_probe(failing_cpp_probe):
    from dualdiff.ops.vae import gaussian_kl, gaussian_kl_reference

    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(gaussian_kl(mu, logvar), gaussian_kl_reference(mu, logvar))  # auto: torch
    with pytest.raises(BackendUnavailableError, match="no kernel image"):
        gaussian_kl(mu, logvar, backend="cpp")


def test_real_probe_launch_checks_the_value(monkeypatch):
    """The real cpp probe computes KL(N(0.5, 1) || N(0, 1)) = 0.125 through the C++ kernel."""
    monkeypatch.setattr(_backend, "_PROBE_RESULTS", {})
    assert _backend.probe("cpp", torch.device("cpu")) == (True, "probe launch ok")
    monkeypatch.setattr(_backend, "_PROBE_RESULTS", {})
    monkeypatch.setattr(_backend, "_PROBE_KL", 0.5)  # a wrong expected value must fail the probe
    ok, why = _backend.probe("cpp", torch.device("cpu"))
    assert not ok and "expected 0.5" in why


def test_info_shows_the_probe_result(failing_cpp_probe, capsys):
    from dualdiff.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cpp_line = next(line for line in out.splitlines() if line.strip().startswith("cpp") and "CPU" in line)
    assert "no" in cpp_line and "probe launch on cpu failed" in cpp_line


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_probe_launch_succeeds(name, monkeypatch):
    monkeypatch.setattr(_backend, "_PROBE_RESULTS", {})
    ok, why = backend_status(name, "cuda")
    assert ok, why
    assert "probe launch ok" in why
