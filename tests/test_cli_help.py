"""Every command of the `dualdiff` CLI prints its help (exit 0) and shows no argparse escape."""
from __future__ import annotations

import argparse

import pytest

from dualdiff.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


COMMANDS = _commands(build_parser())


def test_the_walk_finds_every_experiment():
    tops = {c[0] for c in COMMANDS if c}
    assert {"lift", "toy2d", "tadiff", "vae", "ldm", "info"} <= tops
    assert ("toy2d", "study") in COMMANDS and ("vae", "study") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dualdiff")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dualdiff")
    assert "%%" not in out and "%(" not in out
