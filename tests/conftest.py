"""Shared fixtures: the C targets under tests/targets/, built once per session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ on sys.path whatever pytest's import mode, so tests can import targets.harness.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from targets.harness import StartTarget, Target, Targets, build_targets  # noqa: E402

# The caller's variables that change what micropatch does; every test starts without them.
# MICROPATCH_TEST_* are the test suite's own settings (a PostgreSQL URL, the wheel job).
_FOREIGN = ("NOTIFY_SOCKET", "SOURCE_DATE_EPOCH")
_PRIVATE = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """The same environment whatever the caller's (issue 16, T2): no MICROPATCH_*
    variable of theirs (MICROPATCH_NO_AGENT, a socket, a trust directory, a fault
    point), and no agent of the host: the CLI looks for one at a socket path of this
    session where none is, and reads trusted keys from a directory of this session
    where none are, as on a host without micropatch. Tests that want an agent or
    keys say so with their own variables."""
    for name in list(os.environ):
        if (name.startswith("MICROPATCH_") and not name.startswith("MICROPATCH_TEST_")) or (
            name in _FOREIGN
        ):
            del os.environ[name]
    private = Path(tempfile.mkdtemp(prefix="micropatch-tests-"))
    config.stash[_PRIVATE] = private
    os.environ["MICROPATCH_AGENT_SOCKET"] = str(private / "no-agent.sock")
    os.environ["MICROPATCH_TRUST_DIR"] = str(private / "trusted")


def pytest_unconfigure(config: pytest.Config) -> None:
    private = config.stash.get(_PRIVATE, None)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


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
