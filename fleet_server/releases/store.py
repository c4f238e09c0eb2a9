"""SQL for releases: one row per published release target (wheels are not releases)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from fleet_wire.storage import transaction

migrations = Migrations("fleet_server.releases")

COLUMNS = (
    "path",
    "kind",
    "version",
    "counter",
    "profiles",
    "notes",
    "role",
    "sha256",
    "length",
    "published_at",
    "published_by",
    "restores",
    "rolls_back",
)


@migrations(name="0001_releases")
def _m0001(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE releases (
        path TEXT PRIMARY KEY, kind TEXT NOT NULL, version TEXT NOT NULL, counter INTEGER NOT NULL,
        profiles TEXT NOT NULL, notes TEXT NOT NULL, role TEXT NOT NULL, sha256 TEXT NOT NULL,
        length INTEGER NOT NULL, published_at TEXT NOT NULL, published_by TEXT NOT NULL,
        restores TEXT, rolls_back TEXT)""")
    db.execute("CREATE UNIQUE INDEX releases_kind_counter ON releases (kind, counter)")
    db.execute("CREATE INDEX releases_rolls_back ON releases (rolls_back)")


class ReleaseStore:
    """The releases table over one connection (the server's writer, or a read-only one per query)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Insert published releases; a path already there is kept as it was."""
        if not rows:
            return
        with transaction(self.conn):
            self.conn.executemany(
                f"INSERT OR IGNORE INTO releases ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                [tuple(json.dumps(list(r[c])) if c == "profiles" else r.get(c) for c in COLUMNS) for r in rows],
            )

    def paths(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT path FROM releases")}

    def get(self, path: str) -> dict[str, Any] | None:
        row = self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM releases WHERE path = ?", (path,)).fetchone()
        return _row(row) if row else None

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM releases"
        args: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            args = (kind,)
        return [_row(r) for r in self.conn.execute(sql + " ORDER BY kind, counter DESC", args)]

    def twin_of(self, path: str) -> str | None:
        row = self.conn.execute("SELECT path FROM releases WHERE rolls_back = ?", (path,)).fetchone()
        return str(row[0]) if row else None


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip(COLUMNS, row, strict=True))
    doc["profiles"] = tuple(json.loads(doc["profiles"]))
    return doc
