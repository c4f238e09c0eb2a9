"""Enqueue benchmark: durable enqueue through the agent's outbox vs raw SQLite inserts, same run,
same file system, same pragmas (WAL, synchronous=FULL: an event survives a power cut once "ok").

    python bench/enqueue.py --quick
"""

from __future__ import annotations

import argparse
import json
import sqlite3
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


def raw_rate(path: Path, n: int, batch: int, sync: str) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:  # exactly the outbox's
        conn.execute(f"PRAGMA {pragma}")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute(
        "CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, class INTEGER,"
        " created REAL, expires REAL, env TEXT, size INTEGER)"
    )
    body = json.dumps(next(iter(service_events(1)))[1])
    env = (
        '{"v":1,"terminal":"t-1","epoch":"'
        + "a" * 32
        + '","seq":1,"id":"'
        + "b" * 32
        + '","ts":"2026-11-27T10:00:00.000Z","type":"service.completed","body":'
        + body
        + "}"
    )
    t0 = time.perf_counter()
    for _ in range(0, n, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t (type, class, created, expires, env, size) VALUES (?,?,?,?,?,?)",
            [("service.completed", 2, time.time(), None, env, len(env))] * batch,
        )
        conn.execute("COMMIT")
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def outbox_rate(path: Path, n: int, batch: int, sync: str) -> float:
    box = Outbox(path, "t-1", synchronous=sync)
    events = list(service_events(n))
    t0 = time.perf_counter()
    if batch == 1:
        for e in events:
            box.enqueue(e[0], e[1])
    else:
        for i in range(0, n, batch):
            box.enqueue_many(events[i : i + batch])
    rate = n / (time.perf_counter() - t0)
    box.close()
    return rate


def best_of(fn, tmp: Path, name: str, n: int, batch: int, sync: str, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    return max(fn(tmp / f"{name}-{r}.db", n, batch, sync) for r in range(runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sync", default="FULL", choices=["FULL", "NORMAL"])
    args = p.parse_args()
    n1, nb = (2_000, 50_000) if args.quick else (10_000, 200_000)
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as d:
        tmp = Path(d)
        # interleave the measurements so disk-cache warm-up favours neither side
        raw1 = best_of(raw_rate, tmp, "raw1", n1, 1, args.sync)
        box1 = best_of(outbox_rate, tmp, "box1", n1, 1, args.sync)
        rawb = best_of(raw_rate, tmp, "rawb", nb, 100, args.sync)
        boxb = best_of(outbox_rate, tmp, "boxb", nb, 100, args.sync)
    print(f"one event per commit:  outbox {box1:,.0f}/s vs raw SQLite {raw1:,.0f}/s  (synchronous={args.sync})")
    print(f"100 events per commit: outbox {boxb:,.0f}/s vs raw SQLite {rawb:,.0f}/s  ({machine()})")
    emit(
        {
            "rate": round(box1, 1),
            "baseline_rate": round(raw1, 1),
            "ratio": round(box1 / raw1, 3),
            "batched_rate": round(boxb, 1),
            "batched_baseline_rate": round(rawb, 1),
            "batched_ratio": round(boxb / rawb, 3),
            "synchronous": args.sync,
        }
    )


if __name__ == "__main__":
    main()
