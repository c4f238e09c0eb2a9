"""Drain benchmark: events queued offline at several terminals, drained through Mosquitto into the
fleet server until receipted, compared with raw paho QoS1 publish→subscribe on the same broker.

    python bench/drain.py --quick
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from edge_agent.outbox import Outbox
from fleet_dev.bench import emit, machine, raw_qos1_rate
from fleet_dev.devstack import DevStack, service_events
from fleet_dev.proc import wait_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller run, well under a minute")
    p.add_argument("--terminals", type=int, default=5)
    p.add_argument("--events", type=int, default=0)
    args = p.parse_args()
    total = args.events or (50_000 if args.quick else 200_000)
    per = total // args.terminals
    total = per * args.terminals
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        # a deep per-client queue so the raw baseline subscriber is not cut short by drops
        st = DevStack(Path(tmp), max_queued_messages=200_000)
        tids = [f"bench-{i:02d}" for i in range(args.terminals)]
        for i, tid in enumerate(tids):
            st.enrol(tid, ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun"][i % 5])
        print(f"queueing {total} events offline at {args.terminals} terminals …", flush=True)
        for tid in tids:
            d = st.root / "agents" / tid
            d.mkdir(parents=True)
            box = Outbox(d / "outbox.db", tid, synchronous="NORMAL")
            for i in range(0, per, 1000):
                box.enqueue_many(list(service_events(min(1000, per - i), f"{tid}-{i}")))
            box.close()
        st.start_broker()
        with sqlite3.connect(st.root / "agents" / tids[0] / "outbox.db") as conn:
            msg_size = len(conn.execute("SELECT env FROM outbox LIMIT 1").fetchone()[0]) + 20
        n_raw = 20_000 if args.quick else 100_000
        print(f"baseline: raw paho QoS1, {n_raw} messages of {msg_size} bytes (one event each) …", flush=True)
        baseline = raw_qos1_rate(st.port, st.settings.broker_username, st.server_password, n_raw, msg_size)
        print(f"  {baseline:,.0f} msg/s", flush=True)
        st.start_server()
        assert st.server is not None and st.server.link.connected.wait(10)
        agents = [st.agent(tid) for tid in tids]
        t0 = time.perf_counter()
        for a in agents:
            a.start()
        last = 0

        def progress() -> bool:
            nonlocal last
            n = st.stored()
            if n - last >= total // 10:
                print(f"  stored {n:>7}/{total}", flush=True)
                last = n
            return n >= total and all(a.outbox.depth == 0 for a in agents)

        wait_for(progress, 300, interval_s=0.02, what="drain")
        elapsed = time.perf_counter() - t0
        stored = st.stored()
        with sqlite3.connect(st.settings.db_path) as conn:
            distinct = conn.execute("SELECT count(DISTINCT json_extract(body,'$.session')) FROM events").fetchone()[0]
        resent = sum(a.window.counters.resent_events for a in agents)
        for a in agents:
            a.stop()
        st.close()
    rate = total / elapsed
    print(
        f"drained {total} events in {elapsed:.2f}s end-to-end (stored + receipted + deleted): "
        f"{rate:,.0f} events/s vs raw QoS1 {baseline:,.0f} msg/s on the same broker ({machine()})"
    )
    emit(
        {
            "events": total,
            "stored": stored,
            "lost": total - distinct,
            "duplicates": stored - distinct,
            "resent": resent,
            "rate": round(rate, 1),
            "baseline_rate": round(baseline, 1),
            "ratio": round(rate / baseline, 3),
        }
    )


if __name__ == "__main__":
    main()
