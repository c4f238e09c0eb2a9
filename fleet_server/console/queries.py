"""The console's reads that no service offers yet: a terminal's update reports and its rejects."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

UPDATE_REPORTS_LIMIT = 200
REJECTS_LIMIT = 20
DETAIL_CHARS = 160


def update_reports(conn: sqlite3.Connection, terminal: str, limit: int = UPDATE_REPORTS_LIMIT) -> list[dict[str, Any]]:
    """The terminal's stored `update.status` reports, oldest first (each a state of one rollout)."""
    rows = conn.execute(
        # through the terminal's stream numbers: the exactly-once key (stream, seq) is the only
        # index that finds one terminal's rows
        "SELECT ts, body FROM events INDEXED BY events_key"
        " WHERE stream IN (SELECT num FROM event_streams WHERE terminal=?)"
        " AND type='update.status' ORDER BY ts DESC LIMIT ?",
        (terminal, limit),
    ).fetchall()
    out = []
    for ts, body in reversed(rows):
        try:
            b = json.loads(body)
        except ValueError:
            continue
        out.append(
            {
                "at": ts,
                "rollout": str(b.get("rollout", "?")),
                "kind": str(b.get("kind", "")),
                "version": str(b.get("version", "")),
                "state": str(b.get("state", "")),
                "reason": str(b.get("reason", "")),
                "detail": str(b.get("detail", ""))[:DETAIL_CHARS],
            }
        )
    return out


def terminal_rejects(conn: sqlite3.Connection, terminal: str, limit: int = REJECTS_LIMIT) -> list[dict[str, Any]]:
    """The newest messages refused from this terminal's stream, with the reason."""
    cur = conn.execute(
        "SELECT at, topic, reason, detail, seq, size FROM rejects WHERE terminal=? ORDER BY id DESC LIMIT ?",
        (terminal, limit),
    )
    return [
        {"at": r[0], "topic": r[1], "reason": r[2], "detail": str(r[3])[:DETAIL_CHARS], "seq": r[4], "size": r[5]}
        for r in cur
    ]
