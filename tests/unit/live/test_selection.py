"""`live.selection.wanted`: which processes in scope `--all` touches, for either runtime."""

from __future__ import annotations

import pytest

from micropatch.live.selection import wanted


@pytest.mark.parametrize(
    ("verb", "version", "applied", "touched"),
    [
        ("apply", None, None, True),
        ("apply", None, 1, False),
        ("remove", None, None, False),
        ("remove", None, 1, True),
        ("remove", None, 7, True),
        ("update", 3, None, False),
        ("update", 3, 2, True),
        ("update", 3, 3, False),
        ("update", 3, 4, False),
    ],
)
def test_wanted(verb: str, version: int | None, applied: int | None, touched: bool) -> None:
    assert wanted(verb, version)(applied) is touched


def test_update_needs_the_new_version() -> None:
    with pytest.raises(AssertionError):
        wanted("update")
