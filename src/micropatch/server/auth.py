"""Secrets and who may do what.

Three kinds of bearer secret, told apart by their prefix:

- `mpu_…` an API token of a user (admin, operator or auditor);
- `mph_…` a host's credential, given once at enrollment;
- `mpe_…` a one-time enrollment token.

Each is 32 random bytes; only its SHA-256 is stored, so a copy of the database
grants nothing. Passwords (for `POST /api/v1/auth/token` and the web console's
login, `server.console`) are stored as argon2id hashes, and failed logins are
throttled per user name (`LoginThrottle`).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
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

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        if not stored:
            return False
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False


class LoginThrottle:
    """Failed logins per user name, over a sliding window: past `limit` of them, that
    name's logins are refused without checking the password until the oldest ages
    out, so a password cannot be guessed faster than `limit` per `window`. Names
    that do not exist count alike (no telling them apart). Kept in memory by each
    server process: with `--workers N`, N times `limit`."""

    def __init__(self, limit: int = 5, window: float = 900.0, names: int = 10_000) -> None:
        self.limit, self.window, self.names = limit, window, names
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def wait(self, name: str) -> float:
        """Seconds before `name` may try again (0: now)."""
        with self._lock:
            recent = self._recent(name)
            if len(recent) < self.limit:
                return 0.0
            return max(0.0, recent[-self.limit] + self.window - time.monotonic())

    def failed(self, name: str) -> None:
        with self._lock:
            recent = self._recent(name)
            recent.append(time.monotonic())
            self._failures[name] = recent[-self.limit :]
            if len(self._failures) > self.names:  # a flood of made-up names: forget the oldest
                del self._failures[next(iter(self._failures))]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)

    def _recent(self, name: str) -> list[float]:
        since = time.monotonic() - self.window
        return [t for t in self._failures.get(name, ()) if t > since]


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
