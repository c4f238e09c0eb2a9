"""Enqueue benchmark: durable enqueue through the agent's outbox vs raw SQLite inserts, same run,
same file system, same pragmas (WAL, synchronous=FULL: an event survives a power cut once "ok"),
interleaved commit by commit so that both sides are timed over the same moments.

    python bench/enqueue.py --quick

`ratio` and `batched_ratio` compare with the baseline this bench always had: pre-built rows through
BEGIN, `executemany` (one statement step per row) and COMMIT. The outbox itself now writes a commit
of up to 128 events as ONE multi-row INSERT that SQLite runs as its own transaction (autocommit:
just as durable, without the BEGIN and COMMIT round trips). So `same_sql_ratio` and
`batched_same_sql_ratio` compare it, in two more sets of rounds, with pre-built rows written exactly
that way: the outbox's own cost (validation, JSON, ids, envelopes) with the SQL equal on both sides,
the stricter figure. `ratio` and `batched_ratio` are measured exactly as before.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from edge_agent.outbox import Outbox
from edge_agent.outbox.store import PRAGMAS
from fleet_dev.bench import emit, machine


def service_events(n: int) -> list[tuple[str, dict[str, object], None]]:
    """n realistic business events, each with its own session (like fleet_dev.devstack's)."""
    return [
        (
            "service.completed",
            {"session": f"s-{i}", "service_code": "TQ02", "duration_s": 120.0 + i % 60, "face_login": True},
            None,
        )
        for i in range(n)
    ]


class Raw:
    """The baseline: plain inserts of pre-built rows into a table shaped like the outbox's."""

    def __init__(self, path: Path, sync: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        for pragma in PRAGMAS:  # exactly the outbox's
            self.conn.execute(f"PRAGMA {pragma}")
        self.conn.execute(f"PRAGMA synchronous={sync}")
        self.conn.execute(
            "CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, class INTEGER,"
            " created REAL, expires REAL, env TEXT, size INTEGER)"
        )
        body = json.dumps(next(iter(service_events(1)))[1])
        self.env = (
            '{"v":1,"terminal":"t-1","epoch":"'
            + "a" * 32
            + '","seq":1,"id":"'
            + "b" * 32
            + '","ts":"2026-11-27T10:00:00.000Z","type":"service.completed","body":'
            + body
            + "}"
        )

    def commit(self, events: list[tuple[str, dict[str, object], None]]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT INTO t (type, class, created, expires, env, size) VALUES (?,?,?,?,?,?)",
            [("service.completed", 2, time.time(), None, self.env, len(self.env))] * len(events),
        )
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class RawSameSql(Raw):
    """The baseline written the outbox's way: up to 128 pre-built rows as one multi-row INSERT that is
    its own transaction (more rows: statements of 128, 64 … 1 rows between BEGIN and COMMIT)."""

    def commit(self, events: list[tuple[str, dict[str, object], None]]) -> None:
        n = len(events)
        row = ("service.completed", 2, time.time(), None, self.env, len(self.env))
        if n <= 128:
            self.conn.execute(_values_sql(n), row * n)
            return
        self.conn.execute("BEGIN")
        at, size = 0, 128
        while at < n:
            while size > n - at:
                size //= 2
            self.conn.execute(_values_sql(size), row * size)
            at += size
        self.conn.execute("COMMIT")


def _values_sql(rows: int) -> str:
    return "INSERT INTO t (type, class, created, expires, env, size) VALUES " + ",".join(["(?,?,?,?,?,?)"] * rows)


class Ours:
    """The outbox's durable enqueue: one event through enqueue(), several through enqueue_many()."""

    def __init__(self, path: Path, sync: str) -> None:
        self.box = Outbox(path, "t-1", synchronous=sync)

    def commit(self, events: list[tuple[str, dict[str, object], None]]) -> None:
        if len(events) == 1:
            self.box.enqueue(events[0][0], events[0][1])
        else:
            self.box.enqueue_many(events)

    def close(self) -> None:
        self.box.close()


def paired(
    tmp: Path, name: str, n: int, batch: int, sync: str, rounds: int, raw: type[Raw] = Raw
) -> tuple[float, float, float]:
    """Raw and outbox commits interleaved, one commit of each in turn (who goes first alternates):
    the disk's fsync time drifts by tens of percent within seconds here and other work on the
    machine comes in bursts, so each side is timed over the same moments as the other. A round is
    a fresh pair of files. Returns (median outbox rate, median raw rate, median of the per-round
    ratios)."""
    boxes, raws, ratios = [], [], []
    events = service_events(n)
    for r in range(rounds):
        sides: list[Raw | Ours] = [raw(tmp / f"{name}-raw-{r}.db", sync), Ours(tmp / f"{name}-outbox-{r}.db", sync)]
        spent = [0.0, 0.0]
        for k, i in enumerate(range(0, n, batch)):
            chunk = events[i : i + batch]
            for side in (0, 1) if (k + r) % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                sides[side].commit(chunk)
                spent[side] += time.perf_counter() - t0
        for s in sides:
            s.close()
        raws.append(n / spent[0])
        boxes.append(n / spent[1])
        ratios.append(spent[0] / spent[1])
    return statistics.median(boxes), statistics.median(raws), statistics.median(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sync", default="FULL", choices=["FULL", "NORMAL"])
    args = p.parse_args()
    n1, nb, rounds = (1_000, 20_000, 7) if args.quick else (5_000, 100_000, 9)
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as d:
        tmp = Path(d)
        box1, raw1, ratio1 = paired(tmp, "one", n1, 1, args.sync, rounds)
        boxb, rawb, ratiob = paired(tmp, "batch", nb, 100, args.sync, rounds)
        box1s, raw1s, ratio1s = paired(tmp, "one-same-sql", n1, 1, args.sync, rounds, RawSameSql)
        boxbs, rawbs, ratiobs = paired(tmp, "batch-same-sql", nb, 100, args.sync, rounds, RawSameSql)
    print(f"one event per commit:  outbox {box1:,.0f}/s vs raw SQLite {raw1:,.0f}/s  (synchronous={args.sync})")
    print(f"100 events per commit: outbox {boxb:,.0f}/s vs raw SQLite {rawb:,.0f}/s  ({machine()})")
    print(f"raw SQLite written the outbox's way: one event {raw1s:,.0f}/s (outbox {box1s:,.0f}/s),")
    print(f"  100 events per commit {rawbs:,.0f}/s (outbox {boxbs:,.0f}/s)")
    print(
        f"median of {rounds} interleaved rounds: ratio {ratio1:.3f}, batched ratio {ratiob:.3f};"
        f" with the same SQL: {ratio1s:.3f}, batched {ratiobs:.3f}"
    )
    emit(
        {
            "rate": round(box1, 1),
            "baseline_rate": round(raw1, 1),
            "ratio": round(ratio1, 3),
            "batched_rate": round(boxb, 1),
            "batched_baseline_rate": round(rawb, 1),
            "batched_ratio": round(ratiob, 3),
            "same_sql_baseline_rate": round(raw1s, 1),
            "same_sql_ratio": round(ratio1s, 3),
            "batched_same_sql_baseline_rate": round(rawbs, 1),
            "batched_same_sql_ratio": round(ratiobs, 3),
            "rounds": rounds,
            "synchronous": args.sync,
        }
    )


if __name__ == "__main__":
    main()
