"""SQL for playbook runs and their per-task events (values arrive already redacted)."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from fleet_server.clock import utc_now_iso
from fleet_server.db import ClosingConnection, connect
from fleet_wire.storage import transaction

migrations = Migrations("fleet_server.playbooks")


@migrations(name="0001_playbook_runs")
def _m0001(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE playbook_runs (
        id INTEGER PRIMARY KEY, playbook TEXT NOT NULL, target TEXT NOT NULL, status TEXT NOT NULL,
        rc INTEGER, started_by TEXT NOT NULL, extravars TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,
        ok_count INTEGER NOT NULL DEFAULT 0, changed_count INTEGER NOT NULL DEFAULT 0,
        failed_count INTEGER NOT NULL DEFAULT 0, skipped_count INTEGER NOT NULL DEFAULT 0)""")
    db.execute("CREATE INDEX playbook_runs_playbook ON playbook_runs (playbook, id)")
    db.execute("""CREATE TABLE playbook_events (
        id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES playbook_runs(id),
        at TEXT NOT NULL, host TEXT NOT NULL, task TEXT NOT NULL, action TEXT NOT NULL,
        status TEXT NOT NULL, duration_s REAL, message TEXT NOT NULL, paths TEXT NOT NULL)""")
    db.execute("CREATE INDEX playbook_events_run ON playbook_events (run_id, id)")


_RUN_COLUMNS = (
    "id, playbook, target, status, rc, started_by, extravars, error, created_at, started_at,"
    " finished_at, ok_count, changed_count, failed_count, skipped_count"
)
_COUNT_COLUMN = {"ok": "ok_count", "changed": "changed_count", "failed": "failed_count", "skipped": "skipped_count"}


class PlaybookStore:
    """Runs and events in the server database; one short connection per call, so any thread may."""

    def __init__(self, db_path: str | os.PathLike[str]) -> None:
        self.db_path = db_path

    def _conn(self) -> ClosingConnection:
        return connect(self.db_path)

    def create_run(self, playbook: str, target: str, started_by: str, extravars: dict[str, Any]) -> int:
        with self._conn() as db:
            cur = db.execute(
                "INSERT INTO playbook_runs (playbook, target, status, started_by, extravars, created_at)"
                " VALUES (?,?,?,?,?,?)",
                (playbook, target, "queued", started_by, json.dumps(extravars, ensure_ascii=False), utc_now_iso()),
            )
            return int(cur.lastrowid or 0)

    def mark_running(self, run_id: int) -> None:
        with self._conn() as db:
            db.execute("UPDATE playbook_runs SET status='running', started_at=? WHERE id=?", (utc_now_iso(), run_id))

    def finish_run(self, run_id: int, status: str, rc: int, error: str = "") -> None:
        with self._conn() as db:
            db.execute(
                "UPDATE playbook_runs SET status=?, rc=?, error=?, finished_at=? WHERE id=?",
                (status, rc, error, utc_now_iso(), run_id),
            )

    def add_event(
        self,
        run_id: int,
        host: str,
        task: str,
        action: str,
        status: str,
        duration_s: float | None,
        message: str,
        paths: list[str],
        counted: bool = True,
    ) -> None:
        with self._conn() as db, transaction(db, immediate=False):
            db.execute(
                "INSERT INTO playbook_events (run_id, at, host, task, action, status, duration_s, message,"
                " paths) VALUES (?,?,?,?,?,?,?,?,?)",
                (run_id, utc_now_iso(), host, task, action, status, duration_s, message, json.dumps(paths)),
            )
            if counted:
                column = _COUNT_COLUMN[status]  # from a fixed mapping, never from input
                db.execute(f"UPDATE playbook_runs SET {column} = {column} + 1 WHERE id=?", (run_id,))

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self._conn() as db:
            cur = db.execute(f"SELECT {_RUN_COLUMNS} FROM playbook_runs WHERE id=?", (run_id,))
            row = cur.fetchone()
            return _run(cur, row) if row else None

    def runs(self, limit: int = 50, playbook: str | None = None, target: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {_RUN_COLUMNS} FROM playbook_runs"
        params: list[Any] = []
        where: list[str] = []
        if playbook:
            where.append("playbook=?")
            params.append(playbook)
        if target:
            where.append("target=?")
            params.append(target)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        with self._conn() as db:
            cur = db.execute(sql, params)
            return [_run(cur, r) for r in cur.fetchall()]

    def events(self, run_id: int) -> list[dict[str, Any]]:
        with self._conn() as db:
            cur = db.execute(
                "SELECT id, run_id, at, host, task, action, status, duration_s, message, paths"
                " FROM playbook_events WHERE run_id=? ORDER BY id",
                (run_id,),
            )
            cols = [c[0] for c in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        for r in rows:
            r["paths"] = json.loads(r["paths"])
        return rows

    def fail_unfinished(self, error: str) -> int:
        """Mark runs a previous process left queued or running as failed; returns how many."""
        with self._conn() as db:
            return db.execute(
                "UPDATE playbook_runs SET status='failed', error=?, finished_at=? "
                "WHERE status IN ('queued', 'running')",
                (error, utc_now_iso()),
            ).rowcount


def _run(cur: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip((c[0] for c in cur.description), row))
    doc["extravars"] = json.loads(doc["extravars"])
    return doc
