"""SQL for offices and terminals."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from fleet_server.clock import utc_now_iso
from fleet_server.registry.schemas import Office, TerminalCreate, TerminalPublic
from fleet_wire.storage import transaction


class RegistryError(Exception):
    """Root of registry errors."""


class UnknownOffice(RegistryError):
    pass


class DuplicateTerminal(RegistryError):
    pass


class UnknownTerminal(RegistryError):
    pass


class UnknownProfile(RegistryError):
    pass


class OfficeMismatch(RegistryError):
    """A terminal in a request names another office than the one the request is for: fix the request."""


_TERMINAL_COLUMNS = "id, office_id, profile, tags, enabled, created_at, revoked_at"


def _terminal(r: tuple[Any, ...]) -> TerminalPublic:
    return TerminalPublic(
        id=r[0],
        office_id=r[1],
        profile=r[2],
        tags=json.loads(r[3]),
        enabled=bool(r[4]),
        created_at=r[5],
        revoked_at=r[6],
    )


class RegistryStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn

    def upsert_offices(self, offices: Iterable[Office]) -> int:
        rows = [
            (
                o.id,
                o.name,
                o.name_en,
                o.district,
                int(o.pilot),
                o.timezone,
                json.dumps(o.hours, ensure_ascii=False),
                o.maintenance,
            )
            for o in offices
        ]
        with transaction(self._db):
            self._db.executemany(
                "INSERT INTO offices (id, name, name_en, district, pilot, timezone, hours, maintenance)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET name=excluded.name,"
                " name_en=excluded.name_en, district=excluded.district, pilot=excluded.pilot,"
                " timezone=excluded.timezone, hours=excluded.hours, maintenance=excluded.maintenance",
                rows,
            )
        return len(rows)

    def offices(self) -> list[Office]:
        cur = self._db.execute(
            "SELECT id, name, name_en, district, pilot, timezone, hours, maintenance FROM offices"
            " ORDER BY pilot DESC, id"
        )
        return [
            Office(
                id=r[0],
                name=r[1],
                name_en=r[2],
                district=r[3],
                pilot=bool(r[4]),
                timezone=r[5],
                hours=json.loads(r[6]),
                maintenance=r[7],
            )
            for r in cur
        ]

    def add_terminal(self, terminal: TerminalCreate, password_hash: str) -> TerminalPublic:
        if not self._db.execute("SELECT 1 FROM offices WHERE id=?", (terminal.office_id,)).fetchone():
            raise UnknownOffice(f"office {terminal.office_id!r} is not in the registry")
        created = utc_now_iso()
        try:
            self._db.execute(
                "INSERT INTO terminals (id, office_id, profile, tags, password_hash, enabled, created_at)"
                " VALUES (?,?,?,?,?,1,?)",
                (terminal.id, terminal.office_id, terminal.profile, json.dumps(terminal.tags), password_hash, created),
            )
        except sqlite3.IntegrityError as err:
            raise DuplicateTerminal(f"terminal {terminal.id!r} is already enrolled") from err
        return TerminalPublic(
            id=terminal.id,
            office_id=terminal.office_id,
            profile=terminal.profile,
            tags=terminal.tags,
            enabled=True,
            created_at=created,
        )

    def revoke_terminal(self, terminal_id: str) -> None:
        cur = self._db.execute("UPDATE terminals SET enabled=0, revoked_at=? WHERE id=?", (utc_now_iso(), terminal_id))
        if cur.rowcount == 0:
            raise UnknownTerminal(f"terminal {terminal_id!r} is not in the registry")

    def set_password_hash(self, terminal_id: str, password_hash: str) -> None:
        cur = self._db.execute(
            "UPDATE terminals SET password_hash=? WHERE id=? AND enabled=1", (password_hash, terminal_id)
        )
        if cur.rowcount == 0:
            raise UnknownTerminal(f"terminal {terminal_id!r} is not enrolled (or was revoked)")

    def terminal(self, terminal_id: str) -> TerminalPublic | None:
        row = self._db.execute(f"SELECT {_TERMINAL_COLUMNS} FROM terminals WHERE id=?", (terminal_id,)).fetchone()
        return _terminal(row) if row else None

    def terminals(self, office_id: str | None = None) -> list[TerminalPublic]:
        """Every enrolled terminal by id, or one office's (the console's office page asks for a few
        hundred of 10,000)."""
        if office_id is None:
            return [_terminal(r) for r in self._db.execute(f"SELECT {_TERMINAL_COLUMNS} FROM terminals ORDER BY id")]
        return [
            _terminal(r)
            for r in self._db.execute(
                f"SELECT {_TERMINAL_COLUMNS} FROM terminals WHERE office_id=? ORDER BY id", (office_id,)
            )
        ]

    def enabled_terminal_offices(self) -> dict[str, str]:
        """terminal id → office id, for enabled terminals only."""
        return dict(self._db.execute("SELECT id, office_id FROM terminals WHERE enabled=1"))

    def password_hashes(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT id, password_hash FROM terminals WHERE enabled=1"))
