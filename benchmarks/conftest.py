"""Two modes for the benchmark suite (``bench_*.py``, collected from the project root):

* timed: ``pytest --benchmark-only`` (or ``--benchmark-enable``) times every benchmark at its
  full sizes with pytest-benchmark;
* smoke: without either flag (plain ``pytest``, CI) pytest-benchmark's ``--benchmark-disable``
  is switched on, so each benchmark body runs once, untimed, on the smallest sizes: the bodies
  are exercised by every test run and cannot rot. Variants that ``torch.compile`` (a test name or
  parameter containing "compile", or the ``compiled`` marker) are skipped in smoke mode: compiling
  on a CPU takes from seconds to minutes each (the compiled jvp of bench_hutchinson took ~4 min
  on a loaded 2-core machine), too long for CI; the tests in tests/ check compiled == eager.
  Smoke runs use one torch thread (tiny sizes; far faster on a shared CPU).

``DUALDIFF_BENCH_SIZE=smoke|full`` overrides the sizes, e.g. a quick timed pass:
``DUALDIFF_BENCH_SIZE=smoke pytest benchmarks --benchmark-only``. The bench modules read it at
import (``SMOKE = os.environ.get("DUALDIFF_BENCH_SIZE") == "smoke"``), hence it is set here,
before collection.
"""
from __future__ import annotations

import os

import pytest
import torch


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure reads the option
def pytest_configure(config: pytest.Config) -> None:
    timed = config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)
    if not timed:
        config.option.benchmark_disable = True
    size = os.environ.setdefault("DUALDIFF_BENCH_SIZE", "full" if timed else "smoke")
    if size not in ("smoke", "full"):
        raise pytest.UsageError(f"DUALDIFF_BENCH_SIZE must be 'smoke' or 'full', got {size!r}")


def _compiles(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (item.get_closest_marker("compiled") is not None or "compile" in item.originalname
            or any(isinstance(v, str) and "compile" in v for v in params.values()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("benchmark_disable", False):
        return
    skip = pytest.mark.skip(reason="compiled benchmark variant: timed under --benchmark-only, too slow to "
                                   "compile for a smoke run")
    here = str(config.rootpath / "benchmarks")
    for item in items:
        if str(item.path).startswith(here) and _compiles(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread_in_smoke(request: pytest.FixtureRequest):
    if not request.config.getoption("benchmark_disable", False):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
