"""Hostile wire input (issue 8), replayed against the real server and a real Mosquitto.

Each test sends what an attacker with one terminal's credentials (or a broken kiosk build) sent,
and asserts the outcome: a counted reject with its reason, the other terminals' events of the
same moment stored and receipted, state per terminal bounded, no exception in the ingest thread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fleet_dev.devstack import DevStack
from fleet_dev.proc import wait_for
from fleet_server.db import migrate
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.service import Inbound, IngestLimits, IngestService
from fleet_server.ingest.store import IngestStore
from fleet_wire import topics
from fleet_wire.receipt import Receipt
from fleet_wire.topics import Channel
from tests.mqtt_util import RawClient


def _now_ts() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _env(terminal: str, seq: int, epoch: str, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1,
        "terminal": terminal,
        "epoch": epoch,
        "seq": seq,
        "id": uuid.uuid4().hex,
        "ts": _now_ts(),
        "type": "service.completed",
        "body": {"session": f"s-{seq}", "service_code": "TQ02", "duration_s": 95.0, "face_login": True},
    }
    doc.update(over)
    return doc


def _batch(*events: dict[str, Any]) -> bytes:
    return json.dumps({"v": 1, "events": list(events)}).encode()


def _sample(st: DevStack, name: str, labels: dict[str, str] | None = None) -> float:
    assert st.server is not None
    return st.server.metrics_registry.get_sample_value(name, labels or {}) or 0.0


def _rejected(st: DevStack, reason: str) -> float:
    return _sample(st, "fleet_ingest_rejected_total", {"reason": reason})


def _ingest_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("fleet_server.ingest") and r.levelno >= logging.ERROR]


class _Clients:
    """A hostile terminal (t-000), an honest one (t-001) and a watcher of t-001's receipts."""

    def __init__(self, st: DevStack) -> None:
        self.bad = RawClient(st.port, "t-000", st.passwords["t-000"], client_id="t-000")
        self.good = RawClient(st.port, "t-001", st.passwords["t-001"], client_id="t-001")
        self.good.subscribe(topics.topic("t-001", Channel.RECEIPT))

    def close(self) -> None:
        self.bad.close()
        self.good.close()

    def receipt_for(self, epoch: str, upto: int) -> bool:
        got = [Receipt.decode(p) for t, p in self.good.drain(wait_s=0.2) if t.endswith("/receipt")]
        self.receipts = getattr(self, "receipts", []) + got
        return any(r.epoch == epoch and r.upto >= upto for r in self.receipts)


@pytest.fixture
def stack(make_stack: Any) -> DevStack:
    st: DevStack = make_stack(2)
    return st


# -- 1. poisons that escaped the decoder ----------------------------------------------------------


def test_deep_nesting_and_huge_integers_cost_one_message_not_the_batch(
    stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    """Today these raise RecursionError / ValueError and the whole batch is acked unstored."""
    st = stack
    c = _Clients(st)
    own = topics.topic("t-000", Channel.EVENTS)
    honest_epoch = uuid.uuid4().hex
    try:
        deep = b'{"v":1,"events":' + b"[" * 3000 + b"]" * 3000 + b"}"
        huge = b'{"v":1,"events":[{"seq":' + b"9" * 5000 + b"}]}"
        nan = b'{"v":1,"events":[' + json.dumps(_env("t-000", 1, uuid.uuid4().hex)).encode()[:-1] + b',"x":NaN}]}'
        for i in range(20):  # interleaved with honest events, so they share the writer's batches
            c.bad.client.publish(own, deep, qos=1)
            c.bad.client.publish(own, huge, qos=1)
            c.good.client.publish(
                topics.topic("t-001", Channel.EVENTS), _batch(_env("t-001", i + 1, honest_epoch)), qos=1
            )
        c.bad.publish(own, nan)
        wait_for(lambda: st.stored("t-001") == 20, 15, what="t-001's 20 honest events")
        wait_for(lambda: c.receipt_for(honest_epoch, 20), 10, what="t-001's receipt up to 20")
        wait_for(lambda: _rejected(st, "too_deep") == 20 and _rejected(st, "number_too_long") == 20, 10, what="counts")
        wait_for(lambda: _rejected(st, "non_finite_number") == 1, 10, what="NaN counted")
    finally:
        c.close()
    assert st.stored("t-000") == 0
    assert st.server is not None and st.server.ingest.errors == 0
    assert _ingest_errors(caplog) == []


def _service(tmp_path: Path, **limits: Any) -> tuple[IngestService, list[tuple[str, bytes]], CollectorRegistry]:
    db = tmp_path / "fleet.db"
    migrate(db)
    registry = CollectorRegistry()
    published: list[tuple[str, bytes]] = []
    svc = IngestService(
        str(db),
        IngestMetrics(registry),
        lambda: {"t-000": "dongcheng", "t-001": "haidian"},
        publish=lambda t, p: published.append((t, p)),
        limits=IngestLimits(**limits),
    )
    return svc, published, registry


def test_one_poison_in_the_writers_batch_leaves_the_others_stored_and_receipted(tmp_path: Path) -> None:
    """Both messages are queued before the writer starts, so they are certainly one batch."""
    svc, published, registry = _service(tmp_path)
    epoch = uuid.uuid4().hex
    svc.submit(Inbound(topics.topic("t-000", Channel.EVENTS), b"[" * 5000, 1, 1))
    svc.submit(Inbound(topics.topic("t-000", Channel.STATUS), b'{"state":' + b"[" * 5000, 2, 0))
    svc.submit(Inbound(topics.topic("t-001", Channel.EVENTS), _batch(_env("t-001", 1, epoch)), 3, 1))
    svc.start()
    try:
        wait_for(lambda: svc.idle.is_set() and svc.batches >= 1, 10, what="the batch")
    finally:
        svc.stop()
    assert svc.batches == 1 and svc.errors == 0
    receipts = [Receipt.decode(p) for t, p in published if t.endswith("t-001/receipt")]
    assert [(r.epoch, r.upto) for r in receipts] == [(epoch, 1)]
    assert registry.get_sample_value("fleet_ingest_rejected_total", {"reason": "too_deep"}) == 1
    assert registry.get_sample_value("fleet_ingest_rejected_total", {"reason": "bad_status"}) == 1
    with sqlite3.connect(tmp_path / "fleet.db") as conn:
        assert conn.execute("SELECT terminal, seq FROM events").fetchall() == [("t-001", 1)]


def test_a_row_the_database_refuses_is_isolated_and_the_rest_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault the decoder cannot produce on demand: a fake store whose write refuses one terminal's rows."""
    real_write = IngestStore.write

    def fake_write_refusing_t000(self: IngestStore, events: Any, *args: Any, **kwargs: Any) -> None:
        if any(e[0] == "t-000" for e in events):
            raise sqlite3.IntegrityError("fake: this row cannot be stored")
        real_write(self, events, *args, **kwargs)

    # in place before the writer starts: it must never see the first batch with the real write
    monkeypatch.setattr(IngestStore, "write", fake_write_refusing_t000)
    svc, published, registry = _service(tmp_path)
    epoch_bad, epoch_good = uuid.uuid4().hex, uuid.uuid4().hex
    svc.submit(Inbound(topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 1, epoch_bad)), 1, 1))
    svc.submit(Inbound(topics.topic("t-001", Channel.EVENTS), _batch(_env("t-001", 1, epoch_good)), 2, 1))
    svc.start()
    try:
        wait_for(lambda: svc.idle.is_set() and svc.tallies.get("t-000") is not None, 10, what="the batch")
    finally:
        svc.stop()
    assert registry.get_sample_value("fleet_ingest_rejected_total", {"reason": "unstorable"}) == 1
    assert [Receipt.decode(p).epoch for t, p in published] == [epoch_good]
    assert svc.tallies["t-000"].rejected == 1 and svc.tallies["t-001"].stored == 1


def test_poisoned_retained_status_is_refused_at_every_reconnect_and_blocks_no_other_status(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    try:
        c.bad.publish(topics.topic("t-000", Channel.STATUS), b'{"state":"online","x":' + b"[" * 4000, retain=True)
        c.good.publish(
            topics.topic("t-001", Channel.STATUS), json.dumps({"state": "online", "hb_interval_s": 5.0}), retain=True
        )
        wait_for(lambda: _rejected(st, "bad_status") == 1, 10, what="the poisoned status refused")
        # a server restart gets every retained status again: the poison is refused again, t-001 applied
        st.stop_server()
        with sqlite3.connect(st.settings.db_path) as conn:
            conn.execute("DELETE FROM terminal_status")
        st.start_server()
        assert st.server is not None and st.server.link.connected.wait(10)

        def t001_online() -> bool:
            with sqlite3.connect(st.settings.db_path) as conn:
                return conn.execute("SELECT state FROM terminal_status WHERE terminal='t-001'").fetchall() == [
                    ("online",)
                ]

        wait_for(t001_online, 10, what="t-001's retained status applied after the restart")
        wait_for(lambda: _rejected(st, "bad_status") == 1, 10, what="the poison refused again (new counters)")
        assert st.server.ingest.errors == 0
    finally:
        c.bad.publish(topics.topic("t-000", Channel.STATUS), b"", retain=True)  # clear the retained poison
        c.close()


# -- 2. timestamps and the usage hook -------------------------------------------------------------


def test_far_future_timestamp_is_quarantined_and_never_reaches_usage(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    epoch = uuid.uuid4().hex
    try:
        c.bad.publish(
            topics.topic("t-000", Channel.EVENTS),
            _batch(_env("t-000", 1, epoch, ts="9999-12-31T23:59:59.999Z"), _env("t-000", 2, epoch)),
        )
        wait_for(lambda: st.stored("t-000") == 1, 10, what="the event with a sane time")
    finally:
        c.close()
    st.settle()  # the row is visible at COMMIT; the batch's counters and stream state follow
    assert _rejected(st, "ts_future") == 1
    assert st.server is not None
    row = st.server.ingest.streams()[("t-000", epoch)]
    assert row.seqs.upto == 2 and row.quarantined == 1  # receipted, so the terminal stops re-sending it
    with sqlite3.connect(st.settings.db_path) as conn:
        assert conn.execute("SELECT max(ts) FROM events").fetchone()[0] < "9999"
    st.server.usage.recompute()  # the rebuild the scheduler would run: the quarantined time never reaches it
    assert _sample(st, "fleet_usage_rebuild_errors_total") == 0
    assert not any(k for k in _hook_errors(st))


def _hook_errors(st: DevStack) -> dict[str, float]:
    assert st.server is not None
    out = {}
    for metric in st.server.metrics_registry.collect():
        if metric.name == "fleet_ingest_hook_errors":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels["hook"]] = s.value
    return out


def test_a_failing_commit_hook_is_counted_and_freezes_nothing(stack: DevStack) -> None:
    """A listener that raises (a fake: the real usage hook no longer gets such rows) does not stop the ingest."""
    st = stack
    assert st.server is not None

    def fake_hook_that_fails(rows: Any) -> None:
        raise OverflowError("fake: date value out of range")

    st.server.ingest.on_commit.insert(0, fake_hook_that_fails)
    agent = st.agent("t-001")
    st.tracked_agents.append(agent)  # type: ignore[attr-defined]
    agent.start()
    for i in range(5):
        agent.post_event(
            "service.completed", {"session": f"h-{i}", "service_code": "TQ02", "duration_s": 60.0, "face_login": False}
        )
    wait_for(lambda: st.stored("t-001") == 5 and agent.outbox.depth == 0, 20, what="5 events stored and receipted")
    assert sum(_hook_errors(st).values()) >= 1
    # the usage hook after the failing one still ran: its session counter follows the stored events
    office = st.offices["t-001"]
    assert _sample(st, "fleet_usage_sessions_total", {"office": office, "outcome": "completed"}) == 5


# -- 3. bounded state per terminal ------------------------------------------------------------------


def test_far_apart_seqs_keep_receipt_state_and_gap_gauge_bounded(stack: DevStack) -> None:
    st = stack
    assert st.server is not None
    st.server.ingest.limits = IngestLimits(max_ranges_per_stream=50)
    c = _Clients(st)
    epoch, honest_epoch = uuid.uuid4().hex, uuid.uuid4().hex
    own = topics.topic("t-000", Channel.EVENTS)
    try:
        c.bad.publish(own, _batch(_env("t-000", 5, epoch), _env("t-000", 2**53, epoch)))
        for start in range(0, 2000, 500):
            c.bad.publish(own, _batch(*(_env("t-000", 10 + 1000 * (start + k), epoch) for k in range(500))))
        c.good.publish(topics.topic("t-001", Channel.EVENTS), _batch(_env("t-001", 1, honest_epoch)))
        wait_for(lambda: st.stored("t-001") == 1, 10, what="the honest event")
        wait_for(
            lambda: _rejected(st, "limit_ranges") > 0 and st.server is not None and st.server.ingest.idle.is_set(), 10
        )
    finally:
        c.close()
    row = st.server.ingest.streams()[("t-000", epoch)]
    assert row.seqs.range_count <= 50
    assert st.stored("t-000") == 50  # upto 0, 50 ranges of one seq each; the rest refused
    assert _sample(st, "fleet_ingest_terminal_limited_total", {"reason": "ranges"}) == 2002 - 50
    with sqlite3.connect(st.settings.db_path) as conn:
        (ranges,) = conn.execute("SELECT ranges FROM streams WHERE epoch=?", (epoch,)).fetchone()
    assert len(ranges) < 50 * 40  # bytes of receipt state, rewritten per batch
    gauge = _sample(st, "fleet_ingest_gap_events")
    assert 0 < gauge <= 50 * IngestLimits().max_counted_gap  # never the distance to seq 2**53 (9e15)


def test_fresh_epochs_are_limited_per_terminal_and_others_unaffected(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    honest_epoch = uuid.uuid4().hex
    try:
        for _ in range(40):
            c.bad.client.publish(
                topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 1, uuid.uuid4().hex)), qos=1
            )
        c.bad.publish(topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 1, uuid.uuid4().hex)))
        c.good.publish(topics.topic("t-001", Channel.EVENTS), _batch(_env("t-001", 1, honest_epoch)))
        wait_for(lambda: st.stored("t-001") == 1, 10, what="t-001's new epoch still accepted")
        wait_for(lambda: _rejected(st, "limit_new_epochs") == 41 - IngestLimits().max_new_epochs_per_day, 10)
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    assert st.server is not None
    streams = st.server.ingest.streams()
    assert sum(1 for t, _ in streams if t == "t-000") == IngestLimits().max_new_epochs_per_day
    assert _sample(st, "fleet_ingest_terminal_limited_total", {"reason": "new_epochs"}) == 33


def test_a_reject_flood_writes_few_log_rows_and_counts_them_all(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    try:
        for i in range(200):
            c.bad.client.publish(topics.topic("t-000", Channel.EVENTS), b"{not json %d" % i, qos=1)
        c.bad.publish(topics.topic("t-000", Channel.EVENTS), b"{last")
        wait_for(lambda: _rejected(st, "malformed_json") == 201, 15, what="201 rejects counted")
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    with sqlite3.connect(st.settings.db_path) as conn:
        rows = conn.execute("SELECT count(*) FROM rejects WHERE terminal='t-000'").fetchone()[0]
    cap = IngestLimits().max_reject_rows_per_minute
    assert rows <= 2 * cap  # the flood may straddle one minute boundary
    assert _sample(st, "fleet_ingest_rejects_unlogged_total") == 201 - rows


# -- 4. strict types and exact identifiers ---------------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [
        {"v": True},
        {"ts": 1764590000},
        {"ts": 0},
        {"seq": True},
        {"seq": 1.0},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": True}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": "95"}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": 9.5, "face_login": "yes"}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": 9.5, "step": "\ud800"}},
    ],
    ids=[
        "v-true",
        "ts-number",
        "ts-zero",
        "seq-true",
        "seq-float",
        "duration-true",
        "duration-str",
        "face-yes",
        "surrogate",
    ],
)
def test_wrong_types_are_refused_not_coerced(stack: DevStack, over: dict[str, Any]) -> None:
    st = stack
    c = _Clients(st)
    epoch = uuid.uuid4().hex
    body_over = over.get("body")
    event = _env("t-000", 1, epoch, type="service.abandoned" if body_over else "service.completed")
    event.update(over)
    try:
        c.bad.publish(topics.topic("t-000", Channel.EVENTS), _batch(event, _env("t-000", 2, epoch)))
        wait_for(lambda: st.stored("t-000") == 1, 10, what="the well-typed event beside it")
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    with sqlite3.connect(st.settings.db_path) as conn:
        assert conn.execute("SELECT seq FROM events WHERE terminal='t-000'").fetchall() == [(2,)]
    assert sum(_rejected(st, r) for r in ("schema", "bad_body", "bad_text")) == 1


def test_event_ids_are_unique_per_stream(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    epoch = uuid.uuid4().hex
    same = uuid.uuid4().hex
    try:
        c.bad.publish(
            topics.topic("t-000", Channel.EVENTS), _batch(*(_env("t-000", s, epoch, id=same) for s in range(1, 250)))
        )
        c.bad.publish(
            topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 300, epoch, id=same))
        )  # a later batch
        wait_for(lambda: _rejected(st, "duplicate_id") == 249, 10, what="248 + 1 reused ids quarantined")
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    with sqlite3.connect(st.settings.db_path) as conn:
        assert conn.execute("SELECT seq FROM events WHERE id=?", (same,)).fetchall() == [(1,)]
    assert st.server is not None
    assert st.server.ingest.streams()[("t-000", epoch)].quarantined == 249


def test_an_epoch_with_a_trailing_newline_is_no_stream(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    epoch = uuid.uuid4().hex
    try:
        bad_body = {"session": "s", "service_code": "nope"}  # refused, then its keys are salvaged
        c.bad.publish(topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 1, epoch + "\n", body=bad_body)))
        c.bad.publish(topics.topic("t-000", Channel.EVENTS), _batch(_env("t-000", 1, epoch)))
        wait_for(lambda: st.stored("t-000") == 1, 10, what="the event with the exact epoch")
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    assert st.server is not None
    assert [e for t, e in st.server.ingest.streams() if t == "t-000"] == [epoch]


def test_old_backlog_is_stored_and_counted_late_but_a_reset_clock_is_refused(stack: DevStack) -> None:
    st = stack
    c = _Clients(st)
    epoch = uuid.uuid4().hex
    old = (datetime.now(UTC) - timedelta(days=45)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    try:
        c.bad.publish(
            topics.topic("t-000", Channel.EVENTS),
            _batch(_env("t-000", 1, epoch, ts=old), _env("t-000", 2, epoch, ts="1970-01-01T00:00:00.000Z")),
        )
        wait_for(lambda: st.stored("t-000") == 1, 10, what="the offline backlog event")
    finally:
        c.close()
    st.settle()  # the batch's after-commit work (counters, stream state) is done
    assert _sample(st, "fleet_ingest_late_events_total") == 1
    assert _rejected(st, "ts_too_old") == 1
