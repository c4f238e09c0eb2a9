"""Every event reaches the server exactly once: broker outages, kill -9, server outages, restarts.

All against a real Mosquitto on a loopback port, real SQLite files and the real agent code.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from typing import Any

import pytest

from edge_agent.outbox import Outbox
from fleet_dev.devstack import DevStack, service_events
from fleet_dev.proc import wait_for


def _start(st: DevStack, n_agents: int, **overrides: Any) -> list[Any]:
    agents = [st.agent(tid, **overrides) for tid in list(st.passwords)[:n_agents]]
    st.tracked_agents.extend(agents)  # type: ignore[attr-defined]
    for a in agents:
        a.start()
    wait_for(lambda: all(a.link.connected for a in agents), 15, what="agents connected")
    return agents


def _assert_exactly_once(st: DevStack, expected: dict[str, int]) -> None:
    with sqlite3.connect(st.settings.db_path) as conn:
        for tid, n in expected.items():
            seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE terminal=? ORDER BY seq", (tid,))]
            assert seqs == list(range(1, n + 1)), f"{tid}: stored seqs are not exactly 1..{n}"
            sessions = [
                r[0]
                for r in conn.execute("SELECT json_extract(body, '$.session') FROM events WHERE terminal=?", (tid,))
            ]
            assert len(sessions) == len(set(sessions)) == n, f"{tid}: a business event is stored twice"
        ids = [r[0] for r in conn.execute("SELECT id FROM events")]
    assert len(ids) == len(set(ids)) == sum(expected.values())


def _prefill(st: DevStack, tid: str, n: int) -> None:
    """Queue n events in a terminal's outbox file as if it had been offline all morning."""
    data_dir = st.root / "agents" / tid
    data_dir.mkdir(parents=True, exist_ok=True)
    box = Outbox(data_dir / "outbox.db", tid, synchronous="NORMAL")
    for i in range(0, n, 1000):
        box.enqueue_many(list(service_events(min(1000, n - i), f"{tid}-{i}")))
    box.close()


def test_events_produced_while_broker_is_down_all_arrive_after_it_returns(make_stack: Any) -> None:
    st = make_stack(3)
    agents = _start(st, 3)
    for a in agents:
        a.post_events(list(service_events(100, f"{a.settings.terminal_id}-before")))
    assert st.broker is not None
    st.broker.kill()
    wait_for(lambda: not any(a.link.connected for a in agents), 15, what="agents to notice the outage")
    for a in agents:  # citizens keep being served while the office uplink is down
        for i in range(200):
            a.post_event(*next(iter(service_events(1, f"{a.settings.terminal_id}-down-{i}")))[:2])
    assert all(a.outbox.depth >= 200 for a in agents)
    st.broker.start()
    wait_for(lambda: st.stored() == 900, 60, what="all 900 events stored")
    wait_for(lambda: all(a.outbox.depth == 0 for a in agents), 30, what="outboxes emptied by receipts")
    _assert_exactly_once(st, {a.settings.terminal_id: 300 for a in agents})


@pytest.mark.slow
def test_agent_killed_mid_drain_and_restarted_loses_and_duplicates_nothing(make_stack: Any) -> None:
    st = make_stack(1)
    tid = "t-000"
    total = 20_000
    _prefill(st, tid, total)
    # small batches so the drain takes long enough to be interrupted in the middle
    proc = st.agent_process(tid, batch_events=20, send_window=4)
    try:
        wait_for(lambda: st.stored() >= 2_000, 60, what="drain under way")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        at_kill = st.stored()
        assert at_kill < total, "the drain finished before the kill; the test proves nothing"
        proc = st.agent_process(tid, batch_events=200)
        wait_for(lambda: st.stored() == total, 120, what=f"{total} events after restart")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    _assert_exactly_once(st, {tid: total})
    box = Outbox(st.root / "agents" / tid / "outbox.db", tid)
    try:
        # rows receipted after the last kill may still be on disk; each of them is stored
        assert set(box.all_seqs()) <= set(range(1, total + 1))
    finally:
        box.close()


def test_server_down_longer_than_broker_queue_loses_nothing(make_stack: Any) -> None:
    # the broker keeps only 5 messages for the absent server and silently drops the rest
    st = make_stack(2, max_queued_messages=5)
    agents = _start(st, 2, batch_events=10, receipt_timeout_s=1.0)
    st.stop_server()
    for a in agents:
        a.post_events(list(service_events(400, a.settings.terminal_id)))
    # let the agents fill the broker's queue for the server and run into receipt time-outs
    wait_for(
        lambda: all(a.window.counters.receipt_timeouts >= 1 for a in agents),
        30,
        what="receipt time-outs while the server is away",
    )
    time.sleep(1.0)
    st.start_server()
    wait_for(lambda: st.stored() == 800, 90, what="all 800 events after the server returns")
    _assert_exactly_once(st, {a.settings.terminal_id: 400 for a in agents})
    # the broker really dropped messages: only receipts + re-sends saved them
    assert sum(a.window.counters.resent_events for a in agents) > 0


def test_broker_restarted_repeatedly_during_drain_gives_exact_count(make_stack: Any) -> None:
    st = make_stack(3)
    per = 5_000
    for tid in st.passwords:
        _prefill(st, tid, per)
    agents = _start(st, 3, batch_events=50, receipt_timeout_s=1.0)
    assert st.broker is not None
    for i in range(4):
        time.sleep(0.3)
        st.broker.restart(hard=(i % 2 == 1))  # alternate orderly stop and kill -9
    wait_for(lambda: st.stored() == 3 * per, 120, what="all events after broker restarts")
    wait_for(lambda: all(a.outbox.depth == 0 for a in agents), 60, what="outboxes emptied")
    _assert_exactly_once(st, {tid: per for tid in st.passwords})


def test_server_killed_and_restarted_during_drain_counts_each_event_once(make_stack: Any) -> None:
    st = make_stack(2)
    per = 3_000
    for tid in st.passwords:
        _prefill(st, tid, per)
    _start(st, 2, batch_events=50, receipt_timeout_s=1.0)
    wait_for(lambda: st.stored() > 500, 30, what="drain under way")
    st.stop_server()
    time.sleep(0.5)
    st.start_server()
    wait_for(lambda: st.stored() == 2 * per, 90, what="all events after server restart")
    _assert_exactly_once(st, {tid: per for tid in st.passwords})


def test_server_disk_full_stores_nothing_half_and_catches_up_when_space_returns(make_stack: Any) -> None:
    st = make_stack(1)
    assert st.server is not None and st.server.ingest._conn is not None
    conn = st.server.ingest._conn
    # A real SQLITE_FULL from SQLite itself: cap the database at its current size.
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    agents = _start(st, 1, receipt_timeout_s=1.0)
    agents[0].post_events(list(service_events(2_000)))
    wait_for(
        lambda: (st.server.metrics_registry.get_sample_value("fleet_ingest_write_errors_total") or 0) >= 2,
        20,
        what="write errors while the disk is full",
    )
    assert st.stored() == 0 and agents[0].outbox.depth == 2_000  # nothing receipted, nothing lost
    conn.execute("PRAGMA max_page_count=1073741823")
    wait_for(lambda: st.stored() == 2_000, 60, what="catch-up after space returns")
    wait_for(lambda: agents[0].outbox.depth == 0, 30, what="outbox emptied")
    _assert_exactly_once(st, {"t-000": 2_000})
