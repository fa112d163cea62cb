"""An artifact file's envelope: its payload as parsed JSON, the canonical bytes its
id and signatures are over, and the signatures; checked for structure, format
and id, and nothing more (standard library only).

This is what is read before anything is trusted: the signatures are verified
over `canonical` (`trust.signatures`) before the payload means anything. Then
either the patch is read from it as recorded (`trust.recorded`, what applying
needs) or the whole payload is validated (`trust.artifact`, for the server and
the author's tools).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from micropatch import __version__
from micropatch.errors import ArtifactError
from micropatch.files import read_bounded
from micropatch.trust.canonical import canonical_json, digest
from micropatch.trust.keys import Signature

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

FORMAT = "micropatch-artifact"
# Version 2 adds precomputed trampolines (`payload.sites[].trampoline`); an artifact
# without them is written as version 1, which micropatch before them still reads.
FORMAT_VERSION = 2  # the newest this micropatch reads and writes
FORMAT_VERSIONS = (1, 2)
SUFFIX = ".mpatch"
MAX_SIZE = 64 << 20  # no real artifact comes near; refuse before parsing a huge file


@dataclass(frozen=True)
class Envelope:
    """A parsed artifact file. `name` says where it came from, for messages."""

    # As parsed: nothing in it is checked yet but its format. Not compared: `canonical`
    # says the same, and a dict cannot be hashed.
    payload: dict[str, Any] = field(compare=False)
    canonical: bytes  # exactly the bytes the id and signatures are over
    signatures: tuple[Signature, ...]
    name: str

    @property
    def id(self) -> str:
        """The content address: SHA-256 of the canonical payload, hex."""
        return digest(self.canonical)


def read(path: str | Path) -> bytes:
    """An artifact file's bytes, read once and at most MAX_SIZE of them; ArtifactError
    naming the file and the problem (`larger than 64 MiB`)."""
    try:
        return read_bounded(path, MAX_SIZE)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact: {exc.strerror}") from None


def read_envelope(data: bytes, name: str = "<artifact>") -> Envelope:
    """Parse an artifact's bytes up to its payload; ArtifactError naming `name`."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{name}: {problem}")

    if len(data) > MAX_SIZE:
        raise bad(f"is larger than {MAX_SIZE >> 20} MiB, which no artifact is")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not an artifact: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        at_end = exc.pos >= len(text.rstrip())
        where = "the end" if at_end else f"line {exc.lineno}, column {exc.colno}"
        what = exc.msg[:1].lower() + exc.msg[1:]
        raise bad(
            f"not an artifact: invalid JSON at {where} ({what}); truncated or corrupt?"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"not an artifact: invalid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise bad("not an artifact: expected a JSON object with id, payload and signatures")
    missing = [k for k in ("id", "payload", "signatures") if k not in document]
    if missing:
        raise bad(f"not an artifact: missing field {', '.join(map(repr, missing))}")
    extra = sorted(set(document) - {"id", "payload", "signatures"})
    if extra:
        raise bad(f"unknown top-level field {extra[0]!r} (allowed: id, payload, signatures)")
    raw = document["payload"]
    if not isinstance(raw, dict):
        raise bad("payload: must be a JSON object")
    _check_format(raw, bad)
    try:
        canonical = canonical_json(raw)
    except ArtifactError as exc:
        raise bad(f"payload: {exc}") from None
    claimed = document["id"]
    actual = digest(canonical)
    if claimed != actual:
        raise bad(
            f"the payload's SHA-256 is {actual}, but the artifact says {claimed!r}: it was "
            "modified or corrupted after it was built"
        )
    if not isinstance(document["signatures"], list):
        raise bad("signatures: must be a list")
    signatures = []
    for i, entry in enumerate(document["signatures"]):
        try:
            signatures.append(Signature.from_json(entry))
        except ValueError as exc:
            raise bad(f"signatures[{i}]: {exc}") from None
    return Envelope(raw, canonical, tuple(signatures), name)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would make "the" payload depend on the parser.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _check_format(raw: dict[str, Any], bad: Callable[[str], ArtifactError]) -> None:
    kind, version = raw.get("format"), raw.get("format_version")
    if kind != FORMAT:
        raise bad(f"payload.format: {kind!r} is not {FORMAT!r}; not a micropatch artifact")
    if type(version) is not int:
        raise bad(f"payload.format_version: must be an integer, got {version!r}")
    if version not in FORMAT_VERSIONS:
        newer = " it was built by a newer micropatch: upgrade" if version > FORMAT_VERSION else ""
        readable = " and ".join(str(v) for v in FORMAT_VERSIONS)
        raise bad(
            f"payload.format_version: version {version} is not supported (this micropatch "
            f"{__version__} reads versions {readable});{newer or ' rebuild it'}"
        )
