"""SQL for users and the audit log."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from fleet_server.auth.models import Role, User
from fleet_server.clock import utc_now_iso

migrations = Migrations("fleet_server.auth")


@migrations(name="0001_user_passwords")
def _m0001(db: sqlite_utils.Database) -> None:
    # the console's login; NULL: this user signs in with a bearer token only (scripts, fleetctl)
    db.execute("ALTER TABLE users ADD COLUMN password_hash TEXT")
    db.execute("CREATE INDEX audit_target ON audit (target, id)")


class AuthStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn

    def upsert_user(self, name: str, role: Role, offices: list[str] | None, token_hash: str) -> None:
        self._db.execute(
            "INSERT INTO users (name, role, offices, token_hash, created_at, disabled) VALUES (?,?,?,?,?,0)"
            " ON CONFLICT(name) DO UPDATE SET role=excluded.role, offices=excluded.offices,"
            " token_hash=excluded.token_hash, disabled=0",
            (name, role.value, None if offices is None else json.dumps(sorted(offices)), token_hash, utc_now_iso()),
        )

    def user_by_token_hash(self, token_hash: str) -> User | None:
        row = self._db.execute(
            "SELECT name, role, offices FROM users WHERE token_hash=? AND disabled=0", (token_hash,)
        ).fetchone()
        return _user(row) if row else None

    def get_user(self, name: str) -> User | None:
        row = self._db.execute("SELECT name, role, offices FROM users WHERE name=?", (name,)).fetchone()
        return _user(row) if row else None

    def set_password_hash(self, name: str, password_hash: str) -> bool:
        """Store a user's password hash; False when there is no such (enabled) user."""
        cur = self._db.execute("UPDATE users SET password_hash=? WHERE name=? AND disabled=0", (password_hash, name))
        return cur.rowcount > 0

    def password_hash(self, name: str) -> tuple[User, str | None] | None:
        """An enabled user and their password hash (None: no password set)."""
        row = self._db.execute(
            "SELECT name, role, offices, password_hash FROM users WHERE name=? AND disabled=0", (name,)
        ).fetchone()
        return (_user(row[:3]), row[3]) if row else None

    def users(self) -> list[User]:
        return [
            _user(r) for r in self._db.execute("SELECT name, role, offices FROM users WHERE disabled=0 ORDER BY name")
        ]

    def record(self, actor: str, action: str, target: str, before: Any, after: Any) -> int:
        cur = self._db.execute(
            "INSERT INTO audit (at, actor, action, target, before, after) VALUES (?,?,?,?,?,?)",
            (
                utc_now_iso(),
                actor,
                action,
                target,
                json.dumps(before, ensure_ascii=False, default=str),
                json.dumps(after, ensure_ascii=False, default=str),
            ),
        )
        return int(cur.lastrowid or 0)

    def audit(
        self,
        limit: int = 100,
        actor: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        sql = "SELECT id, at, actor, action, target, before, after FROM audit"
        where: list[str] = []
        params: list[Any] = []
        for column, op, value in (
            ("actor", "=", actor),
            ("action", "=", action),
            ("target", "=", target),
            ("at", ">=", since),
            ("at", "<", until),
        ):
            if value:
                where.append(f"{column}{op}?")
                params.append(value)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [
            {
                "id": r[0],
                "at": r[1],
                "actor": r[2],
                "action": r[3],
                "target": r[4],
                "before": json.loads(r[5]),
                "after": json.loads(r[6]),
            }
            for r in self._db.execute(sql, params)
        ]


def _user(row: tuple[str, str, str | None]) -> User:
    offices = None if row[2] is None else frozenset(json.loads(row[2]))
    return User(row[0], Role(row[1]), offices)
