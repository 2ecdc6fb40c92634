"""Read the shell commands out of the fenced code blocks of README.md and docs/*.md (used by
test_readme_commands and test_docs_coverage).

A ```bash (or sh / shell / console) block is all commands; in a block without a language only
the lines that start with a command word count, and a synopsis line (``a | b``, ``[--flag]``) is
skipped. Continuation lines (trailing ``\\``) are joined, ``# comments`` dropped (shell rules,
via :mod:`shlex`) and ``&&`` chains split into one command each.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_WORDS = ("dualdiff ", "python -m dualdiff", "torchrun ", "pip ", "pytest")
EXPERIMENTS = {"lift", "toy2d", "vae", "tadiff", "ldm"}
_FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class ReadmeCommand:
    """One command: the ``## section`` it is in, its line (1-based), its shell words and the
    file it is in (relative to the repository root)."""

    section: str
    line: int
    words: tuple[str, ...]
    file: str = "README.md"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"

    @property
    def text(self) -> str:
        return shlex.join(self.words)

    @property
    def dualdiff_argv(self) -> list[str] | None:
        """The argv after ``dualdiff`` (also for ``python -m dualdiff`` and ``torchrun ... -m
        dualdiff``), or None when this is not a dualdiff command."""
        w = list(self.words)
        if w[:1] == ["dualdiff"]:
            return w[1:]
        if w[:3] == ["python", "-m", "dualdiff"]:
            return w[3:]
        if w[:1] == ["torchrun"]:
            for i in range(len(w) - 1):
                if w[i:i + 2] == ["-m", "dualdiff"]:
                    return w[i + 2:]
        return None

    @property
    def key(self) -> tuple[str, ...]:
        """``(experiment, subcommand)``, or ``(command,)`` for ``info`` / ``ops-check``."""
        argv = self.dualdiff_argv or []
        return tuple(argv[:2]) if argv[:1] and argv[0] in EXPERIMENTS else tuple(argv[:1])


def _is_synopsis(line: str) -> bool:
    code = line.split(" #", 1)[0]
    return " | " in code or " [" in code


def readme_commands(text: str, file: str = "README.md") -> list[ReadmeCommand]:
    """Every command of the fenced blocks of ``text`` (the contents of ``file``), in order."""
    out: list[ReadmeCommand] = []
    section, lang = "", None  # lang None: outside a fence
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(raw)
        if lang is None:
            if fence:
                lang = fence.group(1).lower()
            elif raw.startswith("## "):
                section = raw[3:].strip()
            continue
        if fence and not pending:
            lang = None
            continue
        if not pending:
            start = n
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith("#"):
            continue
        if lang not in SHELL_LANGS:
            if lang or not line.startswith(COMMAND_WORDS) or _is_synopsis(line):
                continue
        out += [ReadmeCommand(section, start, words, file) for words in shell_commands(line)]
    return out


def shell_commands(line: str) -> list[tuple[str, ...]]:
    """The commands of one shell line: its words (``# comment`` dropped) split at ``&&``."""
    cmds: list[tuple[str, ...]] = []
    cmd: list[str] = []
    for w in [*shlex.split(line, comments=True), "&&"]:
        if w == "&&":
            if cmd:
                cmds.append(tuple(cmd))
            cmd = []
        else:
            cmd.append(w)
    return cmds
