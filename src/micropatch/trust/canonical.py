"""Canonical JSON: the exact bytes an artifact's id and signatures are over.

Sorted keys, no whitespace, ASCII escapes, no floats: one value, one spelling.
"""

from __future__ import annotations

import hashlib
import json

from micropatch.errors import ArtifactError


def canonical_json(value: object) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no whitespace, ASCII only.

    ArtifactError if the value has no canonical form (floats, NaN, nesting too
    deep to encode).
    """
    _refuse_floats(value)
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (ValueError, TypeError, RecursionError) as exc:
        raise ArtifactError(f"value has no canonical JSON form: {exc}") from None


def _refuse_floats(value: object, depth: int = 0) -> None:
    # Floats have several spellings of one value; an artifact has no use for them.
    if depth > 200:
        raise ArtifactError("value has no canonical JSON form: nested more than 200 levels")
    if isinstance(value, float):
        raise ArtifactError(f"value has no canonical JSON form: float {value!r}")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_floats(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_floats(item, depth + 1)


def digest(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()
