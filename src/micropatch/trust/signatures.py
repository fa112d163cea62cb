"""Checking an artifact's signatures against the trusted keys."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from micropatch.errors import SignatureError
from micropatch.trust.keys import PublicKey, Signature, expiry_text, utc_now


@dataclass(frozen=True)
class Verification:
    """The trusted keys whose signatures hold, and what was wrong with the others."""

    signers: tuple[PublicKey, ...]
    ignored: tuple[str, ...]


def verify_signatures(
    what: str,
    message: bytes,
    signatures: Iterable[Signature],
    trusted: Iterable[PublicKey],
    now: datetime.datetime | None = None,
) -> Verification:
    """Check that at least one of `signatures` over `message` is by a key in `trusted`
    that has not expired. `what` names the signed file in messages.

    Raises SignatureError listing, for every signature, why it does not count.
    """
    now = now or utc_now()
    keys = {k.keyid: k for k in trusted}
    signers: list[PublicKey] = []
    problems: list[str] = []
    signatures = list(signatures)
    if not signatures:
        # `what` is a file's name, or a description ("the uploaded artifact": the server)
        # that is no argument of a command.
        file = what if what.split() == [what] else "ARTIFACT.mpatch"
        raise SignatureError(
            f"{what}: is not signed; sign it with `micropatch sign {file} --key KEY.key` "
            "(or build it with --key)"
        )
    for signature in signatures:
        key = keys.get(signature.keyid)
        if key is None:
            problems.append(f"signed by key {signature.keyid[:16]}…, which is not trusted")
        elif key.expired(now):
            problems.append(f"signed by {key.describe()}, which expired on {expiry_text(key)}")
        elif not key.verify(signature.sig, message):
            problems.append(
                f"the signature by {key.describe()} does not match the content: the artifact "
                "was modified after it was signed, or the signature is corrupt"
            )
        elif key not in signers:
            signers.append(key)
    if not signers:
        trusted_ids = ", ".join(f"{k.name} ({k.keyid[:16]}…)" for k in keys.values()) or "none"
        raise SignatureError(
            f"{what}: no valid signature by a trusted key: "
            + "; ".join(problems)
            + f" (trusted: {trusted_ids})"
        )
    return Verification(tuple(signers), tuple(problems))
