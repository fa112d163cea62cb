"""The CLI's side of the admission policy: read the patch file, find the trusted
keys, and call `trust.policy.admit` (which prints nothing: the caller shows
`Admitted.described` and `Admitted.warnings`)."""

from __future__ import annotations

from micropatch.errors import ArtifactError, SignatureError
from micropatch.trust.envelope import MAX_SIZE
from micropatch.trust.keys import trusted_keys
from micropatch.trust.policy import Admitted, admit, is_source

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path


def load_for_apply(
    path: str | Path, trust: Sequence[str | Path] | None, allow_unsigned: bool
) -> Admitted:
    """The patch `apply`, `update` and `dev run` may give the engine."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from exc
    keys = None
    if not is_source(data, str(path)):  # a source is refused, or admitted, without keys
        try:
            keys = trusted_keys(trust or ())
        except SignatureError:
            if not allow_unsigned:
                raise
    return admit(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned)
