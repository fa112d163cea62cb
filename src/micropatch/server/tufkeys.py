"""micropatch's Ed25519 keys (`trust.keys`) as TUF keys and signers, and the key files
of a repository's ceremony, every problem as a RepositoryError."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from micropatch.errors import RepositoryError, SignatureError
from micropatch.trust.keys import (
    PrivateKey,
    PublicKey,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    write_key_pair,
)


def signer(key: PrivateKey) -> CryptoSigner:
    """A securesystemslib signer of a micropatch key."""
    private = Ed25519PrivateKey.from_private_bytes(key.seed)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def tuf_key(key: PublicKey) -> SSlibKey:
    """The TUF key of a micropatch public key."""
    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(key.raw))


def generate(name: str, now: datetime.datetime) -> PrivateKey:
    try:
        return generate_key(name, now=now)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None


def write_key(key: PrivateKey, where: Path) -> Path:
    """Write `key` as WHERE/NAME.key and .pub (never replacing a file); the .key path."""
    try:
        private_path, _ = write_key_pair(key, where / key.public.name)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None
    return private_path


def key_ids(keys: dict[str, Any]) -> str:
    """The micropatch key ids (those in the .pub files) of TUF keys, abbreviated."""
    return ", ".join(key_id(bytes.fromhex(k.keyval["public"]))[:16] for k in keys.values())


def load_keys(paths: Sequence[str | Path]) -> list[PrivateKey]:
    """Private keys from files, as RepositoryError on any problem."""
    try:
        return [load_private_key(p) for p in paths]
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None


def load_public(path: str | Path) -> PublicKey:
    try:
        return load_public_key(path)
    except SignatureError as exc:
        raise RepositoryError(str(exc)) from None
