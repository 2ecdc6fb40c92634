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
