"""SQL for usage rollups: hour and day buckets per office x service item, and dirty office-days."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from fleet_server.usage.figures import pack_durations
from fleet_wire.storage import transaction

migrations = Migrations("fleet_server.usage")

_COUNTS = "started, completed, abandoned, face_login_sessions"


@migrations(name="0001_usage_rollups")
def _m0001(db: sqlite_utils.Database) -> None:
    # day/hour are office-local (the office's timezone), weekday 0 = Monday.
    db.execute("""CREATE TABLE usage_hour (
        office_id TEXT NOT NULL, day TEXT NOT NULL, hour INTEGER NOT NULL, service_code TEXT NOT NULL,
        weekday INTEGER NOT NULL, started INTEGER NOT NULL, completed INTEGER NOT NULL,
        abandoned INTEGER NOT NULL, face_login_sessions INTEGER NOT NULL,
        duration_sum_s REAL NOT NULL, duration_median_s REAL, duration_p90_s REAL,
        PRIMARY KEY (office_id, day, hour, service_code)) WITHOUT ROWID""")
    # durations: the day's sorted completed durations, so a median over any range of days is exact
    # (JSON here; packed doubles since 0002).
    db.execute("""CREATE TABLE usage_day (
        office_id TEXT NOT NULL, day TEXT NOT NULL, service_code TEXT NOT NULL,
        weekday INTEGER NOT NULL, started INTEGER NOT NULL, completed INTEGER NOT NULL,
        abandoned INTEGER NOT NULL, face_login_sessions INTEGER NOT NULL,
        duration_sum_s REAL NOT NULL, duration_median_s REAL, duration_p90_s REAL,
        durations TEXT NOT NULL, PRIMARY KEY (office_id, day, service_code)) WITHOUT ROWID""")
    db.execute("""CREATE TABLE usage_office_day (
        office_id TEXT NOT NULL, day TEXT NOT NULL, terminals_active INTEGER NOT NULL,
        PRIMARY KEY (office_id, day)) WITHOUT ROWID""")
    # version grows on every mark, so a rebuild clears only marks it has seen (see UsageService).
    db.execute("""CREATE TABLE usage_dirty (
        office_id TEXT NOT NULL, day TEXT NOT NULL, version INTEGER NOT NULL, marked_at TEXT NOT NULL,
        PRIMARY KEY (office_id, day)) WITHOUT ROWID""")
    db.execute("CREATE TABLE usage_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migrations(name="0002_usage_durations_binary")
def _m0002(db: sqlite_utils.Database) -> None:
    # durations: JSON text -> packed doubles (figures.pack_durations), read without parsing, so a
    # range's exact median needs no JSON decoding and no full merge (figures.select_ranks).
    db.execute("""CREATE TABLE usage_day_new (
        office_id TEXT NOT NULL, day TEXT NOT NULL, service_code TEXT NOT NULL,
        weekday INTEGER NOT NULL, started INTEGER NOT NULL, completed INTEGER NOT NULL,
        abandoned INTEGER NOT NULL, face_login_sessions INTEGER NOT NULL,
        duration_sum_s REAL NOT NULL, duration_median_s REAL, duration_p90_s REAL,
        durations BLOB NOT NULL, PRIMARY KEY (office_id, day, service_code)) WITHOUT ROWID""")
    cols = (
        "office_id, day, service_code, weekday, started, completed, abandoned, face_login_sessions,"
        " duration_sum_s, duration_median_s, duration_p90_s"
    )
    cur = db.execute(f"SELECT {cols}, durations FROM usage_day")
    while batch := cur.fetchmany(1000):
        db.conn.executemany(
            f"INSERT INTO usage_day_new ({cols}, durations) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*r[:11], pack_durations(sorted(float(v) for v in json.loads(r[11])))) for r in batch],
        )
    db.execute("DROP TABLE usage_day")
    db.execute("ALTER TABLE usage_day_new RENAME TO usage_day")


@dataclass(frozen=True, slots=True)
class BucketRow:
    """One rebuilt rollup row; hour is None for a day row."""

    service_code: str
    hour: int | None
    weekday: int
    started: int
    completed: int
    abandoned: int
    face_login_sessions: int
    duration_sum_s: float
    duration_median_s: float | None
    duration_p90_s: float | None
    durations: Sequence[float] = ()


@dataclass(frozen=True, slots=True)
class OfficeRow:
    id: str
    name: str
    name_en: str
    pilot: bool
    timezone: str


def _in(column: str, values: Sequence[str] | None) -> tuple[str, list[str]]:
    if values is None:
        return "1=1", []
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


class UsageStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._db = conn

    # -- registry reads ----------------------------------------------------------------------------

    def offices(self) -> list[OfficeRow]:
        return [
            OfficeRow(r[0], r[1], r[2], bool(r[3]), r[4])
            for r in self._db.execute("SELECT id, name, name_en, pilot, timezone FROM offices ORDER BY pilot DESC, id")
        ]

    # -- dirty marks -------------------------------------------------------------------------------

    def mark_dirty(self, pairs: Iterable[tuple[str, str]], now: str, received_upto: str | None = None) -> None:
        """Mark office-days; with `received_upto`, move the watermark forward in the same transaction."""
        with transaction(self._db):
            self._db.executemany(
                "INSERT INTO usage_dirty (office_id, day, version, marked_at) VALUES (?,?,1,?)"
                " ON CONFLICT(office_id, day) DO UPDATE SET version=version+1, marked_at=excluded.marked_at",
                [(o, d, now) for o, d in pairs],
            )
            if received_upto is not None:
                self._db.execute(
                    "INSERT INTO usage_state (key, value) VALUES ('watermark', ?) ON CONFLICT(key)"
                    " DO UPDATE SET value=max(value, excluded.value)",
                    (received_upto,),
                )

    def dirty_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM usage_dirty").fetchone()[0])

    def dirty_batch(self, limit: int) -> list[tuple[str, str, int]]:
        return [
            (r[0], r[1], int(r[2]))
            for r in self._db.execute(
                "SELECT office_id, day, version FROM usage_dirty ORDER BY marked_at, office_id, day LIMIT ?", (limit,)
            )
        ]

    # -- raw events --------------------------------------------------------------------------------

    def service_events(self, office_id: str, ts_from: str, ts_to: str) -> list[tuple[str, str, str, str]]:
        """(terminal, type, ts, body) of the office's service events with ts_from <= ts < ts_to."""
        return list(
            self._db.execute(
                "SELECT terminal, type, ts, body FROM events WHERE office_id=? AND ts>=? AND ts<?"
                " AND type IN ('service.started','service.completed','service.abandoned')",
                (office_id, ts_from, ts_to),
            )
        )

    def received_since(self, received_at: str) -> list[tuple[str, str]]:
        """(office, UTC hour prefix of ts) of service events received at or after `received_at`.

        Read by rowid from the first row received at or after that moment, without an index on
        received_at that every stored row would pay for (see fleet_server/db.py, 0005).
        """
        start = self._first_rowid_received(received_at)
        if start is None:
            return []
        return list(
            self._db.execute(
                "SELECT DISTINCT office_id, substr(ts, 1, 13) FROM events WHERE rowid>=? AND received_at>=?"
                " AND type IN ('service.started','service.completed','service.abandoned')",
                (start, received_at),
            )
        )

    def _first_rowid_received(self, received_at: str) -> int | None:
        """The first rowid of `events` received at or after `received_at` (None for an empty table).

        Rowids grow with insertion and the ingest stamps each batch with the time it stores it, so
        received_at grows along the rowids and a binary search over them finds the start in about
        log2(rows) point reads. A rowid past the end means no row qualifies. (A server clock that
        stepped back makes received_at fall once; the catch-up's own margin covers small steps.)
        """
        # two subqueries: SQLite answers a lone min() or max() from the end of the B-tree
        lo, last = self._db.execute(
            "SELECT (SELECT min(rowid) FROM events), (SELECT max(rowid) FROM events)"
        ).fetchone()
        if lo is None:
            return None
        hi = last + 1  # every row before `lo` was received earlier; the answer is at most `hi`
        while lo < hi:
            mid = (lo + hi) // 2
            # the first row at or after `mid` (rowids may have gaps); one exists since mid <= last
            rowid, at = self._db.execute(
                "SELECT rowid, received_at FROM events WHERE rowid>=? ORDER BY rowid LIMIT 1", (mid,)
            ).fetchone()
            if at >= received_at:
                hi = mid
            else:
                lo = rowid + 1
        return int(lo)

    # -- rebuild -----------------------------------------------------------------------------------

    def replace_day(
        self,
        office_id: str,
        day: str,
        version: int,
        hours: Sequence[BucketRow],
        days: Sequence[BucketRow],
        terminals_active: int,
    ) -> bool:
        """Swap in the rebuilt buckets of one office-day; clear its mark unless re-marked since.

        Returns whether the mark was cleared.
        """
        with transaction(self._db):
            for table in ("usage_hour", "usage_day", "usage_office_day"):
                self._db.execute(f"DELETE FROM {table} WHERE office_id=? AND day=?", (office_id, day))
            self._db.executemany(
                f"INSERT INTO usage_hour (office_id, day, hour, service_code, weekday, {_COUNTS},"
                " duration_sum_s, duration_median_s, duration_p90_s) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        office_id,
                        day,
                        b.hour,
                        b.service_code,
                        b.weekday,
                        b.started,
                        b.completed,
                        b.abandoned,
                        b.face_login_sessions,
                        b.duration_sum_s,
                        b.duration_median_s,
                        b.duration_p90_s,
                    )
                    for b in hours
                ],
            )
            self._db.executemany(
                f"INSERT INTO usage_day (office_id, day, service_code, weekday, {_COUNTS}, duration_sum_s,"
                " duration_median_s, duration_p90_s, durations) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        office_id,
                        day,
                        b.service_code,
                        b.weekday,
                        b.started,
                        b.completed,
                        b.abandoned,
                        b.face_login_sessions,
                        b.duration_sum_s,
                        b.duration_median_s,
                        b.duration_p90_s,
                        pack_durations(b.durations),
                    )
                    for b in days
                ],
            )
            if terminals_active:
                self._db.execute(
                    "INSERT INTO usage_office_day (office_id, day, terminals_active) VALUES (?,?,?)",
                    (office_id, day, terminals_active),
                )
            cleared = (
                self._db.execute(
                    "DELETE FROM usage_dirty WHERE office_id=? AND day=? AND version=?", (office_id, day, version)
                ).rowcount
                > 0
            )
        return cleared

    def get_state(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM usage_state WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # -- rollup reads ------------------------------------------------------------------------------

    def day_rows(self, offices: Sequence[str] | None, day_from: str, day_to: str) -> list[tuple[Any, ...]]:
        """(office, day, code, weekday, started, completed, abandoned, face, sum, median, p90, durations).

        durations: the day's sorted completed durations, packed (figures.unpack_durations).
        """
        where, params = _in("office_id", offices)
        return list(
            self._db.execute(
                f"SELECT office_id, day, service_code, weekday, {_COUNTS}, duration_sum_s, duration_median_s,"
                f" duration_p90_s, durations FROM usage_day WHERE {where} AND day>=? AND day<=?"
                " ORDER BY office_id, day, service_code",
                (*params, day_from, day_to),
            )
        )

    def hour_rows(self, offices: Sequence[str] | None, day_from: str, day_to: str) -> list[tuple[Any, ...]]:
        """(office, day, hour, code, weekday, started, completed, abandoned, face, sum, median, p90)."""
        where, params = _in("office_id", offices)
        return list(
            self._db.execute(
                f"SELECT office_id, day, hour, service_code, weekday, {_COUNTS}, duration_sum_s,"
                f" duration_median_s, duration_p90_s FROM usage_hour WHERE {where} AND day>=? AND day<=?"
                " ORDER BY office_id, day, hour, service_code",
                (*params, day_from, day_to),
            )
        )

    def started_by_weekday_hour(
        self, offices: Sequence[str] | None, day_from: str, day_to: str
    ) -> dict[tuple[int, int], int]:
        """Started sessions summed per (weekday, hour) over the hour buckets of a range."""
        where, params = _in("office_id", offices)
        return {
            (int(r[0]), int(r[1])): int(r[2])
            for r in self._db.execute(
                f"SELECT weekday, hour, sum(started) FROM usage_hour WHERE {where} AND day>=? AND day<=?"
                " GROUP BY weekday, hour",
                (*params, day_from, day_to),
            )
        }

    def terminal_days(self, offices: Sequence[str] | None, day_from: str, day_to: str) -> dict[str, int]:
        """Per office: the sum over days of terminals that had any service event that day."""
        where, params = _in("office_id", offices)
        return {
            r[0]: int(r[1])
            for r in self._db.execute(
                f"SELECT office_id, sum(terminals_active) FROM usage_office_day WHERE {where}"
                " AND day>=? AND day<=? GROUP BY office_id",
                (*params, day_from, day_to),
            )
        }
