"""Tokens: random, shown once, stored as SHA-256; the audit log records every admin change."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from typing import Any

from fleet_server.auth.models import Role, User
from fleet_server.auth.store import AuthStore

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


class AuthService:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.store = AuthStore(conn)

    def create_user(self, name: str, role: Role, offices: list[str] | None = None, token: str | None = None) -> str:
        """Create or replace a user; returns their bearer token (shown once)."""
        token = token or secrets.token_urlsafe(32)
        if role != Role.MANAGER:
            offices = None
        elif not offices:
            raise ValueError("a manager needs at least one assigned office")
        self.store.upsert_user(name, role, offices, hash_token(token))
        return token

    def authenticate(self, token: str) -> User | None:
        if not token:
            return None
        return self.store.user_by_token_hash(hash_token(token))

    def audit(self, actor: User | str, action: str, target: str, before: Any = None, after: Any = None) -> int:
        """Record an admin change: who, what, when, before and after (secrets redacted)."""
        name = actor.name if isinstance(actor, User) else actor
        return self.store.record(name, action, target, redact(before), redact(after))
