"""cli/quick.py: which command lines take the quick path to the agent."""

from __future__ import annotations

import pytest

from micropatch.cli.quick import parse


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["apply", "fix.mpatch", "--pid", "12"], ("apply", "fix.mpatch", [12])),
        (["update", "fix.mpatch", "-p", "1", "--pid=2"], ("update", "fix.mpatch", [1, 2])),
        (["remove", "--pid", "7", "my-fix"], ("remove", "my-fix", [7])),
    ],
)
def test_the_quick_forms(argv, expected):
    assert parse(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["status"],
        ["apply", "fix.mpatch"],  # no pid: the full CLI says what is missing
        ["apply", "fix.mpatch", "--all"],
        ["apply", "fix.mpatch", "--pid", "12", "--trust", "k.pub"],
        ["apply", "fix.mpatch", "--pid", "x"],
        ["apply", "fix.mpatch", "--pid"],
        ["apply", "a", "b", "--pid", "1"],
        ["apply", "--help"],
        ["-v", "apply", "fix.mpatch", "--pid", "1"],
        ["inspect", "fix.mpatch", "--pid", "1"],
    ],
)
def test_everything_else_goes_to_the_full_cli(argv):
    assert parse(argv) is None
