"""The ``require`` fixture of tests/conftest.py: a missing test library skips, except under CI=true."""
from __future__ import annotations

import pytest


def test_require_returns_skips_or_fails(require, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert require("json").dumps("x") == '"x"'
    with pytest.raises(pytest.skip.Exception, match="dualdiff_no_such_module"):
        require("dualdiff_no_such_module")
    monkeypatch.setenv("CI", "true")
    assert require("json").loads("1") == 1
    with pytest.raises(pytest.fail.Exception, match="CI=true.*dualdiff_no_such_module.*pip install"):
        require("dualdiff_no_such_module")


@pytest.fixture
def fake_status(monkeypatch):
    """Make backend_status / _static_status of dualdiff._backend say what the test sets."""
    from dualdiff import _backend

    state = {"usable": False, "built": False}
    monkeypatch.setattr(_backend, "backend_status", lambda name, device: (state["usable"], "fake reason"))
    monkeypatch.setattr(_backend, "_static_status", lambda name, device_type: (state["built"], "fake"))
    return state


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_require_backend_fails_under_ci_for_an_unusable_cpu_backend(require_backend, fake_status,
                                                                    monkeypatch, name):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"backend '{name}' must be usable for cpu tensors on CI=true"):
        require_backend(name, "cpu")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="fake reason"):
        require_backend(name, "cpu")  # not built, not required here: a legitimate skip
    fake_status["usable"] = True
    monkeypatch.setenv("CI", "true")
    assert require_backend(name, "cpu") is None


def test_require_backend_fails_when_built_but_broken(require_backend, fake_status, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    fake_status["built"] = True  # built, but the probe launch fails
    with pytest.raises(pytest.fail.Exception, match="'cpp' is built for cpu but unusable: fake reason"):
        require_backend("cpp", "cpu")


def test_require_backend_on_a_gpu_host(require_backend, fake_status, monkeypatch):
    import torch

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("cuda", "triton"):
        with pytest.raises(pytest.fail.Exception, match=f"'{name}' must be usable for cuda tensors on a GPU host"):
            require_backend(name, "cuda")
    with pytest.raises(pytest.skip.Exception):
        require_backend("cpp", "cpu")  # not required on a GPU host outside CI
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        require_backend("cuda", "cuda")


def test_the_real_cpu_backends_pass_here(require_backend):
    """The built extension's cpp backend (and triton under the interpreter, when installed) pass
    the rule on this machine: require_backend returns."""
    assert require_backend("cpp", "cpu") is None
    assert require_backend("torch", "cpu") is None
