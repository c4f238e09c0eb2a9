"""Enqueue benchmark: durable enqueue through the agent's outbox vs raw SQLite inserts, same run,
same file system, same pragmas (WAL, synchronous=FULL: an event survives a power cut once "ok").

    python bench/enqueue.py --quick
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


def paired(tmp: Path, name: str, n: int, batch: int, sync: str, rounds: int) -> tuple[float, float, float]:
    """Raw and outbox runs in alternating order, round by round: the disk's fsync time drifts by
    tens of percent over seconds here, so each ratio compares runs made next to each other.
    Returns (median outbox rate, median raw rate, median of the per-round ratios)."""
    boxes, raws, ratios = [], [], []
    for r in range(rounds):
        order = (raw_rate, outbox_rate) if r % 2 == 0 else (outbox_rate, raw_rate)
        got = {fn: fn(tmp / f"{name}-{fn.__name__}-{r}.db", n, batch, sync) for fn in order}
        raws.append(got[raw_rate])
        boxes.append(got[outbox_rate])
        ratios.append(got[outbox_rate] / got[raw_rate])
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
    print(f"one event per commit:  outbox {box1:,.0f}/s vs raw SQLite {raw1:,.0f}/s  (synchronous={args.sync})")
    print(f"100 events per commit: outbox {boxb:,.0f}/s vs raw SQLite {rawb:,.0f}/s  ({machine()})")
    print(f"median of {rounds} paired rounds: ratio {ratio1:.3f}, batched ratio {ratiob:.3f}")
    emit(
        {
            "rate": round(box1, 1),
            "baseline_rate": round(raw1, 1),
            "ratio": round(ratio1, 3),
            "batched_rate": round(boxb, 1),
            "batched_baseline_rate": round(rawb, 1),
            "batched_ratio": round(ratiob, 3),
            "rounds": rounds,
            "synchronous": args.sync,
        }
    )


if __name__ == "__main__":
    main()
