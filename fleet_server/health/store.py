"""SQL for health: transitions, alerts, and the status rows the ingest stored."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from fleet_wire.storage import transaction

migrations = Migrations("fleet_server.health")

ALERT_COLUMNS = ("id", "kind", "subject", "office_id", "severity", "state", "message", "fired_at", "resolved_at")


@migrations(name="0001_health")
def _m0001(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE health_transitions (
        id INTEGER PRIMARY KEY, terminal TEXT NOT NULL, at TEXT NOT NULL, from_state TEXT NOT NULL,
        to_state TEXT NOT NULL, reason TEXT NOT NULL)""")
    db.execute("CREATE INDEX health_transitions_terminal ON health_transitions (terminal, id)")
    db.execute("""CREATE TABLE alerts (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, subject TEXT NOT NULL, office_id TEXT NOT NULL,
        severity TEXT NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL, fired_at TEXT NOT NULL,
        resolved_at TEXT)""")
    db.execute("CREATE INDEX alerts_state ON alerts (state, kind)")


@migrations(name="0002_alerts_by_office")
def _m0002(db: sqlite_utils.Database) -> None:
    # A manager's alert list filters by office before its LIMIT.
    db.execute("CREATE INDEX alerts_office ON alerts (office_id, id)")


class HealthStore:
    """Health's tables over one connection (the service's writer, or a read-only one per query)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- start-up --------------------------------------------------------------------------------

    def status_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(terminal, state, reason, last_seen, doc) of every terminal's last status."""
        return [
            tuple(r) for r in self.conn.execute("SELECT terminal, state, reason, last_seen, doc FROM terminal_status")
        ]

    def firing_alerts(self) -> list[tuple[int, str, str]]:
        """(id, kind, subject) of the alerts firing now."""
        return [tuple(r) for r in self.conn.execute("SELECT id, kind, subject FROM alerts WHERE state='firing'")]

    def last_transitions(self) -> list[tuple[str, str, str]]:
        """(terminal, to_state, at) of each terminal's latest transition."""
        return [
            tuple(r)
            for r in self.conn.execute(
                "SELECT terminal, to_state, at FROM health_transitions WHERE id IN"
                " (SELECT max(id) FROM health_transitions GROUP BY terminal)"
            )
        ]

    # -- the sweep -------------------------------------------------------------------------------

    def record(
        self,
        at: str,
        transitions: Sequence[tuple[str, str, str, str]],
        fired: Sequence[tuple[str, str, str, str, str]],
        resolved: Sequence[int],
    ) -> list[int]:
        """In one transaction: transitions (terminal, from, to, reason), alerts fired (kind, subject,
        office, severity, message) and alert ids resolved; returns the new alerts' ids in order."""
        c = self.conn
        ids: list[int] = []
        with transaction(c):
            c.executemany(
                "INSERT INTO health_transitions (terminal, at, from_state, to_state, reason) VALUES (?,?,?,?,?)",
                [(t, at, a, b, r) for t, a, b, r in transitions],
            )
            for kind, subject, office, severity, message in fired:
                cur = c.execute(
                    "INSERT INTO alerts (kind, subject, office_id, severity, state, message, fired_at)"
                    " VALUES (?,?,?,?,'firing',?,?)",
                    (kind, subject, office, severity, message, at),
                )
                ids.append(int(cur.lastrowid or 0))
            c.executemany("UPDATE alerts SET state='resolved', resolved_at=? WHERE id=?", [(at, i) for i in resolved])
        return ids

    # -- queries ---------------------------------------------------------------------------------

    def transitions(self, terminal: str, limit: int = 50) -> list[dict[str, Any]]:
        """A terminal's latest transitions, newest first."""
        return [
            {"at": r[0], "from": r[1], "to": r[2], "reason": r[3]}
            for r in self.conn.execute(
                "SELECT at, from_state, to_state, reason FROM health_transitions WHERE terminal=?"
                " ORDER BY id DESC LIMIT ?",
                (terminal, limit),
            )
        ]

    def alerts(self, active_only: bool, offices: Sequence[str] | None, limit: int) -> list[dict[str, Any]]:
        """Newest alerts first; `offices` (None: all) filters before the limit."""
        where: list[str] = []
        args: list[Any] = []
        if active_only:
            where.append("state='firing'")
        if offices is not None:
            if not offices:
                return []
            where.append(f"office_id IN ({','.join('?' * len(offices))})")
            args.extend(offices)
        sql = f"SELECT {', '.join(ALERT_COLUMNS)} FROM alerts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        keys = ["office" if c == "office_id" else c for c in ALERT_COLUMNS]
        return [dict(zip(keys, r, strict=True)) for r in self.conn.execute(sql, (*args, limit))]
