"""The outbox on real SQLite files: durability, seq/epoch rules, bounds, eviction, TTL, receipts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent.outbox import InvalidEvent, Outbox, OutboxFull, OutboxLimits
from fleet_dev.devstack import service_events
from fleet_dev.proc import wait_for
from fleet_wire.events import EventClass
from fleet_wire.receipt import Receipt

TELEMETRY = {"cpu_pct": 5, "mem_pct": 40, "disk_pct": 30, "outbox_depth": 0}


def _biz(i: int) -> tuple[str, dict[str, Any], None]:
    return next(iter(service_events(1, f"b{i}")))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_event_is_on_disk_when_enqueue_returns(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1")
    item = box.enqueue(*_biz(1)[:2])
    # another connection (another process would see the same) reads the committed row
    with sqlite3.connect(tmp_path / "o.db") as other:
        assert other.execute("SELECT seq FROM outbox").fetchall() == [(item.seq,)]
    box.close()


def test_seq_never_reused_and_epoch_kept_across_restarts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1")
    epoch = box.epoch
    items = box.enqueue_many([_biz(i) for i in range(5)])
    assert [i.seq for i in items] == [1, 2, 3, 4, 5]
    box.confirm(Receipt("t-1", epoch, 5))
    assert box.depth == 0
    box.close()
    box = Outbox(tmp_path / "o.db", "t-1")
    assert box.epoch == epoch
    assert box.enqueue(*_biz(9)[:2]).seq == 6
    box.close()
    fresh = Outbox(tmp_path / "new.db", "t-1")  # a replaced disk starts a new stream
    assert fresh.epoch != epoch and fresh.enqueue(*_biz(1)[:2]).seq == 1
    fresh.close()


def test_invalid_event_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1")
    with pytest.raises(InvalidEvent, match="service_code"):
        box.enqueue("service.completed", {"session": "s", "duration_s": 3})
    with pytest.raises(InvalidEvent, match="unknown event type"):
        box.enqueue("service.exploded", {})
    with pytest.raises(InvalidEvent):
        box.enqueue("outbox.tombstone", {"reason": "evicted", "original_type": "x", "original_class": 0})
    with pytest.raises(InvalidEvent):  # one bad event refuses the whole batch
        box.enqueue_many([_biz(1), ("service.completed", {"session": "s"}, None)])
    assert box.depth == 0 and box.all_seqs() == []
    box.close()


def test_receipt_with_ranges_deletes_exactly_the_stored_rows(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1")
    box.enqueue_many([_biz(i) for i in range(10)])
    assert box.confirm(Receipt("t-1", box.epoch, 2, ((4, 5), (8, 8)))) == 5
    assert box.all_seqs() == [3, 6, 7, 9, 10]
    assert box.confirm(Receipt("t-1", "f" * 32, 10)) == 0  # another epoch's receipt
    assert box.confirm(Receipt("t-2", box.epoch, 10)) == 0  # another terminal's receipt
    assert box.all_seqs() == [3, 6, 7, 9, 10]
    box.close()


def test_full_outbox_evicts_telemetry_first_into_tombstones(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1", OutboxLimits(max_rows=10, max_bytes=10**7))
    for _ in range(6):
        box.enqueue("telemetry.sample", TELEMETRY)
    box.enqueue_many([_biz(i) for i in range(4)])
    box.enqueue_many([_biz(i) for i in range(10, 13)])  # needs 3 rows: the 3 oldest samples go
    st = box.stats()
    assert st.live == 10 and st.by_class == {"telemetry": 3, "business": 7, "tombstone": 3}
    assert box.counters.evicted == 3
    with sqlite3.connect(tmp_path / "o.db") as conn:
        assert [r[0] for r in conn.execute("SELECT seq FROM outbox WHERE type='outbox.tombstone'")] == [1, 2, 3]
    box.close()


def test_business_event_refused_with_error_when_only_business_events_fill_the_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1", OutboxLimits(max_rows=5, max_bytes=10**7))
    box.enqueue_many([_biz(i) for i in range(5)])
    with pytest.raises(OutboxFull) as err:
        box.enqueue(*_biz(99)[:2])
    assert err.value.event_class == EventClass.BUSINESS and "full" in str(err.value)
    assert box.counters.refused == 1 and box.depth == 5 and box.counters.evicted == 0
    # telemetry may not displace business either
    with pytest.raises(OutboxFull):
        box.enqueue("telemetry.sample", TELEMETRY)
    box.close()


def test_byte_bound_is_enforced(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", "t-1", OutboxLimits(max_rows=10**6, max_bytes=64 * 1024))
    stored = 0
    with pytest.raises(OutboxFull):
        for i in range(10_000):
            box.enqueue(*_biz(i)[:2])
            stored += 1
    assert box.stats().bytes <= 64 * 1024 and box.depth == stored
    box.close()


def test_rows_past_their_class_ttl_become_tombstones_business_never_expires(tmp_path: Path) -> None:
    clock = Clock()
    box = Outbox(tmp_path / "o.db", "t-1", clock=clock)
    box.enqueue("telemetry.sample", TELEMETRY)
    box.enqueue("peripheral.fault", {"peripheral": "printer", "code": "paper_out"})
    box.enqueue(*_biz(1)[:2])
    clock.now += 2 * 24 * 3600
    assert box.expire() == 1  # telemetry TTL is a day
    clock.now += 30 * 24 * 3600
    assert box.expire() == 1  # operational TTL is two weeks
    assert box.stats().by_class == {"business": 1, "tombstone": 2}
    assert box.counters.expired == 2
    box.close()


def test_tombstones_reach_the_server_and_are_counted_not_lost(make_stack: Any) -> None:
    stack = make_stack(1)
    agent = stack.agent("t-000", outbox_max_rows=20)
    stack.tracked_agents.append(agent)
    for _ in range(15):
        agent.post_event("telemetry.sample", TELEMETRY)
    agent.post_events([_biz(i) for i in range(10)])  # evicts 5 samples while offline
    assert agent.outbox.counters.evicted == 5
    agent.start()
    wait_for(lambda: stack.stored() == 20, 20, what="20 events stored")
    assert stack.server is not None
    wait_for(
        lambda: sum(r.dropped for r in stack.server.ingest.streams().values()) == 5, 10, what="5 tombstones counted"
    )
    row = next(iter(stack.server.ingest.streams().values()))
    assert row.seqs.upto == 25 and row.seqs.ranges == []  # tombstones let the mark pass: no gap
    assert (
        stack.server.metrics_registry.get_sample_value("fleet_events_dropped_by_terminal_total", {"reason": "evicted"})
        == 5
    )


def test_window_requeues_what_the_client_did_not_keep_and_everything_after_a_sessionless_reconnect(
    tmp_path: Path,
) -> None:
    from edge_agent.outbox import SendWindow

    box = Outbox(tmp_path / "o.db", "t-1")
    box.enqueue_many([_biz(i) for i in range(6)])
    w = SendWindow(box, window=4, batch_events=2)
    b1 = w.next_batch()
    assert b1 is not None
    w.published(b1, None)  # the client's own queue refused it
    assert w.in_flight == 0 and w.resend_seqs() == [1, 2]
    b2, b3 = w.next_batch(), w.next_batch()
    assert b2 is not None and b3 is not None and b2.seqs == [1, 2] and b3.seqs == [3, 4]
    w.published(b2, 10)
    w.published(b3, 11)
    w.puback(10)
    w.connected(session_present=True)  # the broker kept our session: nothing to do
    assert w.in_flight == 2
    w.connected(session_present=False)  # a fresh broker: re-send PUBACKed and un-PUBACKed alike
    assert w.in_flight == 0 and w.resend_seqs() == [1, 2, 3, 4]
    box.close()


BODY = {"session": "k-1", "service_code": "TQ02", "duration_s": 95.5, "face_login": True}


def test_same_key_with_a_different_body_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    from edge_agent.outbox.store import IdempotencyKeyReused

    box = Outbox(tmp_path / "o.db", "t-1")
    first = box.enqueue("service.completed", BODY, key="kiosk-0001")
    # the same request again, even with its defaults spelled out: a replay of the first event
    again = box.enqueue("service.completed", {**BODY, "face_login": True}, key="kiosk-0001")
    assert again.replayed and again.seq == first.seq
    with pytest.raises(IdempotencyKeyReused, match="different request") as err:
        box.enqueue("service.completed", {**BODY, "duration_s": 12.0}, key="kiosk-0001")
    assert err.value.seq == first.seq
    with pytest.raises(IdempotencyKeyReused):
        box.enqueue("service.started", {"session": "k-1", "service_code": "TQ02"}, key="kiosk-0001")
    # one call carrying the key twice: the same request is one event, different ones are refused
    both = box.enqueue_many([("service.completed", BODY, None)] * 2, keys=["kiosk-0002", "kiosk-0002"])
    assert [b.replayed for b in both] == [False, True] and both[0].seq == both[1].seq
    other = {**BODY, "session": "k-2"}
    with pytest.raises(IdempotencyKeyReused):
        box.enqueue_many([("service.completed", BODY, None), ("service.completed", other, None)], keys=["k-3x", "k-3x"])
    assert box.all_seqs() == [first.seq, both[0].seq]
    box.close()


def test_outbox_made_before_request_hashes_keeps_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE keys (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL, created REAL NOT NULL);"
        "INSERT INTO keys VALUES ('kiosk-old-1', 7, 'service.completed', 1e12);"
    )
    old.close()
    box = Outbox(path, "t-1")
    # no hash was stored with it: whatever the body, the old key answers as a replay, as it did
    replay = box.enqueue("service.completed", {**BODY, "duration_s": 1.0}, key="kiosk-old-1")
    assert replay.replayed and replay.seq == 7 and box.depth == 0
    fresh = box.enqueue("service.completed", BODY, key="kiosk-new-1")
    assert not fresh.replayed
    box.close()
    box = Outbox(path, "t-1")  # the migration is idempotent
    assert box.enqueue("service.completed", BODY, key="kiosk-new-1").replayed
    box.close()


def test_outbox_files_are_readable_by_the_agent_only(tmp_path: Path) -> None:
    import os
    import stat

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    previous = os.umask(0o022)  # a typical umask: files would be 0644
    try:
        box = Outbox(tmp_path / "o.db", "t-1")
        box.enqueue("service.completed", BODY)
        files = sorted(tmp_path.glob("o.db*"))
        assert {f.name for f in files} >= {"o.db", "o.db-wal", "o.db-shm"}
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        box.close()
        loose = tmp_path / "loose.db"  # made by an older agent
        sqlite3.connect(loose).close()
        loose.chmod(0o644)
        Outbox(loose, "t-1").close()
        assert mode(loose) == 0o600
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        {**BODY, "duration_s": True},
        {**BODY, "duration_s": "95"},
        {**BODY, "duration_s": 95},
        {**BODY, "face_login": "yes"},
        {**BODY, "face_login": 1},
        {**BODY, "extra": 1},
        {k: v for k, v in BODY.items() if k != "session"},
        {**BODY, "service_code": "tq02"},
        [BODY],
        "not a body",
    ],
)
def test_batched_validation_accepts_and_refuses_exactly_what_the_wire_schema_does(tmp_path: Path, body: Any) -> None:
    from fleet_wire.errors import EnvelopeInvalid
    from fleet_wire.events import validate_body_json

    try:
        expected: str | None = validate_body_json("service.completed", body)
    except EnvelopeInvalid:
        expected = None
    box = Outbox(tmp_path / "o.db", "t-1")
    try:
        # alone and in the middle of a batch of good events
        for events in ([("service.completed", body, None)], [("service.completed", BODY, None)] * 3):
            if len(events) > 1:
                events.insert(1, ("service.completed", body, None))
            if expected is None:
                with pytest.raises(InvalidEvent):
                    box.enqueue_many(events)
            else:
                items = box.enqueue_many(events)
                assert f'"body":{expected}}}' in items[1 if len(events) > 1 else 0].env
    finally:
        box.close()
    assert expected is not None or box.depth == 0
