"""kernels.timestep_embedding.CachedLauncher: the lean cached launch where Triton has the internals
it uses (>= 3.4), the JIT launch otherwise. Runs on the CPU with a fake JIT launcher and fake
compiled kernels (the real cached path runs on the GPU in test_timestep_embedding.py)."""
from __future__ import annotations

import types

import pytest


@pytest.fixture()
def K(monkeypatch):
    from dualdiff.kernels import timestep_embedding as K

    calls = []

    def fake_fwd(t0, t1, freqs, weights, out, split=None):
        calls.append("jit")
        return K._fake_compiled  # set per test

    monkeypatch.setattr(K, "dual_timestep_embedding_fwd", fake_fwd)
    monkeypatch.setattr(K, "_launch_args", lambda *a: (("arg",), (3,)))
    K._calls = calls
    yield K
    del K._fake_compiled, K._calls


class FakeCompiled:
    """Has the members the cached launch uses; records its run() calls."""

    def __init__(self, runs):
        self.runs, self.function, self.packed_metadata = runs, "fn", "meta"

    def launch_metadata(self, grid, stream, *args):
        return ("lm", grid, stream)

    def run(self, gx, gy, gz, stream, function, packed, lm, enter, exit_, *args):
        self.runs.append((gx, gy, gz, stream, args))


def _launch(K, launcher, n):
    for _ in range(n):
        launcher("key", 7, "t0", "t1", "freqs", ("w",), "out")


def test_cached_launch_used_when_supported(K, monkeypatch):
    import triton

    if not hasattr(triton, "knobs"):
        monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(runtime=types.SimpleNamespace(
            launch_enter_hook=None, launch_exit_hook=None)), raising=False)
    runs = []
    K._fake_compiled = FakeCompiled(runs)
    launcher = K.CachedLauncher()
    assert launcher.enabled, launcher.why
    _launch(K, launcher, 3)
    assert K._calls == ["jit"]  # first call compiles through the JIT, then cached
    assert [r[:4] for r in runs] == [(3, 1, 1, 7)] * 2 and runs[0][4] == ("arg",)


def test_old_triton_without_knobs_falls_back_to_the_jit(K, monkeypatch):
    import triton

    monkeypatch.delattr(triton, "knobs", raising=False)  # Triton 3.0-3.3
    runs = []
    K._fake_compiled = FakeCompiled(runs)
    launcher = K.CachedLauncher()
    assert not launcher.enabled and "triton.knobs" in launcher.why
    _launch(K, launcher, 3)
    assert K._calls == ["jit"] * 3 and runs == []


def test_compiled_kernel_without_members_falls_back(K, monkeypatch):
    import triton

    monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(runtime=types.SimpleNamespace(
        launch_enter_hook=None, launch_exit_hook=None)), raising=False)
    K._fake_compiled = types.SimpleNamespace(run=lambda *a: None)  # no function / metadata
    launcher = K.CachedLauncher()
    _launch(K, launcher, 3)
    assert K._calls == ["jit"] * 3
    assert not launcher.enabled and "packed_metadata" in launcher.why


def test_refused_cached_launch_falls_back_for_good(K, monkeypatch):
    import triton

    monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(runtime=types.SimpleNamespace(
        launch_enter_hook=None, launch_exit_hook=None)), raising=False)

    class Refusing(FakeCompiled):
        def run(self, *args):  # another signature: refused before launching
            raise TypeError("run() takes 9 positional arguments")

    K._fake_compiled = Refusing([])
    launcher = K.CachedLauncher()
    _launch(K, launcher, 4)
    # call 1 compiles (jit), call 2 is refused -> jit launch, calls 3-4 go straight to the jit
    assert K._calls == ["jit"] * 4
    assert not launcher.enabled and "refused" in launcher.why


def test_real_module_reports_its_triton():
    from dualdiff.kernels import timestep_embedding as K

    launcher = K.CachedLauncher()
    assert launcher.enabled == K.cached_launch_supported()
