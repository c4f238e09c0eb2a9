"""Tokens: random, shown once, stored as SHA-256; failed logins throttled per source address;
the audit log records every admin change."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import threading
from collections.abc import Collection
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from fleet_server.auth.errors import NotAuthenticated, TooManyFailures, UserRefused
from fleet_server.auth.models import Role, User
from fleet_server.auth.passwords import WeakPassword, check_policy, dummy_hash, hash_password, verify_password
from fleet_server.auth.store import AuthStore
from fleet_server.auth.throttle import LoginThrottle
from fleet_server.registry.store import UnknownOffice

log = logging.getLogger(__name__)

# Keys whose values never reach the audit log or any log line.
SECRET_KEYS = frozenset({"password", "password_hash", "token", "token_hash", "secret", "api_token"})


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def redact(value: Any) -> Any:
    """A copy of `value` with secret-looking keys replaced by '***'."""
    if isinstance(value, dict):
        return {k: ("***" if k in SECRET_KEYS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header ('' when there is none)."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class AuthService:
    """Users and their tokens on the shared writer connection (under `lock`), and the audit log."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        lock: threading.RLock,
        registry: CollectorRegistry | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.store = AuthStore(conn)
        self.lock = lock
        self.throttle = throttle or LoginThrottle()
        self.failures_total = Counter(
            "fleet_auth_failures_total",
            "Requests refused for want of a valid token, by reason",
            ["reason"],
            registry=registry or CollectorRegistry(),
        )
        for reason in ("missing_token", "unknown_token", "throttled", "metrics_token"):
            self.failures_total.labels(reason=reason)

    # -- users --------------------------------------------------------------------------------------

    def create_user(self, name: str, role: Role, offices: list[str] | None = None, token: str | None = None) -> str:
        """Create or replace a user; returns their bearer token (shown once). Not audited: bootstrap."""
        token = token or secrets.token_urlsafe(32)
        if role != Role.MANAGER:
            offices = None
        elif not offices:
            raise UserRefused("a manager needs at least one assigned office")
        with self.lock:
            self.store.upsert_user(name, role, offices, hash_token(token))
        return token

    def add_user(
        self, actor: User, name: str, role: Role, offices: list[str] | None, known_offices: Collection[str]
    ) -> str:
        """An admin creates (or re-issues) a user: audited with before and after; the token is shown once."""
        unknown = sorted(set(offices or []) - set(known_offices))
        if unknown:
            raise UnknownOffice(f"unknown office(s): {', '.join(unknown)}")
        with self.lock:
            before = self.store.get_user(name)
            token = self.create_user(name, role, offices)
            self.audit(
                actor,
                "user.create",
                name,
                None if before is None else {"role": before.role.value},
                {"role": role.value, "offices": offices if role == Role.MANAGER else None},
            )
        return token

    def users(self) -> list[User]:
        with self.lock:
            return self.store.users()

    def user(self, name: str) -> User | None:
        """An enabled user by name."""
        found = self.login_stamp(name)
        return found[0] if found else None

    def login_stamp(self, name: str) -> tuple[User, str] | None:
        """An enabled user and a digest of their current password hash: a console session made with
        another stamp (the password changed since) is no longer valid. Never the hash itself."""
        with self.lock:
            found = self.store.password_hash(name)
        if found is None:
            return None
        return found[0], hashlib.sha256((found[1] or "").encode()).hexdigest()[:32]

    # -- console passwords ---------------------------------------------------------------------------

    def set_password(self, actor: User | str, name: str, password: str) -> None:
        """Set a user's console password (audited; the password itself never reaches the log)."""
        try:
            check_policy(password)
        except WeakPassword as err:
            raise UserRefused(str(err)) from err
        digest = hash_password(password)
        with self.lock:
            if not self.store.set_password_hash(name, digest):
                raise UserRefused(f"there is no user {name!r}; create it first")
            self.audit(actor, "user.password", name, None, {"password_set": True})

    def bootstrap_password(self, name: str, password: str) -> None:
        """Give the bootstrap admin its console password from settings (not audited, like its token)."""
        try:
            check_policy(password)
        except WeakPassword as err:
            raise UserRefused(f"FLEET_ADMIN_PASSWORD: {err}") from err
        with self.lock:
            self.store.set_password_hash(name, hash_password(password))

    def check_password(self, name: str, password: str) -> User | None:
        """The user if `password` is theirs; None otherwise (as slowly for an unknown user)."""
        with self.lock:
            found = self.store.password_hash(name[:64])
        stored = found[1] if found else None
        ok = verify_password(password, stored or dummy_hash())
        return found[0] if found and stored and ok else None

    # -- who is calling -------------------------------------------------------------------------------

    def authenticate(self, token: str) -> User | None:
        if not token:
            return None
        with self.lock:
            return self.store.user_by_token_hash(hash_token(token))

    def login(self, authorization: str | None, address: str) -> User:
        """The caller of one request, from its Authorization header and source address.

        Raises NotAuthenticated (401) or, after too many failures from `address`, TooManyFailures (429).
        """
        token = bearer_token(authorization)
        if not token:
            self.failures_total.labels(reason="missing_token").inc()
            raise NotAuthenticated("missing bearer token")
        digest = hash_token(token)
        self._check_throttle(address, digest)
        user = self.authenticate(token)
        if user is None:
            self._failed(address, "unknown_token")
            raise NotAuthenticated("unknown bearer token")
        self.throttle.succeeded(address, digest)
        return user

    def check_metrics_token(self, authorization: str | None, address: str, expected: str) -> None:
        """Let a scraper through only with the metrics token (its own, not a user's)."""
        token = bearer_token(authorization)
        digest = hash_token(token)
        self._check_throttle(address, digest)
        if not token or not hmac.compare_digest(digest, hash_token(expected)):
            self._failed(address, "metrics_token")
            raise NotAuthenticated("metrics need the metrics bearer token")
        self.throttle.succeeded(address, digest)

    def _check_throttle(self, address: str, digest: str) -> None:
        wait = self.throttle.wait_s(address, digest)
        if wait > 0:
            self.failures_total.labels(reason="throttled").inc()
            raise TooManyFailures(address, wait)

    def _failed(self, address: str, reason: str) -> None:
        self.failures_total.labels(reason=reason).inc()
        f = self.throttle.failed(address)
        if f.blocked_for_s:
            log.warning(
                "failed login from %s (%s): %d within %.0f s; refusing that address for %.0f s",
                address,
                reason,
                f.recent,
                self.throttle.window_s,
                f.blocked_for_s,
            )
        else:
            log.warning(
                "failed login from %s (%s): %d within %.0f s", address, reason, f.recent, self.throttle.window_s
            )

    # -- audit ----------------------------------------------------------------------------------------

    def audit(self, actor: User | str, action: str, target: str, before: Any = None, after: Any = None) -> int:
        """Record an admin change: who, what, when, before and after (secrets redacted)."""
        name = actor.name if isinstance(actor, User) else actor
        with self.lock:
            return self.store.record(name, action, target, redact(before), redact(after))

    def audit_log(
        self,
        limit: int = 100,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        """The newest audit entries first, optionally for one actor, action, target or time range."""
        with self.lock:
            return self.store.audit(limit, actor, action, target, since, until)
