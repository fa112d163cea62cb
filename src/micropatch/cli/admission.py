"""The CLI's side of admission: read the patch file, find the trusted
keys, and call `trust.admission.admit` (which prints nothing: the caller shows
`Admitted.described` and `Admitted.warnings`)."""

from __future__ import annotations

from micropatch.errors import SignatureError
from micropatch.trust.admission import Admitted, AdmittedPython, admit, admit_any, is_source
from micropatch.trust.envelope import read
from micropatch.trust.keys import PublicKey, trusted_keys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path


def load_for_apply(
    path: str | Path, trust: Sequence[str | Path] | None, allow_unsigned: bool
) -> Admitted:
    """The native patch `dev run` may give the engine."""
    data, keys = _read(path, trust, allow_unsigned)
    return admit(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned)


def load_any_for_apply(
    path: str | Path, trust: Sequence[str | Path] | None, allow_unsigned: bool
) -> Admitted | AdmittedPython:
    """The patch `apply` and `update` may give an engine: its `runtime` says which."""
    data, keys = _read(path, trust, allow_unsigned)
    return admit_any(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned)


def _read(
    path: str | Path, trust: Sequence[str | Path] | None, allow_unsigned: bool
) -> tuple[bytes, list[PublicKey] | None]:
    data = read(path)
    keys = None
    if not is_source(data, str(path)):  # a source is refused, or admitted, without keys
        try:
            keys = list(trusted_keys(trust or ()))
        except SignatureError:
            if not allow_unsigned:
                raise
    return data, keys
