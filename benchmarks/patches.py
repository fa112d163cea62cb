"""The patches the benchmarks apply to bench_target, as patch source (TOML).

The engine is imported here, lazily, and only through its public API, so the
parts of a benchmark that do not need it (gdb, Frida, bare stop-the-world)
run without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.target import MODULE

EMPTY = ""  # trampoline = the displaced instructions relocated, then a jump back
# compute(x) returns 2x+2 instead of 2x+1; `ret` is fine at a function's entry.
PLUS_ONE = "lea eax, [rdi+rdi+2]  # compute(x) = 2x+2\nret"


def build_id(exe: Path) -> str:
    from micropatch.elf.identity import identify

    with open(exe, "rb") as f:
        found = identify(f).build_id
    if not found:
        raise RuntimeError(f"{exe} has no GNU build-id (link with -Wl,--build-id)")
    return str(found)


def source(patch_id: str, build_id_hex: str, at: str, code: str, version: int = 1) -> str:
    return (
        "[patch]\n"
        f'id = "{patch_id}"\n'
        f"version = {version}\n\n"
        "[target]\n"
        f'module = "{MODULE}"\n'
        f'build_id = "{build_id_hex}"\n\n'
        "[[patchlet]]\n"
        f'at = "{at}"\n'
        f"code = '''\n{code}\n'''\n"
    )


def parse(text: str) -> Any:
    """The patch admitted as a development source, as `live.apply` takes it."""
    from micropatch.trust.admission import admit

    return admit(text.encode(), name="bench.toml", keys=None, allow_unsigned=True)


def engine_error() -> str | None:
    """Why the engine cannot be used, or None if its public API imports."""
    try:
        from micropatch import live  # noqa: F401
        from micropatch.elf.identity import identify  # noqa: F401
        from micropatch.trust.admission import admit  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None
