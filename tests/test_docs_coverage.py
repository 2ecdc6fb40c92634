"""Every experiment has a docs page and every CLI command appears in docs/ (issue 21).

The commands are enumerated from the real parser (:func:`dualdiff.cli.build_parser`), not from a
hand-written list: a new ``dualdiff <exp> <subcommand>`` (or top-level command, or experiment)
fails this test until a docs page shows it. "Shows" means the text ``dualdiff <exp> <sub>`` (or
``dualdiff <command>``) occurs in a docs/*.md page, in a fenced block or in running text; the
fenced ones are run by ``tests/test_readme_commands.py``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from dualdiff.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_commands() -> tuple[list[str], dict[str, list[str]]]:
    """(top-level commands without subcommands, {experiment: [its subcommands]}) of the parser."""
    top, experiments = [], {}
    for name, sub in _subparsers(build_parser()).items():
        children = _subparsers(sub)
        if children:
            experiments[name] = list(children)
        else:
            top.append(name)
    return top, experiments


TOP, EXPERIMENTS = cli_commands()
COMMANDS = [(c,) for c in TOP] + [(e, s) for e, subs in EXPERIMENTS.items() for s in subs]


def _docs_text() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))}


def _mentions(text: str, words: tuple[str, ...]) -> bool:
    """``dualdiff <words>`` as whole words (``generate`` does not match ``generate-for-fid``)."""
    pattern = r"(?<![\w-])dualdiff\s+" + r"\s+".join(map(re.escape, words)) + r"(?![\w-])"
    return re.search(pattern, text) is not None


def test_parser_enumeration_finds_the_commands():
    """The enumeration itself works (guards against a parser refactor making the tests vacuous)."""
    assert {"info", "ops-check"} <= set(TOP)
    assert {"lift", "toy2d", "tadiff", "vae", "ldm"} <= set(EXPERIMENTS)
    assert all(EXPERIMENTS.values())


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_has_a_docs_page(experiment):
    page = DOCS / f"{experiment}.md"
    assert page.is_file(), f"experiment {experiment!r} has no docs page: write {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    for section in ("## Question", "## Commands", "## Outputs", "## Study", "## Real data",
                    "## Full size on a GPU"):
        assert section in text, f"{page.relative_to(ROOT)} has no {section!r} section"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"(docs/{experiment}.md)" in readme, f"README.md does not link docs/{experiment}.md"


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_cli_command_appears_in_docs(command):
    pages = [name for name, text in _docs_text().items() if _mentions(text, command)]
    assert pages, (f"'dualdiff {' '.join(command)}' appears in no docs/*.md page: show it (in a "
                   f"```bash block, with a TINY entry in tests/test_readme_commands.py) on "
                   f"docs/{command[0]}.md" if len(command) == 2 else "docs/cli.md or docs/ops.md")


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_docs_links_resolve():
    """Relative links between the docs pages (and to repository files) point at files."""
    broken = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"broken links: {broken}"
