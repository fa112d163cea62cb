"""The server never touches a process and never compiles or assembles what it is sent:
no module of server/ imports process/, live/, bodies/ or build/ (eager or lazy)."""

from __future__ import annotations

import ast
from pathlib import Path

import micropatch

SERVER = Path(micropatch.__file__).parent / "server"
FORBIDDEN = {"process", "live", "bodies", "build", "agent", "tools", "demo", "cli"}


def test_server_imports_no_process_or_toolchain_layer() -> None:
    found = []
    for path in sorted(SERVER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "micropatch" and len(parts) > 1 and parts[1] in FORBIDDEN:
                    found.append(f"{path.relative_to(SERVER)}:{node.lineno}: {name}")
    assert not found, found
