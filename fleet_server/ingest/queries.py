"""SQL reads for the ingest's HTTP views: stored events, rejects. Office filters are applied in
SQL, before any LIMIT, so a manager's page is full of their own offices' rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any


def _in(column: str, values: Sequence[str] | None) -> tuple[str, list[str]]:
    if values is None:
        return "1=1", []
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


class IngestQueries:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn

    def events_by_office(self, offices: Sequence[str] | None) -> dict[str, int]:
        where, params = _in("office_id", offices)
        return dict(
            self._db.execute(f"SELECT office_id, count(*) FROM events WHERE {where} GROUP BY office_id", params)
        )

    def events_by_type(self, offices: Sequence[str] | None) -> dict[str, int]:
        where, params = _in("office_id", offices)
        return dict(self._db.execute(f"SELECT type, count(*) FROM events WHERE {where} GROUP BY type", params))

    def offices(self, offices: Sequence[str] | None) -> dict[str, dict[str, Any]]:
        where, params = _in("id", offices)
        return {
            r[0]: {"name": r[1], "pilot": bool(r[2])}
            for r in self._db.execute(f"SELECT id, name, pilot FROM offices WHERE {where} ORDER BY id", params)
        }

    def _rejects_where(self, offices: Sequence[str] | None) -> tuple[str, list[str]]:
        """Rejects of terminals enrolled in `offices`; for None, every reject (unknown senders too)."""
        if offices is None:
            return "1=1", []
        where, params = _in("office_id", offices)
        return f"terminal IN (SELECT id FROM terminals WHERE {where})", params

    def rejects_by_reason(self, offices: Sequence[str] | None) -> dict[str, int]:
        where, params = self._rejects_where(offices)
        return dict(self._db.execute(f"SELECT reason, count(*) FROM rejects WHERE {where} GROUP BY reason", params))

    def recent_rejects(self, offices: Sequence[str] | None, limit: int) -> list[dict[str, Any]]:
        """The newest refused messages first, at most `limit`."""
        where, params = self._rejects_where(offices)
        cur = self._db.execute(
            "SELECT at, terminal, topic, reason, detail, epoch, seq, size FROM rejects"
            f" WHERE {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur]
