"""The server's SQLite database: connections and migrations (sqlite-utils)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Literal

import sqlite_utils
from sqlite_utils.migrations import Migrations

migrations = Migrations("fleet_server")


@migrations(name="0001_registry_and_ingest")
def _m0001(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE offices (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, name_en TEXT NOT NULL, district TEXT NOT NULL,
        pilot INTEGER NOT NULL, timezone TEXT NOT NULL, hours TEXT NOT NULL, maintenance TEXT NOT NULL)""")
    db.execute("""CREATE TABLE terminals (
        id TEXT PRIMARY KEY, office_id TEXT NOT NULL REFERENCES offices(id), profile TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]', password_hash TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL, revoked_at TEXT)""")
    db.execute("""CREATE TABLE events (
        terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
        type TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, office_id TEXT NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (terminal, epoch, seq)) WITHOUT ROWID""")
    db.execute("CREATE INDEX events_office_ts ON events (office_id, ts)")
    db.execute("""CREATE TABLE streams (
        terminal TEXT NOT NULL, epoch TEXT NOT NULL, upto INTEGER NOT NULL, ranges TEXT NOT NULL,
        stored INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
        quarantined INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,
        first_seen TEXT NOT NULL, last_seen TEXT NOT NULL, PRIMARY KEY (terminal, epoch))""")
    db.execute("""CREATE TABLE dropped (
        terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, reason TEXT NOT NULL,
        original_type TEXT NOT NULL, original_class INTEGER NOT NULL, ts TEXT NOT NULL,
        PRIMARY KEY (terminal, epoch, seq)) WITHOUT ROWID""")
    db.execute("""CREATE TABLE rejects (
        id INTEGER PRIMARY KEY, at TEXT NOT NULL, terminal TEXT, topic TEXT NOT NULL,
        reason TEXT NOT NULL, detail TEXT NOT NULL, epoch TEXT, seq INTEGER, size INTEGER NOT NULL)""")
    db.execute("CREATE INDEX rejects_reason ON rejects (reason)")
    db.execute("""CREATE TABLE terminal_status (
        terminal TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL, since TEXT NOT NULL,
        last_seen TEXT NOT NULL, doc TEXT NOT NULL)""")


@migrations(name="0002_users_audit_health_usage")
def _m0002(db: sqlite_utils.Database) -> None:
    db.execute("""CREATE TABLE users (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, offices TEXT, token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL, disabled INTEGER NOT NULL DEFAULT 0)""")
    db.execute("""CREATE TABLE audit (
        id INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, before TEXT NOT NULL, after TEXT NOT NULL)""")
    db.execute("ALTER TABLE terminals ADD COLUMN agent_version TEXT")


@migrations(name="0003_events_rowid")
def _m0003(db: sqlite_utils.Database) -> None:
    # A WITHOUT ROWID table keeps each ~300-byte row inside the primary-key B-tree, so every
    # insert lands in the middle of wide leaf pages and the cost per row grew as the table filled
    # (15 -> 67 µs CPU over a few hundred thousand rows, measured); SQLite advises WITHOUT ROWID
    # only for small rows. A rowid table appends rows at its end and keeps the exactly-once key
    # in a narrow UNIQUE index, which `INSERT OR IGNORE` honours just the same.
    # `dropped` keeps WITHOUT ROWID: its tombstone rows are small and rare.
    cols = "terminal, epoch, seq, id, type, ts, received_at, office_id, body"
    db.execute("""CREATE TABLE events_rowid (
        terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
        type TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, office_id TEXT NOT NULL,
        body TEXT NOT NULL)""")
    # arrival order, as new rows will be appended; indexes built once after the copy
    db.execute(
        f"INSERT INTO events_rowid ({cols}) SELECT {cols} FROM events ORDER BY received_at, terminal, epoch, seq"
    )
    db.execute("DROP TABLE events")
    db.execute("ALTER TABLE events_rowid RENAME TO events")
    db.execute("CREATE UNIQUE INDEX events_key ON events (terminal, epoch, seq)")
    db.execute("CREATE INDEX events_office_ts ON events (office_id, ts)")
    # the usage rollups' restart catch-up asks for everything received since a moment
    db.execute("CREATE INDEX events_received_at ON events (received_at)")


class ClosingConnection(sqlite3.Connection):
    """A connection that `with` also closes (sqlite3's own only commits and leaves it open)."""

    def __exit__(self, *exc: object) -> Literal[False]:
        try:
            super().__exit__(*exc)  # type: ignore[arg-type]
        finally:
            self.close()
        return False


def connect(path: str | os.PathLike[str], *, readonly: bool = False) -> ClosingConnection:
    """A connection with the pragmas every server component uses; `with connect(…) as conn:` closes it."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{os.fspath(path)}?mode=ro", uri=True, check_same_thread=False, factory=ClosingConnection
        )
    else:
        create_private(path)
        conn = sqlite3.connect(
            os.fspath(path), check_same_thread=False, isolation_level=None, factory=ClosingConnection
        )
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a receipt promises the row survives a power cut, not only a crash.
        conn.execute("PRAGMA synchronous=FULL")
    return conn


def create_private(path: str | os.PathLike[str]) -> None:
    """Make the database file 0600 before SQLite opens it: it holds citizen-derived events.

    SQLite gives the -wal and -shm files the database file's own mode, so they follow. A file
    that already exists loses only its world bits (a group an operator granted keeps reading).

    An existing database file is never opened here: POSIX record locks belong to the process, and
    closing *any* descriptor of the file drops every lock SQLite holds on it through its other
    connections, so two of our writers could then write the WAL at once and committed rows be
    lost (seen: a server that had receipted events no longer had them).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not target.exists():
        try:
            os.close(os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    for f in (target, *(target.with_name(target.name + s) for s in ("-wal", "-shm", "-journal"))):
        try:
            mode = f.stat().st_mode & 0o777
            if mode & 0o007:
                f.chmod(mode & 0o770)
        except FileNotFoundError:
            pass


def migrate(path: str | os.PathLike[str], *feature_sets: Migrations) -> None:
    """Create or upgrade the schema: the core set, then each feature's own set, in order."""
    with connect(path) as conn:
        db = sqlite_utils.Database(conn)
        for mset in (migrations, *feature_sets):
            mset.apply(db)


@migrations(name="0004_events_id_per_stream")
def _m0004_events_id_per_stream(db: sqlite_utils.Database) -> None:
    # Issue 8: event ids are unique per stream; the ingest looks ids up before inserting and
    # quarantines a reused one. Not UNIQUE: databases from before this check may hold duplicates.
    # Must exist on whatever table `events` is after any layout change (re-create it there).
    db.execute("CREATE INDEX IF NOT EXISTS events_stream_id ON events (terminal, epoch, id)")


@migrations(name="0005_events_append_only_indexes")
def _m0005_events_append_only_indexes(db: sqlite_utils.Database) -> None:
    # Every index on `events` costs each stored row its own B-tree insert, and an index whose new
    # entries land in the middle of the tree (one spot per stream or per office in every batch)
    # splits and rewrites pages there at every commit: (terminal, epoch, id) and (office_id, ts)
    # together cost more than the table and its exactly-once key (measured: bench/store.py).
    # New entries of these two land at the end of their index instead, as rows arrive:
    # - event ids are time-ordered (fleet_wire.envelope.new_event_ids) and globally unique, so one
    #   index on `id` alone finds an id, and the stream is checked on the row (only a misbehaving
    #   terminal makes rows of other streams share an id, and those are few);
    # - the usage rollups read one office-day by event time: (ts, office_id) serves that range and
    #   rules out other offices' entries inside the index.
    # The usage catch-up after a restart no longer needs `received_at`: rowids grow with insertion
    # (UsageStore.received_since searches them). The exactly-once key events_key is unchanged.
    db.execute("DROP INDEX IF EXISTS events_stream_id")
    db.execute("DROP INDEX IF EXISTS events_office_ts")
    db.execute("DROP INDEX IF EXISTS events_received_at")
    db.execute("CREATE INDEX IF NOT EXISTS events_id ON events (id)")
    db.execute("CREATE INDEX IF NOT EXISTS events_ts_office ON events (ts, office_id)")


@migrations(name="0006_events_stream_numbers")
def _m0006_events_stream_numbers(db: sqlite_utils.Database) -> None:
    # The exactly-once key was (terminal, epoch, seq): ~60 bytes of text per entry, and every
    # batch inserts into the middle of it at one spot per stream, so it cost more than the table
    # itself (bench/store.py). Each stream now has a number (`event_streams`, assigned by
    # IngestStore on the stream's first event) and the key is (stream, seq): a few bytes, compared
    # as integers, a fraction of the pages. `terminal` and `epoch` stay on every row for readers.
    # The table is rebuilt (the column is NOT NULL without a default, so a writer that forgets it
    # fails loudly) with its rowids kept: the usage catch-up and the rollout engine read by rowid.
    # No FOREIGN KEY on `stream`: it would cost every stored row a lookup in event_streams.
    db.execute("""CREATE TABLE event_streams (
        num INTEGER PRIMARY KEY, terminal TEXT NOT NULL, epoch TEXT NOT NULL, UNIQUE (terminal, epoch))""")
    db.execute(
        "INSERT INTO event_streams (terminal, epoch)"
        " SELECT terminal, epoch FROM events GROUP BY terminal, epoch ORDER BY min(rowid)"
    )
    cols = "terminal, epoch, seq, id, type, ts, received_at, office_id, body"
    db.execute("""CREATE TABLE events_numbered (
        terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
        type TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, office_id TEXT NOT NULL,
        body TEXT NOT NULL, stream INTEGER NOT NULL)""")
    db.execute(
        f"INSERT INTO events_numbered (rowid, {cols}, stream)"
        f" SELECT e.rowid, {', '.join('e.' + c for c in cols.split(', '))}, s.num"
        " FROM events e JOIN event_streams s ON s.terminal=e.terminal AND s.epoch=e.epoch ORDER BY e.rowid"
    )
    db.execute("DROP TABLE events")
    db.execute("ALTER TABLE events_numbered RENAME TO events")
    db.execute("CREATE UNIQUE INDEX events_key ON events (stream, seq)")
    db.execute("CREATE INDEX events_id ON events (id)")
    db.execute("CREATE INDEX events_ts_office ON events (ts, office_id)")
