"""Helpers for integration tests: patch sources for the targets, and the untouched check."""

from __future__ import annotations

import json
from pathlib import Path

from targets.harness import Targets

from micropatch import live
from micropatch.elf.identity import identify
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.trust.admission import Admitted, admit
from micropatch.trust.artifact import Artifact
from micropatch.trust.canonical import canonical_json
from micropatch.trust.payload import Payload


def build_id(path: Path) -> str:
    with open(path, "rb") as f:
        found = identify(f).build_id
    assert found
    return found


def patch_source(
    module: Path,
    patchlets: list[dict[str, object]],
    *,
    id: str = "test-fix",
    version: int = 1,
    build: str | None = None,
) -> str:
    """TOML text of a patch for `module`; patchlets as dicts of the [[patchlet]] fields."""
    lines = [
        "[patch]", f'id = "{id}"', f"version = {version}", f'title = "{id} v{version}"', "",
        "[target]", f'module = "{module.name}"', f'build_id = "{build or build_id(module)}"', "",
    ]  # fmt: skip
    for p in patchlets:
        lines.append("[[patchlet]]")
        for key, value in p.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def make_patch(module: Path, patchlets: list[dict[str, object]], **kw: object) -> Admitted:
    """A development patch for `module`, admitted as an unsigned source."""
    source = patch_source(module, patchlets, **kw)  # type: ignore[arg-type]
    return admit(source.encode(), name=f"{module.name}.toml", keys=None, allow_unsigned=True)


def without_templates(artifact: Artifact) -> Artifact:
    """`artifact` as the previous format built it: no precomputed trampolines
    (`build.precompute`), so applying plans and assembles them. Unsigned."""
    payload = json.loads(artifact.canonical)
    for site in payload["sites"]:
        del site["trampoline"]
    payload["format_version"] = 1
    return Artifact(Payload.model_validate(payload), canonical_json(payload), (), artifact.name)


def assert_untouched(
    targets: Targets, name: str, pid: int, symbols: list[str], module: Path | None = None
) -> None:
    """No cave, no registry, and the code of each function identical to the file."""
    maps = read_maps(pid)
    assert not [m for m in maps if "micropatch" in m.path], "a cave is still mapped"
    assert live.status(pid) == []
    path = module or targets.path(name)
    base = next(
        m.start for m in maps if m.inode and m.file_path == str(path.resolve()) and m.offset == 0
    )
    with Memory(pid, writable=False) as memory:
        for sym in symbols:
            symbol = targets.symbol(path, sym)
            expected = targets.code(path, sym)
            assert memory.read(base + symbol.offset, len(expected)) == expected, sym
