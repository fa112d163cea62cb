"""Shared fixtures: the C targets under tests/targets/, built once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ on sys.path whatever pytest's import mode, so tests can import targets.harness.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from targets.harness import StartTarget, Target, Targets, build_targets  # noqa: E402


@pytest.fixture(scope="session")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Targets:
    """Every target compiled with the machine's cc (or $CC); paths by name."""
    return build_targets(tmp_path_factory.mktemp("targets"))


@pytest.fixture
def start(targets: Targets) -> Iterator[StartTarget]:
    """Start targets by name or path; all are closed (or killed) at test end.

    ``start("threads", "16")`` -> a ready ``Target``; keyword arguments go to
    ``Target`` (``timeout``, ``env``).
    """
    started: list[Target] = []

    def _start(target: str | os.PathLike[str], *args: str, **kwargs: object) -> Target:
        t = Target(targets.path(target), *args, **kwargs)  # type: ignore[arg-type]
        started.append(t)
        return t

    yield _start
    for t in reversed(started):
        t.close()
