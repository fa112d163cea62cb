"""What the artifact tests share: a patch source for a test target and its file,
and the ways to change an artifact file that get past its hash check."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

from micropatch.elf.identity import identify
from micropatch.trust.artifact import Artifact, canonical_json

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}
DELETE = object()  # set_at's value that deletes the field


def identity_of(module: Path) -> tuple[str, str]:
    with open(module, "rb") as f:
        identity = identify(f)
    assert identity.build_id
    return identity.build_id, identity.sha256


def source(
    module: Path,
    patchlets: list[dict[str, object]],
    *,
    pin: str = "build_id",
    version: int = 1,
    name: str | None = None,
) -> str:
    build_id, sha256 = identity_of(module)
    lines = [
        "[patch]", 'id = "unit-fix"', f"version = {version}", 'title = "unit fix"', "",
        "[target]", f'module = "{name or module.name}"',
    ]  # fmt: skip
    if "build_id" in pin:
        lines.append(f'build_id = "{build_id}"')
    if "sha256" in pin:
        lines.append(f'sha256 = "{sha256}"')
    for p in patchlets:
        lines += ["", "[[patchlet]]", *(f"{k} = {json.dumps(v)}" for k, v in p.items())]
    return "\n".join(lines) + "\n"


def write_source(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fix.toml"
    path.write_text(text)
    return path


def resealed(document: dict[str, Any]) -> bytes:
    """An artifact file whose id matches its (changed) payload: past the hash check."""
    document = {**document, "id": hashlib.sha256(canonical_json(document["payload"])).hexdigest()}
    return json.dumps(document).encode()


def document_of(built: Artifact) -> dict[str, Any]:
    return json.loads(built.to_bytes())  # type: ignore[no-any-return]


def set_at(document: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    node: Any = document
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return document


def leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaf_paths(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in leaf_paths(v, (*path, i))]
    return [path]
