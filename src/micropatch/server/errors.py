"""The server's refusals, each a `ServerError` (micropatch's one hierarchy): the API
turns them into HTTP statuses (`server.app`), the CLI into its error line, the
console into an error page."""

from __future__ import annotations

from micropatch.errors import ServerError


class NotFound(ServerError):
    """The thing named does not exist (HTTP 404)."""


class Conflict(ServerError):
    """The request contradicts the stored state (HTTP 409)."""


class Invalid(ServerError):
    """The request is well formed but not acceptable (HTTP 422)."""


class Unauthorized(ServerError):
    """A secret is missing, unknown, expired or used up (HTTP 401)."""


class TooManyAttempts(ServerError):
    """Too many failed logins for a user name lately (HTTP 429, Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(ServerError):
    """The server is taken by other requests for now (HTTP 503, Retry-After)."""

    retry_after = 5
