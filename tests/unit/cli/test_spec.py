"""cli/spec.py: the quick parser reads a command line as typer (click) reads the
same declaration, or leaves it to typer; and the commands run through the quick
path in the usual forms."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from micropatch.cli import change, status, typed
from micropatch.cli.entry import verbosity
from micropatch.cli.spec import Command, parse

COMMANDS = [change.APPLY, change.REMOVE, change.UPDATE, status.STATUS]


def through_typer(command: Command, argv: list[str]) -> dict[str, Any] | None:
    """The values typer gives the command's `run` for `argv`, or None if it refuses."""
    seen: list[dict[str, Any]] = []
    app = typer.Typer()
    typed.add(app, Command(command.name, command.help, command.arguments, command.options,
                           seen.append))  # fmt: skip

    @app.callback()
    def _group() -> None:  # a group, so that the command is invoked by its name
        pass

    result = CliRunner().invoke(app, [command.name, *argv])
    if result.exit_code != 0:
        return None
    [values] = seen
    return values


@pytest.mark.parametrize(
    ("command", "argv", "expected"),
    [
        (change.APPLY, ["fix.mpatch", "--pid", "12"], {"patch_file": "fix.mpatch", "pid": [12]}),
        (change.UPDATE, ["fix.mpatch", "-p", "1", "--pid=2", "-p3"], {"pid": [1, 2, 3]}),
        (change.REMOVE, ["--pid", "7", "my-fix"], {"patch_id": "my-fix", "pid": [7]}),
        (change.APPLY, ["f", "--all", "--exe", "/usr/*", "--user", "root", "--dry-run"],
         {"all_": True, "exe": ["/usr/*"], "user": ["root"], "dry_run": True, "pid": []}),
        (change.APPLY, ["f", "-p", "1", "--retries", "3", "--stop-timeout", "0.5",
                        "--lock-timeout", "0", "--trust", "a.pub", "--trust", "b/",
                        "--allow-unsigned"],
         {"retries": 3, "stop_timeout": 0.5, "lock_timeout": 0.0, "trust": ["a.pub", "b/"],
          "allow_unsigned": True}),
        (change.REMOVE, ["--pid", "7", "--", "-odd-id"], {"patch_id": "-odd-id"}),
        (status.STATUS, [], {"pid": []}),
        (status.STATUS, ["-p", "4", "-p", "5"], {"pid": [4, 5]}),
    ],
)  # fmt: skip
def test_the_usual_forms_take_the_quick_path_and_mean_what_typer_says(command, argv, expected):
    values = parse(command, argv)
    assert values is not None
    assert {k: values[k] for k in expected} == expected
    assert values == through_typer(command, argv)


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (change.APPLY, ["fix.mpatch", "--pid", "x"]),  # typer says what is wrong
        (change.APPLY, ["fix.mpatch", "--pid"]),
        (change.APPLY, ["a", "b", "--pid", "1"]),
        (change.APPLY, ["--pid", "1"]),
        (change.APPLY, ["fix.mpatch", "--help"]),
        (change.APPLY, ["fix.mpatch", "--pid", "1", "--bogus"]),
        (change.APPLY, ["fix.mpatch", "--all=yes"]),
        (change.APPLY, ["fix.mpatch", "--all", "--stop-timeout", "0"]),  # below its minimum
        (change.APPLY, ["fix.mpatch", "--all", "--lock-timeout", "-1"]),
        (status.STATUS, ["extra"]),
    ],
)
def test_what_the_quick_parser_is_not_sure_of_goes_to_typer(command, argv):
    assert parse(command, argv) is None


WORDS = st.sampled_from([
    "fix.mpatch", "my-fix", "--pid", "-p", "--pid=3", "-p4", "12", "x", "-1", "0.5", "nan",
    "--all", "--all=1", "--exe", "--user", "--unit", "--cgroup", "--dry-run", "--retries",
    "--stop-timeout", "--lock-timeout", "--trust", "--allow-unsigned", "--", "-", "--help",
    "--bogus", "-v", "",
])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(command=st.sampled_from(COMMANDS), argv=st.lists(WORDS, max_size=7))
def test_the_quick_parser_never_disagrees_with_typer(command, argv):
    values = parse(command, argv)
    if values is not None:
        assert values == through_typer(command, argv), argv


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], (0, [])),
        (["status"], (0, ["status"])),
        (["-v", "apply", "-v"], (1, ["apply", "-v"])),
        (["-vv", "--verbose", "remove"], (3, ["remove"])),
        (["--version"], (0, ["--version"])),
    ],
)
def test_leading_verbosity(argv, expected):
    assert verbosity(argv) == expected
