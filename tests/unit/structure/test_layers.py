"""The layers of docs/architecture.md: data flows down, no package imports one above it.

Read from the source (every `import`, at module level or inside a function), so
a lazy import that reaches up is caught as well as an eager one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import micropatch

ROOT = Path(micropatch.__file__).parent

# Each package may import those of a lower rank, and its own. Equal ranks are
# independent of each other.
RANK = {
    "errors": 0,
    "faults": 0,
    "files": 0,  # the one atomic writer and bounded reader: standard library only
    "systemd": 1,  # unit files and systemctl: the agent's and the server's install
    "arch": 1,
    "elf": 2,
    "patch": 3,
    "bodies": 4,
    "trust": 5,
    "build": 6,
    "process": 6,
    "live": 7,
    # a second runtime beside live/: it shares the per-process lock (live/lock.py)
    "runtimes": 8,
    "tools": 9,
    "agent": 9,
    "server": 9,
    "demo": 10,
    "cli": 11,
}


def _package(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0].removesuffix(".py") if relative.parts else ""


# Named exceptions: the agent checks in with the fleet server and downloads through
# its TUF client, server/updater.py (which imports nothing of the server's API,
# models or FastAPI); nothing else of server/.
ALLOWED = {("agent", "micropatch.server.updater")}


def _imports(path: Path) -> list[tuple[int, str]]:
    return [(line, name.split(".")[1]) for line, name in _full_imports(path)]


def _full_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "micropatch" and len(parts) > 1:
                found.append((node.lineno, name))
    return found


SOURCES = sorted(p for p in ROOT.rglob("*.py") if _package(p) not in ("", "__init__"))


def test_every_package_has_a_rank() -> None:
    packages = {_package(p) for p in SOURCES}
    assert packages <= set(RANK), f"give these a rank: {sorted(packages - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_import_reaches_up(path: Path) -> None:
    own = _package(path)
    upward = [
        f"line {line}: micropatch.{target}"
        for line, name in _full_imports(path)
        if (target := name.split(".")[1]) in RANK
        and target != own
        and RANK[target] >= RANK[own]
        and not any(own == o and (name == a or name.startswith(a + ".")) for o, a in ALLOWED)
    ]
    assert not upward, f"{own}/ (rank {RANK[own]}) imports a layer at or above it: {upward}"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The test can fail: an import of live/ from patch/ is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from micropatch.live import engine\n")
    assert (2, "live") in _imports(bad)
