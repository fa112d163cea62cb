"""Secrets and who may do what.

Three kinds of bearer secret, told apart by their prefix:

- `mpu_…` an API token of a user (admin, operator or auditor);
- `mph_…` a host's credential, given once at enrollment;
- `mpe_…` a one-time enrollment token.

Each is 32 random bytes; only its SHA-256 is stored, so a copy of the database
grants nothing. Passwords (for `POST /api/v1/auth/token` and the web console's
login, `server.console`) are stored as argon2id hashes, and failed logins are
throttled per user name and per address (`server.throttle`).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

USER_PREFIX = "mpu_"
HOST_PREFIX = "mph_"
ENROLL_PREFIX = "mpe_"

# Which roles may do what. A host credential is not a role: it reaches only the
# host endpoints, and there only its own data.
READ = frozenset({"admin", "operator", "auditor"})
PUBLISH = frozenset({"admin", "operator"})  # publish, revoke, policies
ADMIN = frozenset({"admin"})  # users, enrollment tokens, groups, moving hosts


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Passwords:
    """argon2id with the library's recommended parameters; one per server."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        # Verified against when there is no stored hash (no such user, a user without
        # a password), so that such a login takes as long as a wrong password.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        """Whether `password` matches `stored`; as slow when there is nothing stored."""
        if not stored:
            self._verify(self._dummy, password)
            return False
        return self._verify(stored, password)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False


@dataclass(frozen=True)
class Principal:
    """Who a request is from: a user with a role, or an enrolled host."""

    kind: str  # "user" | "host"
    id: int
    name: str
    role: str | None = None  # users only

    @property
    def actor(self) -> str:
        """How the audit log names it."""
        return f"{self.kind}:{self.name}" if self.kind == "user" else f"host:{self.id}"
