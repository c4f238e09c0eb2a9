"""The server's event store: the upgrades from the original WITHOUT ROWID layout keep every row,
and each event stays stored exactly once on (terminal, epoch, seq) after them (enforced on the
stream's number and seq since 0006)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import sqlite_utils

from fleet_server.console.queries import update_reports
from fleet_server.db import connect, migrate, migrations
from fleet_server.ingest.store import IngestStore, StreamRow
from fleet_server.usage.store import UsageStore
from fleet_wire.receipt import SeqSet

ROWID_MIGRATION = "0003_events_rowid"
EPOCH_A = "a" * 32
EPOCH_B = "b" * 32


def _event(
    terminal: str, epoch: str, seq: int, *, body: str = ""
) -> tuple[str, str, int, str, str, str, str, str, str]:
    kind = ("service.started", "service.completed", "device.sample")[seq % 3]
    minute = seq % 60
    return (
        terminal,
        epoch,
        seq,
        f"{terminal}{epoch[:4]}{seq:020d}",
        kind,
        f"2026-11-02T09:{minute:02d}:00.000Z",
        f"2026-11-02T10:{minute:02d}:30.000Z",
        "dongcheng" if terminal.endswith("1") else "haidian",
        body or f'{{"session":"{terminal}-{seq}","service_code":"TQ02","duration_s":{60 + seq % 90}.5}}',
    )


def _stream(terminal: str, epoch: str, upto: int) -> StreamRow:
    return StreamRow(terminal, epoch, SeqSet(upto), stored=upto, first_seen="x", last_seen="x")


def _old_database(path: Path) -> None:
    """A database as the server made it before the rowid rebuild: migrations up to 0003 only."""
    with connect(path) as conn:
        migrations.apply(sqlite_utils.Database(conn), stop_before=ROWID_MIGRATION)
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name='events'").fetchone()
        assert "WITHOUT ROWID" in sql


def _write_old(
    conn: sqlite3.Connection,
    events: list[tuple[str, str, int, str, str, str, str, str, str]],
    tombstones: Sequence[tuple[str, str, int, str, str, int, str]] = (),
) -> None:
    """Store rows as the ingest of the old layout did (its events had no stream number)."""
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT OR IGNORE INTO events (terminal, epoch, seq, id, type, ts, received_at, office_id, body)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        events,
    )
    conn.executemany("INSERT INTO dropped VALUES (?,?,?,?,?,?,?)", tombstones)
    conn.execute("COMMIT")


def _rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return sorted(conn.execute("SELECT terminal, epoch, seq, id, type, ts, received_at, office_id, body FROM events"))


def _schema(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(
        conn.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name='events' AND sql IS NOT NULL ORDER BY name")
    )


def test_upgrade_from_without_rowid_keeps_every_row_and_tombstone(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    _old_database(path)
    events = [_event(t, e, s) for t in ("t-001", "t-002", "t-003") for e in (EPOCH_A, EPOCH_B) for s in range(1, 401)]
    tombstones = [("t-001", EPOCH_A, 401, "ttl_expired", "device.sample", 2, "2026-11-02T09:00:00.000Z")]
    with connect(path) as conn:
        for i in range(0, len(events), 200):  # as the ingest wrote: batches, one transaction each
            _write_old(conn, events[i : i + 200], tombstones if i == 0 else [])
        IngestStore(conn).write((), (), (), [_stream("t-001", EPOCH_A, 400)])
        before = _rows(conn)
        dropped_before = conn.execute("SELECT * FROM dropped").fetchall()
    assert len(before) == 2400

    migrate(path)

    with connect(path) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name='events'").fetchone()
        assert "WITHOUT ROWID" not in sql
        assert _rows(conn) == before
        assert conn.execute("SELECT * FROM dropped").fetchall() == dropped_before
        assert conn.execute("SELECT count(*) FROM streams").fetchone()[0] == 1
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        unique = [r[1] for r in conn.execute("PRAGMA index_list(events)") if r[2]]
        assert [[c[2] for c in conn.execute(f"PRAGMA index_info({name})")] for name in unique] == [["stream", "seq"]]
        # 0006: one number per stream, and every row carries its own stream's
        numbers = conn.execute("SELECT terminal, epoch, num FROM event_streams").fetchall()
        assert len(numbers) == 6 and len({n for _, _, n in numbers}) == 6
        assert (
            conn.execute(
                "SELECT count(*) FROM events e JOIN event_streams s ON s.num=e.stream"
                " WHERE s.terminal=e.terminal AND s.epoch=e.epoch"
            ).fetchone()[0]
            == 2400
        )
        # the store numbers a new stream, and knows the upgraded ones
        store = IngestStore(conn)
        store.write([_event("t-004", EPOCH_A, 1), _event("t-001", EPOCH_A, 401)], (), (), ())
        assert len(_rows(conn)) == 2402
        store.write([_event("t-001", EPOCH_A, 400), _event("t-004", EPOCH_A, 1)], (), (), ())  # both stored already
        assert len(_rows(conn)) == 2402
        assert conn.execute("SELECT count(*) FROM event_streams").fetchone()[0] == 7


def test_stream_numbering_keeps_rowids(tmp_path: Path) -> None:
    """0006 rebuilds the rowid table: the usage catch-up and the rollout engine read by rowid."""
    path = tmp_path / "fleet.db"
    with connect(path) as conn:
        migrations.apply(sqlite_utils.Database(conn), stop_before="0006_events_stream_numbers")
        _write_old(conn, [_event(t, EPOCH_A, s) for s in range(1, 31) for t in ("t-001", "t-002")])
        conn.execute("DELETE FROM events WHERE seq BETWEEN 5 AND 9")  # rowids with gaps
        before = conn.execute("SELECT rowid, terminal, epoch, seq, id FROM events ORDER BY rowid").fetchall()
    migrate(path)
    with connect(path) as conn:
        assert conn.execute("SELECT rowid, terminal, epoch, seq, id FROM events ORDER BY rowid").fetchall() == before
        # new rows go after every kept one
        IngestStore(conn).write([_event("t-003", EPOCH_A, 1)], (), (), ())
        last = conn.execute("SELECT terminal FROM events ORDER BY rowid DESC LIMIT 1").fetchone()
        assert last == ("t-003",)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_upgraded_store_ignores_duplicates_and_keeps_the_first_copy(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    _old_database(path)
    with connect(path) as conn:
        _write_old(conn, [_event("t-001", EPOCH_A, s) for s in range(1, 101)])
    migrate(path)
    with connect(path) as conn:
        store = IngestStore(conn)
        first = dict(((r[0], r[1], r[2]), r) for r in _rows(conn))
        # a re-sent batch overlapping what is stored (with a changed body), plus new seqs
        resent = [_event("t-001", EPOCH_A, s, body='{"changed":true}') for s in range(51, 151)]
        store.write(resent, (), (), ())
        store.write(resent[:10], (), (), ())  # the very same batch again
        rows = _rows(conn)
        assert len(rows) == 150
        assert [r[2] for r in rows if r[0] == "t-001"] == sorted(range(1, 151))
        for r in rows:
            key = (r[0], r[1], r[2])
            assert r == (first[key] if key in first else _event("t-001", EPOCH_A, r[2], body='{"changed":true}'))
        # the same seq in another epoch (a reinstalled terminal) is a new event, not a duplicate
        store.write([_event("t-001", EPOCH_B, 1)], (), (), ())
        assert conn.execute("SELECT count(*) FROM events WHERE seq=1").fetchone()[0] == 2
        # the key is enforced by the database itself, not only by INSERT OR IGNORE
        (num,) = conn.execute("SELECT num FROM event_streams WHERE terminal='t-001' AND epoch=?", (EPOCH_A,)).fetchone()
        try:
            conn.execute(
                "INSERT INTO events (terminal, epoch, seq, id, type, ts, received_at, office_id, body, stream)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (*_event("t-001", EPOCH_A, 7), num),
            )
        except sqlite3.IntegrityError as err:
            assert "UNIQUE" in str(err)
        else:
            raise AssertionError("a duplicate (terminal, epoch, seq) was accepted")
        # and a row without its stream number is refused outright, not stored unkeyed
        try:
            conn.execute(
                "INSERT INTO events (terminal, epoch, seq, id, type, ts, received_at, office_id, body)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                _event("t-009", EPOCH_A, 1),
            )
        except sqlite3.IntegrityError as err:
            assert "NOT NULL" in str(err)
        else:
            raise AssertionError("an event without its stream number was accepted")


def test_fresh_and_upgraded_databases_have_the_same_events_layout(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    migrate(fresh)
    _old_database(old)
    migrate(old)
    with connect(fresh) as a, connect(old) as b:
        assert _schema(a) == _schema(b)
        # 0005: the indexes besides the key take their new entries at their end (see fleet_server/db.py)
        assert {"events_key", "events_id", "events_ts_office"} == set(_schema(a)) - {"events"}


def test_usage_reads_of_the_events_use_an_index(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    _old_database(path)
    migrate(path)
    with connect(path) as conn:
        IngestStore(conn).write([_event("t-001", EPOCH_A, s) for s in range(1, 50)], (), (), ())
        conn.execute("ANALYZE")
        issued: list[str] = []
        conn.set_trace_callback(issued.append)
        usage = UsageStore(conn)
        usage.service_events("dongcheng", "2026-11-02T00:00:00.000Z", "2026-11-03T00:00:00.000Z")
        usage.received_since("2026-11-02T10:30:00.000Z")
        IngestStore(conn).seqs_for_ids("t-001", EPOCH_A, ["x" * 32])
        update_reports(conn, "t-001")  # the console's terminal page
        conn.set_trace_callback(None)
        reads = [sql for sql in issued if "FROM events" in sql]
        # the catch-up finds its start by a binary search over rowids: a few point reads, no scan
        assert 4 <= len(reads) <= 17
        for sql in reads:
            plan = " ".join(str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "SCAN events" not in plan, (sql, plan)
            assert "USING INDEX" in plan or "USING INTEGER PRIMARY KEY" in plan or sql.startswith("SELECT (SELECT"), (
                sql,
                plan,
            )


def test_catch_up_reads_by_rowid_what_arrived_since_a_moment(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    migrate(path)
    with connect(path) as conn:
        store, usage = IngestStore(conn), UsageStore(conn)
        assert usage.received_since("") == []
        # five batches, stamped 10:00, 10:01, ... as the ingest stores them; each a different hour of ts
        for b in range(5):
            rows = [
                (
                    *_event("t-001", EPOCH_A, 10 * b + s)[:5],
                    f"2026-11-02T0{b}:00:00.000Z",
                    f"2026-11-02T10:0{b}:00.000Z",
                    "dongcheng",
                    '{"session":"s","service_code":"TQ02"}',
                )
                for s in range(1, 11)
            ]
            store.write(rows, (), (), ())
        conn.execute("DELETE FROM events WHERE seq BETWEEN 20 AND 35")  # rowids with gaps
        for since, hours in [
            ("", [0, 1, 3, 4]),
            ("2026-11-02T10:01:00.000Z", [1, 3, 4]),
            ("2026-11-02T10:02:30.000Z", [3, 4]),
            ("2026-11-02T10:04:00.000Z", [4]),
            ("2026-11-02T10:05:00.000Z", []),
        ]:
            got = usage.received_since(since)
            assert sorted(got) == [("dongcheng", f"2026-11-02T0{h}") for h in hours], since
