"""What a new user reads first: `--help` wraps its paragraphs to the width it has
(a terminal's, or 80 when piped), and a mistyped command gets one suggestion.

Run as the console script runs, piped, with the environment a user has (COLUMNS set
to the terminal's width, or unset).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest

# Commands whose help has a paragraph written over several source lines.
MULTI_LINE = (["repair"], ["diff"], ["dev", "run"], ["repo", "sign-root"], ["agent", "run"])


def _micropatch(args: list[str], columns: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-c", "from micropatch.cli.entry import main; main()", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def _description(help_text: str) -> list[list[str]]:
    """The paragraphs of the description (between `Usage:` and the first panel), as
    their printed lines."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.lstrip().startswith("╭"):
            break
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("columns", [None, 50, 140])
@pytest.mark.parametrize("command", MULTI_LINE, ids=" ".join)
def test_help_wraps_paragraphs_to_the_width(command: list[str], columns: int | None) -> None:
    run = _micropatch([*command, "--help"], columns)
    assert run.returncode == 0, run.stderr
    width = columns or 80
    assert max(len(line) for line in run.stdout.splitlines()) <= width
    paragraphs = _description(run.stdout)
    assert paragraphs, run.stdout
    for paragraph in paragraphs:
        # Filled: no line ends where the next word would still have fitted (a source
        # line break kept), whatever the width.
        for line, after in itertools.pairwise(paragraph):
            next_word = after.split()[0]
            assert len(line) + 1 + len(next_word) > width - 4, (line, after, run.stdout)


def test_help_keeps_paragraphs() -> None:
    run = _micropatch(["repair", "--help"], 200)
    assert _description(run.stdout) == [
        ["Complete or roll back an operation whose patcher was killed midway."],
        [
            "Every apply, remove and update does this first by itself; status shows such "
            "a process with the patch's state (applying, removing). Either runtime."
        ],
    ]


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [(["aply"], "'apply'"), (["agent", "stauts"], "'status'"), (["explore", "xrf"], "'xref'")],
)
def test_a_mistyped_command_gets_one_suggestion(args: list[str], suggestion: str) -> None:
    run = _micropatch(args, None)
    assert run.returncode == 2
    message = re.sub(r"[│\s]+", " ", run.stderr)
    assert message.count("Did you mean") == 1, run.stderr
    assert f"No such command '{args[-1]}'. Did you mean {suggestion}?" in message


def test_verbose_is_a_flag_in_the_help() -> None:
    """-v counts (-vv): the help shows no INTEGER to give it, nor a default."""
    run = _micropatch(["--help"], 100)
    [line] = [line for line in run.stdout.splitlines() if "--verbose" in line]
    assert "INTEGER" not in line and "[default" not in run.stdout.split("--version")[0]
