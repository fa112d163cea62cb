"""Ed25519 keys and detached signatures over byte strings.

A key pair is two small JSON files: `NAME.key` (private, mode 0600) and
`NAME.pub` (public, what verifiers trust). A key is known by its key id, the
SHA-256 of its raw 32-byte public key in hex, so a signature names the key
that made it and a verifier never has to guess. What is signed is the
caller's business (see `micropatch.trust.artifact`); every signature here is
made over `SIGNATURE_CONTEXT + message`, so that a micropatch key signing
something else can never produce a valid artifact signature by accident.

See docs/signing.md for the file formats.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from micropatch.errors import SignatureError
from micropatch.files import read_bounded, write_atomic
from micropatch.trust.paths import DEFAULT_TRUST_DIR, TRUST_DIR_VARIABLE

ALGORITHM = "ed25519"
KEY_FORMAT = "micropatch-key"
KEY_FORMAT_VERSION = 1
PUBLIC_SUFFIX = ".pub"
PRIVATE_SUFFIX = ".key"
SIGNATURE_CONTEXT = b"micropatch-artifact-signature-v1\x00"

MAX_KEY_FILE = 64 << 10  # a key file is a few hundred bytes
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TIME = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})T(\d{1,2}):(\d{1,2}):(\d{1,2})Z", re.ASCII)
_PUBLIC_FIELDS = frozenset(
    {"format", "format_version", "kind", "algorithm", "name", "keyid", "public_key"}
    | {"created", "expires"}
)
_PRIVATE_FIELDS = _PUBLIC_FIELDS | {"private_key"}


def key_id(public_key: bytes) -> str:
    """The key id: SHA-256 of the raw 32-byte Ed25519 public key, lowercase hex."""
    return hashlib.sha256(public_key).hexdigest()


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def format_time(moment: datetime.datetime) -> str:
    """`2025-06-01T12:00:00Z`: the one time format of keys and artifacts."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime.datetime:
    """Inverse of `format_time`; ValueError for anything else. (What strptime with
    "%Y-%m-%dT%H:%M:%SZ" accepts, without loading its locale machinery.)"""
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    year, month, day, hour, minute, second = map(int, match.groups())
    return datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Signature:
    """A detached signature: which key made it, and the 64 signature bytes."""

    keyid: str
    sig: bytes

    def to_json(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": self.sig.hex()}

    @classmethod
    def from_json(cls, value: object) -> Signature:
        """ValueError with the problem in words if `value` is not a signature entry."""
        if not isinstance(value, dict):
            raise ValueError("must be an object with keyid and sig")
        extra = sorted(set(value) - {"keyid", "sig"})
        if extra:
            raise ValueError(f"unknown field {extra[0]!r} (allowed: keyid, sig)")
        keyid, sig = value.get("keyid"), value.get("sig")
        if not isinstance(keyid, str) or not _HEX64.fullmatch(keyid):
            raise ValueError("keyid must be 64 lowercase hex digits (SHA-256 of the public key)")
        if not isinstance(sig, str) or not _HEX128.fullmatch(sig):
            raise ValueError("sig must be 128 lowercase hex digits (an Ed25519 signature)")
        return cls(keyid, bytes.fromhex(sig))


@dataclass(frozen=True)
class PublicKey:
    """A public key as a verifier knows it: from a `.pub` file."""

    name: str
    keyid: str
    raw: bytes
    created: datetime.datetime
    expires: datetime.datetime | None
    path: str  # where it was read from, for messages; "" if made in memory

    def expired(self, now: datetime.datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if `signature` is this key's signature of `message` (in our context)."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(
                signature, SIGNATURE_CONTEXT + message
            )
        except (InvalidSignature, ValueError):
            return False
        return True

    def describe(self) -> str:
        return f"key {self.name!r} ({self.keyid[:16]}…)"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": KEY_FORMAT,
            "format_version": KEY_FORMAT_VERSION,
            "kind": "public",
            "algorithm": ALGORITHM,
            "name": self.name,
            "keyid": self.keyid,
            "public_key": self.raw.hex(),
            "created": format_time(self.created),
            "expires": None if self.expires is None else format_time(self.expires),
        }


@dataclass(frozen=True)
class PrivateKey:
    """A signing key: the public half plus the 32-byte Ed25519 seed."""

    public: PublicKey
    seed: bytes

    def sign(self, message: bytes, now: datetime.datetime | None = None) -> Signature:
        """Sign `message`; an expired key refuses, since no verifier would accept it."""
        now = now or utc_now()
        if self.public.expired(now):
            raise SignatureError(
                f"{self.public.path or self.public.name}: {self.public.describe()} expired on "
                f"{expiry_text(self.public)}; generate a new key (micropatch keys generate) and "
                "distribute its .pub to the verifiers"
            )
        sig = Ed25519PrivateKey.from_private_bytes(self.seed).sign(SIGNATURE_CONTEXT + message)
        return Signature(self.public.keyid, sig)

    def to_json(self) -> dict[str, Any]:
        return {**self.public.to_json(), "kind": "private", "private_key": self.seed.hex()}


def generate_key(
    name: str, *, expires_days: int | None = None, now: datetime.datetime | None = None
) -> PrivateKey:
    """A new Ed25519 key pair called `name`, valid from now for `expires_days` days
    (for ever if None)."""
    if not _NAME.fullmatch(name):
        raise SignatureError(
            f"{name!r} is not a key name: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if expires_days is not None and expires_days < 1:
        raise SignatureError(f"--expires must be at least 1 day, got {expires_days}")
    created = now or utc_now()
    expires = None if expires_days is None else created + datetime.timedelta(days=expires_days)
    private = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    seed = private.private_bytes_raw()
    return PrivateKey(PublicKey(name, key_id(raw), raw, created, expires, ""), seed)


def write_key_pair(key: PrivateKey, stem: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write `stem.key` (mode 0600) and `stem.pub`; returns both paths.

    Existing files are kept unless `force`: overwriting a private key by
    accident loses the ability to sign for everyone who trusts it.
    """
    private_path = stem.with_name(stem.name + PRIVATE_SUFFIX)
    public_path = stem.with_name(stem.name + PUBLIC_SUFFIX)
    try:  # `keys/release`: a directory made for keys is private, as the key file is
        stem.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SignatureError(
            f"cannot create the directory {stem.parent} for {private_path.name}: {exc.strerror}"
        ) from None
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise SignatureError(
                    f"{path} already exists; pick another name, or pass --force to replace it"
                )
    _write(private_path, _dump(key.to_json()), 0o600, force)
    _write(public_path, _dump(key.public.to_json()), 0o644, force)
    return private_path, public_path


def _dump(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    try:
        write_atomic(path, data, mode=mode, replace=force)
    except FileExistsError:
        raise SignatureError(
            f"{path} already exists; pick another name, or pass --force to replace it"
        ) from None
    except OSError as exc:
        raise SignatureError(f"cannot write {path}: {exc.strerror}") from None


def load_public_key(path: str | Path) -> PublicKey:
    """Read a `.pub` file; SignatureError naming the file and the problem."""
    document = _read_key_file(Path(path))
    if document.get("kind") == "private":
        raise SignatureError(
            f"{path}: is a private key; trust the public key file (.pub) instead, and keep "
            "the .key file on the signing machine"
        )
    return _public_from(document, str(path), _PUBLIC_FIELDS)


def load_private_key(path: str | Path) -> PrivateKey:
    """Read a `.key` file; SignatureError naming the file and the problem."""
    document = _read_key_file(Path(path))
    if document.get("kind") != "private":
        raise SignatureError(
            f"{path}: is not a private key (kind {document.get('kind')!r}); sign with the "
            ".key file that `micropatch keys generate` wrote"
        )
    public = _public_from(document, str(path), _PRIVATE_FIELDS)
    seed = _hex_field(document, "private_key", str(path), _KEY_BYTES)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    derived = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )
    if derived != public.raw:
        raise SignatureError(
            f"{path}: malformed key file: private_key does not belong to public_key"
        )
    return PrivateKey(public, seed)


def _read_key_file(path: Path) -> dict[str, Any]:
    try:
        data = read_bounded(path, MAX_KEY_FILE)
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read key file: {exc.strerror}") from None
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SignatureError(
            f"{path}: malformed key file: not JSON; expected a key written by "
            "`micropatch keys generate`"
        ) from None
    if not isinstance(document, dict) or document.get("format") != KEY_FORMAT:
        raise SignatureError(
            f'{path}: malformed key file: not a micropatch key (no "format": "{KEY_FORMAT}")'
        )
    if document.get("format_version") != KEY_FORMAT_VERSION:
        raise SignatureError(
            f"{path}: key format version {document.get('format_version')!r} is not supported "
            f"(this micropatch reads version {KEY_FORMAT_VERSION})"
        )
    return document


def _public_from(document: dict[str, Any], path: str, allowed: frozenset[str]) -> PublicKey:
    def bad(problem: str) -> SignatureError:
        return SignatureError(f"{path}: malformed key file: {problem}")

    extra = sorted(set(document) - allowed)
    if extra:
        raise bad(f"unknown field {extra[0]!r}")
    if document.get("algorithm") != ALGORITHM:
        raise bad(f"algorithm {document.get('algorithm')!r} is not supported (only {ALGORITHM})")
    name = document.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad(f"name {name!r} is not a key name")
    raw = _hex_field(document, "public_key", path, _KEY_BYTES)
    if document.get("keyid") != key_id(raw):
        raise bad(
            f"keyid {document.get('keyid')!r} is not the SHA-256 of public_key ({key_id(raw)})"
        )
    created = _time_field(document, "created", path)
    if created is None:
        raise bad("created: required")
    expires = _time_field(document, "expires", path)
    return PublicKey(name, key_id(raw), raw, created, expires, path)


def _hex_field(document: dict[str, Any], field: str, path: str, size: int) -> bytes:
    value = document.get(field)
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-f]{{{2 * size}}}", value):
        raise SignatureError(
            f"{path}: malformed key file: {field} must be {2 * size} lowercase hex digits"
        )
    return bytes.fromhex(value)


def _time_field(document: dict[str, Any], field: str, path: str) -> datetime.datetime | None:
    value = document.get(field)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        return parse_time(value)
    except ValueError:
        raise SignatureError(
            f"{path}: malformed key file: {field} {value!r} is not a UTC time like "
            "2025-06-01T12:00:00Z"
        ) from None


def trusted_keys(files: Sequence[str | Path] = ()) -> list[PublicKey]:
    """The keys to trust: each of `files` (a `.pub` file, or a directory of them),
    or else every `.pub` file in $MICROPATCH_TRUST_DIR (default /etc/micropatch/trusted).

    Fails closed: an unreadable or malformed key file is an error, not a key
    silently left out, and so is finding no key at all.
    """
    if files:
        where = ", ".join(str(f) for f in files)
        paths = [p for f in files for p in _key_files(Path(f))]
    else:
        directory = Path(os.environ.get(TRUST_DIR_VARIABLE) or DEFAULT_TRUST_DIR)
        where = f"{directory} (${TRUST_DIR_VARIABLE})"
        paths = _key_files(directory) if directory.is_dir() else []
    keys = [load_public_key(p) for p in paths]
    if not keys:
        raise SignatureError(
            f"no trusted keys in {where}: pass --trust KEYFILE.pub (repeatable), or install "
            f"the signers' public keys (*{PUBLIC_SUFFIX}) in ${TRUST_DIR_VARIABLE} "
            f"(default {DEFAULT_TRUST_DIR})"
        )
    return keys


def _key_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    return [path]


def expiry_text(key: PublicKey) -> str:
    """When the key expires, for messages: a UTC time or "never"."""
    return "never" if key.expires is None else format_time(key.expires)
