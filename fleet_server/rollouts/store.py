"""SQL for rollouts: plans, waves, each terminal's state in each rollout, its history, and the
engine's high-water mark over the ingested `update.status` events. Batch statements only: the
engine's tick touches thousands of rows and never asks one terminal at a time."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("fleet_server.rollouts")

ROLLOUT_COLUMNS = (
    "id",
    "release",
    "kind",
    "version",
    "counter",
    "profiles",
    "plan",
    "state",
    "current_wave",
    "reason",
    "reason_code",
    "created_by",
    "created_at",
    "approved_by",
    "approved_at",
    "updated_at",
    "parent",
    "superseded_by",
)
WAVE_COLUMNS = ("rollout", "idx", "name", "state", "size", "started_at", "soak_since", "passed_at", "note", "forgiven")
# one terminal in one rollout; the engine keeps these as lists in this order
TERMINAL_COLUMNS = (
    "rollout",
    "terminal",
    "wave",
    "office",
    "state",
    "reason",
    "detail",
    "cmd",
    "report",
    "attempts",
    "sends",
    "last_sent",
    "next_send",
    "state_since",
    "retry_at",
    "late",
)
(
    T_ROLLOUT,
    T_TERMINAL,
    T_WAVE,
    T_OFFICE,
    T_STATE,
    T_REASON,
    T_DETAIL,
    T_CMD,
    T_REPORT,
    T_ATTEMPTS,
    T_SENDS,
    T_LAST_SENT,
    T_NEXT_SEND,
    T_STATE_SINCE,
    T_RETRY_AT,
    T_LATE,
) = range(len(TERMINAL_COLUMNS))


@migrations(name="0001_rollouts")
def _m0001(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE rollouts (
        id TEXT PRIMARY KEY, release TEXT NOT NULL, kind TEXT NOT NULL, version TEXT NOT NULL,
        counter INTEGER NOT NULL, profiles TEXT NOT NULL, plan TEXT NOT NULL, state TEXT NOT NULL,
        current_wave INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT '', reason_code TEXT NOT NULL DEFAULT '',
        created_by TEXT NOT NULL, created_at TEXT NOT NULL, approved_by TEXT, approved_at TEXT,
        updated_at TEXT NOT NULL, parent TEXT, superseded_by TEXT)""")
    db.execute("CREATE INDEX rollouts_state ON rollouts (state)")
    db.execute("""CREATE TABLE rollout_waves (
        rollout TEXT NOT NULL REFERENCES rollouts(id), idx INTEGER NOT NULL, name TEXT NOT NULL,
        state TEXT NOT NULL, size INTEGER NOT NULL, started_at REAL, soak_since REAL, passed_at REAL,
        note TEXT NOT NULL DEFAULT '', forgiven INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (rollout, idx))""")
    # times the engine compares are Unix seconds (REAL); what people read is formatted on the way out
    db.execute("""CREATE TABLE rollout_terminals (
        rollout TEXT NOT NULL REFERENCES rollouts(id), terminal TEXT NOT NULL, wave INTEGER NOT NULL,
        office TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT 'ok',
        detail TEXT NOT NULL DEFAULT '', cmd TEXT NOT NULL, report INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0, sends INTEGER NOT NULL DEFAULT 0, last_sent REAL,
        next_send REAL, state_since REAL, retry_at REAL, late INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout, terminal))""")
    db.execute("CREATE INDEX rollout_terminals_terminal ON rollout_terminals (terminal)")
    db.execute("""CREATE TABLE rollout_history (
        id INTEGER PRIMARY KEY, rollout TEXT NOT NULL, terminal TEXT NOT NULL, at REAL NOT NULL,
        from_state TEXT NOT NULL, to_state TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
        cmd TEXT NOT NULL, report INTEGER NOT NULL, source TEXT NOT NULL)""")
    db.execute("CREATE INDEX rollout_history_terminal ON rollout_history (terminal, id)")
    db.execute("CREATE INDEX rollout_history_rollout ON rollout_history (rollout, terminal, id)")
    db.execute("CREATE TABLE rollout_cursor (name TEXT PRIMARY KEY, upto INTEGER NOT NULL)")
    # what each terminal last said about its trusted metadata (for the preview's stale flag)
    db.execute("""CREATE TABLE update_terminal_meta (
        terminal TEXT PRIMARY KEY, metadata_expires TEXT, running TEXT, at REAL NOT NULL)""")


def _rollout(row: Sequence[Any]) -> dict[str, Any]:
    doc = dict(zip(ROLLOUT_COLUMNS, row, strict=True))
    doc["profiles"] = json.loads(doc["profiles"])
    doc["plan"] = json.loads(doc["plan"])
    return doc


class RolloutStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- rollouts and waves ----------------------------------------------------------------------

    def insert_rollout(
        self,
        doc: dict[str, Any],
        waves: Sequence[tuple[int, str, str, int]],
        terminals: Sequence[tuple[str, int, str, str]],
    ) -> None:
        """A new rollout, its waves (idx, name, state, size) and terminals (terminal, wave, office, cmd)."""
        c = self.conn
        values = dict(doc)
        values["profiles"] = json.dumps(list(values["profiles"]))
        values["plan"] = json.dumps(values["plan"], ensure_ascii=False, default=str)
        cols = ", ".join(ROLLOUT_COLUMNS)
        marks = ", ".join("?" for _ in ROLLOUT_COLUMNS)
        c.execute(f"INSERT INTO rollouts ({cols}) VALUES ({marks})", [values.get(k) for k in ROLLOUT_COLUMNS])
        c.executemany(
            "INSERT INTO rollout_waves (rollout, idx, name, state, size) VALUES (?, ?, ?, ?, ?)",
            [(doc["id"], *w) for w in waves],
        )
        c.executemany(
            "INSERT INTO rollout_terminals (rollout, terminal, wave, office, state, cmd)"
            " VALUES (?, ?, ?, ?, 'pending', ?)",
            [(doc["id"], t, w, o, cmd) for t, w, o, cmd in terminals],
        )

    def exists(self, rollout_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM rollouts WHERE id=?", (rollout_id,)).fetchone() is not None

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            f"SELECT {', '.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE id=?", (rollout_id,)
        ).fetchone()
        return _rollout(row) if row else None

    def rollouts(self, states: Iterable[str] | None = None, limit: int = 200) -> list[dict[str, Any]]:
        cols = ", ".join(ROLLOUT_COLUMNS)
        if states is None:
            rows = self.conn.execute(f"SELECT {cols} FROM rollouts ORDER BY created_at DESC, id LIMIT ?", (limit,))
        else:
            wanted = list(states)
            marks = ", ".join("?" for _ in wanted)
            rows = self.conn.execute(
                f"SELECT {cols} FROM rollouts WHERE state IN ({marks}) ORDER BY created_at, id LIMIT ?",
                (*wanted, limit),
            )
        return [_rollout(r) for r in rows]

    def update_rollout(self, rollout_id: str, **fields: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        self.conn.execute(f"UPDATE rollouts SET {sets} WHERE id=?", (*fields.values(), rollout_id))

    def waves(self, rollout_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {r: [] for r in rollout_ids}
        if not rollout_ids:
            return out
        marks = ", ".join("?" for _ in rollout_ids)
        for row in self.conn.execute(
            f"SELECT {', '.join(WAVE_COLUMNS)} FROM rollout_waves WHERE rollout IN ({marks}) ORDER BY rollout, idx",
            list(rollout_ids),
        ):
            doc = dict(zip(WAVE_COLUMNS, row, strict=True))
            out[doc["rollout"]].append(doc)
        return out

    def update_waves(self, rows: Sequence[dict[str, Any]]) -> None:
        self.conn.executemany(
            "UPDATE rollout_waves SET state=?, size=?, started_at=?, soak_since=?, passed_at=?, note=?, forgiven=?"
            " WHERE rollout=? AND idx=?",
            [
                (
                    w["state"],
                    w["size"],
                    w["started_at"],
                    w["soak_since"],
                    w["passed_at"],
                    w["note"],
                    w["forgiven"],
                    w["rollout"],
                    w["idx"],
                )
                for w in rows
            ],
        )

    # -- terminals ---------------------------------------------------------------------------------

    def terminal_rows(self, rollout_ids: Sequence[str]) -> list[list[Any]]:
        """Every terminal row of these rollouts, as mutable lists in TERMINAL_COLUMNS order."""
        if not rollout_ids:
            return []
        marks = ", ".join("?" for _ in rollout_ids)
        return [
            list(r)
            for r in self.conn.execute(
                f"SELECT {', '.join(TERMINAL_COLUMNS)} FROM rollout_terminals WHERE rollout IN ({marks})",
                list(rollout_ids),
            )
        ]

    def rows_for(self, keys: Sequence[tuple[str, str]]) -> list[list[Any]]:
        """The rows of (rollout, terminal) pairs, in batches."""
        out: list[list[Any]] = []
        keys = list(keys)
        for i in range(0, len(keys), 400):
            part = keys[i : i + 400]
            values = ", ".join("(?, ?)" for _ in part)
            flat = [x for k in part for x in k]
            out.extend(
                list(r)
                for r in self.conn.execute(
                    f"SELECT {', '.join(TERMINAL_COLUMNS)} FROM rollout_terminals"
                    f" WHERE (rollout, terminal) IN (VALUES {values})",
                    flat,
                )
            )
        return out

    def save_terminals(self, rows: Iterable[Sequence[Any]]) -> None:
        cols = TERMINAL_COLUMNS[2:]
        sets = ", ".join(f"{c}=?" for c in cols)
        self.conn.executemany(
            f"UPDATE rollout_terminals SET {sets} WHERE rollout=? AND terminal=?",
            [(*r[2:], r[0], r[1]) for r in rows],
        )

    def add_terminals(self, rows: Sequence[tuple[str, str, int, str, str]]) -> None:
        """Terminals joining a rollout late: (rollout, terminal, wave, office, cmd)."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO rollout_terminals (rollout, terminal, wave, office, state, cmd, late)"
            " VALUES (?, ?, ?, ?, 'pending', ?, 1)",
            rows,
        )

    def members(self, rollout_ids: Sequence[str]) -> set[tuple[str, str]]:
        if not rollout_ids:
            return set()
        marks = ", ".join("?" for _ in rollout_ids)
        return {
            (r[0], r[1])
            for r in self.conn.execute(
                f"SELECT rollout, terminal FROM rollout_terminals WHERE rollout IN ({marks})", list(rollout_ids)
            )
        }

    def terminals_of(self, rollout_id: str, wave: int | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(TERMINAL_COLUMNS)} FROM rollout_terminals WHERE rollout=?"
        args: list[Any] = [rollout_id]
        if wave is not None:
            sql += " AND wave=?"
            args.append(wave)
        return [
            dict(zip(TERMINAL_COLUMNS, r, strict=True))
            for r in self.conn.execute(sql + " ORDER BY wave, terminal", args)
        ]

    def counts(self, rollout_ids: Sequence[str]) -> list[tuple[str, int, str, str, int]]:
        """(rollout, wave, office, state, terminals)."""
        if not rollout_ids:
            return []
        marks = ", ".join("?" for _ in rollout_ids)
        return [
            tuple(r)
            for r in self.conn.execute(
                f"SELECT rollout, wave, office, state, count(*) FROM rollout_terminals WHERE rollout IN ({marks})"
                " GROUP BY rollout, wave, office, state",
                list(rollout_ids),
            )
        ]

    def failure_reasons(self, rollout_id: str) -> list[tuple[int, str, str, str, int]]:
        """(wave, office, state, reason, terminals) of the failed terminals."""
        return [
            tuple(r)
            for r in self.conn.execute(
                "SELECT wave, office, state, reason, count(*) FROM rollout_terminals WHERE rollout=?"
                " AND state IN ('failed', 'rolled_back', 'rejected', 'timed_out') GROUP BY wave, office, state, reason",
                (rollout_id,),
            )
        ]

    # -- history -----------------------------------------------------------------------------------

    def add_history(self, rows: Sequence[tuple[str, str, float, str, str, str, str, str, int, str]]) -> None:
        """(rollout, terminal, at, from, to, reason, detail, cmd, report, source)."""
        self.conn.executemany(
            "INSERT INTO rollout_history (rollout, terminal, at, from_state, to_state, reason, detail, cmd, report,"
            " source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def history(self, terminal: str, rollout: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        cols = ("rollout", "at", "from_state", "to_state", "reason", "detail", "cmd", "report", "source")
        sql = f"SELECT {', '.join(cols)} FROM rollout_history WHERE terminal=?"
        args: list[Any] = [terminal]
        if rollout is not None:
            sql += " AND rollout=?"
            args.append(rollout)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [dict(zip(cols, r, strict=True)) for r in self.conn.execute(sql, args)][::-1]

    def histories(self, rollout: str) -> dict[str, list[dict[str, Any]]]:
        cols = ("terminal", "at", "from_state", "to_state", "reason", "detail", "report", "source")
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.conn.execute(
            f"SELECT {', '.join(cols)} FROM rollout_history WHERE rollout=? ORDER BY terminal, id", (rollout,)
        ):
            doc = dict(zip(cols, r, strict=True))
            out.setdefault(doc.pop("terminal"), []).append(doc)
        return out

    # -- the ingested reports ----------------------------------------------------------------------

    def cursor(self) -> int:
        row = self.conn.execute("SELECT upto FROM rollout_cursor WHERE name='update.status'").fetchone()
        if row is not None:
            return int(row[0])
        return 0

    def set_cursor(self, upto: int) -> None:
        self.conn.execute(
            "INSERT INTO rollout_cursor (name, upto) VALUES ('update.status', ?)"
            " ON CONFLICT(name) DO UPDATE SET upto=excluded.upto",
            (upto,),
        )

    def reports_after(self, upto: int, limit: int) -> tuple[int, list[tuple[str, str]]]:
        """The (terminal, body) of update.status events among the next `limit` events stored after
        rowid `upto`, and the last rowid looked at (the new high-water mark)."""
        last = upto
        out: list[tuple[str, str]] = []
        for rowid, terminal, body in self.conn.execute(
            "SELECT rowid, terminal, CASE WHEN type='update.status' THEN body END FROM events"
            " WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (upto, limit),
        ):
            last = rowid
            if body is not None:
                out.append((terminal, body))
        return int(last), out

    def last_event_rowid(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()[0])

    def save_meta(self, rows: Sequence[tuple[str, str | None, str, float]]) -> None:
        self.conn.executemany(
            "INSERT INTO update_terminal_meta (terminal, metadata_expires, running, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(terminal) DO UPDATE SET metadata_expires=coalesce(excluded.metadata_expires,"
            " metadata_expires), running=excluded.running, at=excluded.at",
            rows,
        )

    def meta(self) -> dict[str, tuple[str | None, str]]:
        return {
            r[0]: (r[1], r[2])
            for r in self.conn.execute("SELECT terminal, metadata_expires, running FROM update_terminal_meta")
        }
