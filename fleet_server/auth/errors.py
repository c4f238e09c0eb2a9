"""Why a caller was turned away; the app's one error handler makes HTTP answers of these."""

from __future__ import annotations


class AuthError(Exception):
    """Root of authentication and authorisation errors."""


class NotAuthenticated(AuthError):
    """No bearer token, or one nobody holds: send a valid token (HTTP 401)."""


class NotAllowed(AuthError):
    """The caller's role or offices do not cover this: ask an admin (HTTP 403)."""


class TooManyFailures(AuthError):
    """Too many failed logins from this address lately: wait `retry_after_s`, then retry (HTTP 429)."""

    def __init__(self, address: str, retry_after_s: float) -> None:
        self.address = address
        self.retry_after_s = retry_after_s
        super().__init__(f"too many failed logins from {address}; retry in {max(1, round(retry_after_s))} s")


class UserRefused(AuthError):
    """A user cannot be created as asked (e.g. a manager without offices): fix the request (HTTP 422)."""
