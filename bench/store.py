"""Event store benchmark: the server's real event store (IngestStore on a file migrated by the
server, the server's connection pragmas: WAL, synchronous=FULL) filled in ingest-sized batches,
against a plain rowid table with a unique index filled with the same rows in the same run.

The two databases are filled in lockstep (one batch into each, in turn, the first writer changing
every batch), so machine noise lands on both alike. `--legacy` adds a third database with the
original WITHOUT ROWID schema.

    python bench/store.py --quick
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fleet_dev.bench import emit, machine
from fleet_server.db import connect, migrate
from fleet_server.ingest.store import IngestStore, StreamRow
from fleet_wire.receipt import SeqSet

OFFICES = ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun", "loan-centre", "xicheng", "fengtai"]
ITEMS = [
    ("TQ01", "购房提取"),
    ("TQ02", "租房提取"),
    ("DK01", "公积金贷款申请"),
    ("HK02", "调整月还款额"),
    ("CX01", "缴存明细查询"),
]
WINDOW_ROWS = 100_000  # the growth figure compares the first and the last this many rows

EventRow = tuple[str, str, int, str, str, str, str, str, str]

BASELINE_SCHEMA = """CREATE TABLE events (
    terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, office_id TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE UNIQUE INDEX events_key ON events (terminal, epoch, seq);"""

# the schema the server had before its rowid migration (fleet_server/db.py, 0001)
LEGACY_SCHEMA = """CREATE TABLE events (
    terminal TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, ts TEXT NOT NULL, received_at TEXT NOT NULL, office_id TEXT NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (terminal, epoch, seq)) WITHOUT ROWID;
CREATE INDEX events_office_ts ON events (office_id, ts);"""


class Fleet:
    """Terminals producing events; each batch is what one ingest commit holds."""

    def __init__(self, terminals: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tids = [f"{OFFICES[i % len(OFFICES)]}-{i:05d}" for i in range(terminals)]
        self.epochs = {t: uuid.UUID(int=self.rng.getrandbits(128)).hex for t in self.tids}
        self.seqs = dict.fromkeys(self.tids, 0)
        self.clock = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

    def batch(self, size: int, per_terminal: int) -> tuple[list[EventRow], list[StreamRow]]:
        rows: list[EventRow] = []
        streams: list[StreamRow] = []
        received = _ts(self.clock)
        for t in self.rng.sample(self.tids, size // per_terminal):
            office = t.rsplit("-", 1)[0]
            for _ in range(per_terminal):
                self.seqs[t] += 1
                seq = self.seqs[t]
                self.clock += timedelta(milliseconds=self.rng.randint(5, 60))
                code, name = self.rng.choice(ITEMS)
                kind = self.rng.choice(("service.started", "service.completed", "service.completed", "device.sample"))
                if kind == "device.sample":
                    body = {
                        "cpu_pct": round(self.rng.uniform(3, 60), 1),
                        "mem_pct": 41.0,
                        "disk_pct": 37.2,
                        "temp_c": 48.5,
                        "uptime_s": 86400 + seq,
                        "outbox_depth": 0,
                        "camera": "ok",
                        "printer": "ok",
                        "paper_left_pct": 70,
                    }
                else:
                    body = {
                        "session": f"{t}-{uuid.UUID(int=self.rng.getrandbits(128)).hex[:16]}",
                        "service_code": code,
                        "item_name": name,
                        "duration_s": round(self.rng.uniform(30, 400), 1),
                        "face_login": self.rng.random() < 0.6,
                        "channel": "kiosk",
                        "steps": self.rng.randint(3, 9),
                        "result": "ok",
                        "app_version": "3.4.1",
                    }
                rows.append(
                    (
                        t,
                        self.epochs[t],
                        seq,
                        # time-ordered, as fleet_wire.envelope.new_event_ids makes them on the terminal
                        f"{int(self.clock.timestamp() * 1000):012x}{seq & 0xFFFF:04x}{self.rng.getrandbits(64):016x}",
                        kind,
                        _ts(self.clock - timedelta(seconds=2)),
                        received,
                        office,
                        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                    )
                )
            streams.append(
                StreamRow(
                    t,
                    self.epochs[t],
                    SeqSet(self.seqs[t]),
                    stored=self.seqs[t],
                    first_seen=received,
                    last_seen=received,
                )
            )
        return rows, streams


def _ts(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def plain_writer(path: Path, schema: str) -> tuple[sqlite3.Connection, Callable[[Sequence[EventRow]], None]]:
    conn = connect(path)
    conn.executescript(schema)

    def write(rows: Sequence[EventRow]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR IGNORE INTO events (terminal, epoch, seq, id, type, ts, received_at, office_id, body)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.execute("COMMIT")

    return conn, write


class Meter:
    """Wall and CPU seconds per window of rows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.windows: list[list[float]] = []  # [rows, wall_s, cpu_s]

    def time(self, rows: int, fn: Callable[..., None], *args: object) -> None:
        w0, c0 = time.perf_counter(), time.thread_time()
        fn(*args)
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        if not self.windows or self.windows[-1][0] >= WINDOW_ROWS:
            self.windows.append([0, 0.0, 0.0])
        win = self.windows[-1]
        win[0] += rows
        win[1] += wall
        win[2] += cpu

    def rate(self, i: int) -> float:
        return self.windows[i][0] / self.windows[i][1]

    def cpu_us(self, i: int) -> float:
        return self.windows[i][2] / self.windows[i][0] * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="500,000 rows (well under two minutes)")
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--terminals", type=int, default=2_000)
    p.add_argument("--batch", type=int, default=200, help="events per commit")
    p.add_argument("--per-terminal", type=int, default=25, help="events per terminal within a batch")
    p.add_argument("--legacy", action="store_true", help="also fill the old WITHOUT ROWID schema")
    args = p.parse_args()
    total = args.rows or (500_000 if args.quick else 2_000_000)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        ours_path = Path(tmp) / "fleet.db"
        migrate(ours_path)
        ours_conn = connect(ours_path)
        store = IngestStore(ours_conn)
        base_conn, base_write = plain_writer(Path(tmp) / "baseline.db", BASELINE_SCHEMA)
        meters = [Meter("ours"), Meter("baseline")]
        legacy_conn = None
        if args.legacy:
            legacy_conn, legacy_write = plain_writer(Path(tmp) / "legacy.db", LEGACY_SCHEMA)
            meters.append(Meter("legacy"))
        fleet = Fleet(args.terminals, seed=7)
        row_len = 0
        print(
            f"filling the event store to {total:,} rows: {args.batch}-event commits from {args.terminals:,} "
            f"terminals ({args.per_terminal} events each per commit), lockstep with "
            + ("a plain rowid table and the old WITHOUT ROWID schema" if args.legacy else "a plain rowid table"),
            flush=True,
        )
        done = 0
        while done < total:
            rows, streams = fleet.batch(args.batch, args.per_terminal)
            if not row_len:
                row_len = round(sum(len(str(v).encode()) for r in rows for v in r) / len(rows))
            writes: list[tuple[Meter, Callable[..., None], tuple[object, ...]]] = [
                (meters[0], store.write, (rows, (), (), streams)),
                (meters[1], base_write, (rows,)),
            ]
            if legacy_conn is not None:
                writes.append((meters[2], legacy_write, (rows,)))
            # Who writes first takes turns: the commit after another file's fsync was measured
            # markedly cheaper here (same file system), so a fixed order favours the second.
            turn = (done // args.batch) % len(writes)
            for meter, write, write_args in writes[turn:] + writes[:turn]:
                meter.time(len(rows), write, *write_args)
            done += len(rows)
            if done % WINDOW_ROWS == 0:
                i = len(meters[0].windows) - 1
                print(
                    f"  {done:>9,} rows: "
                    + "  ".join(f"{m.name} {m.rate(i):>7,.0f} rows/s ({m.cpu_us(i):5.1f} µs CPU/row)" for m in meters),
                    flush=True,
                )
        stored = ours_conn.execute("SELECT count(*) FROM events").fetchone()[0]
        # every index the server keeps on its events table costs its own insert per row
        indexes = [r[1] for r in ours_conn.execute("PRAGMA index_list(events)")]
        # the exactly-once key still holds: a re-sent batch adds nothing
        store.write(rows, (), (), streams)
        after_resend = ours_conn.execute("SELECT count(*) FROM events").fetchone()[0]
        for c in (ours_conn, base_conn, legacy_conn):
            if c is not None:
                c.close()
    ours, base = meters[0], meters[1]
    base_rate = sum(w[0] for w in base.windows) / sum(w[1] for w in base.windows)
    ours_rate = sum(w[0] for w in ours.windows) / sum(w[1] for w in ours.windows)
    result = {
        "rows": stored,
        "rate_first_100k": round(ours.rate(0), 1),
        "rate_last_100k": round(ours.rate(-1), 1),
        "growth_ratio": round(ours.rate(-1) / ours.rate(0), 3),
        "rate": round(ours_rate, 1),
        "baseline_rate": round(base_rate, 1),
        "ratio": round(ours_rate / base_rate, 3),
        "baseline_growth_ratio": round(base.rate(-1) / base.rate(0), 3),
        "cpu_us_per_row_first_100k": round(ours.cpu_us(0), 2),
        "cpu_us_per_row_last_100k": round(ours.cpu_us(-1), 2),
        "baseline_cpu_us_per_row_last_100k": round(base.cpu_us(-1), 2),
        "resend_added_rows": after_resend - stored,
        "row_bytes": row_len,
        "events_indexes": sorted(indexes),
        "batch": args.batch,
        "terminals": args.terminals,
    }
    if args.legacy:
        legacy = meters[2]
        result["legacy_rate_first_100k"] = round(legacy.rate(0), 1)
        result["legacy_rate_last_100k"] = round(legacy.rate(-1), 1)
        result["legacy_growth_ratio"] = round(legacy.rate(-1) / legacy.rate(0), 3)
        result["legacy_cpu_us_per_row_last_100k"] = round(legacy.cpu_us(-1), 2)
    print(
        f"event store: {ours.rate(0):,.0f} rows/s over the first 100k, {ours.rate(-1):,.0f} over the last "
        f"(growth {result['growth_ratio']}); {ours_rate:,.0f} rows/s overall vs {base_rate:,.0f} for a plain "
        f"rowid table with a unique index (ratio {result['ratio']}) — {machine()}"
    )
    emit(result)


if __name__ == "__main__":
    main()
