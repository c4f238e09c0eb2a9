"""Bad input on the wire is refused with a counted reason and never stops the ingest."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from fleet_dev.devstack import DevStack, service_events
from fleet_dev.proc import wait_for
from fleet_wire import topics
from fleet_wire.topics import Channel
from tests.mqtt_util import RawClient


def _env(terminal: str, seq: int, epoch: str, **over: Any) -> dict[str, Any]:
    doc = {
        "v": 1,
        "terminal": terminal,
        "epoch": epoch,
        "seq": seq,
        "id": uuid.uuid4().hex,
        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "type": "service.started",
        "body": {"session": f"x-{seq}", "service_code": "TQ01", "face_login": True},
    }
    doc.update(over)
    return doc


def _rejected(st: DevStack, reason: str) -> float:
    assert st.server is not None
    return st.server.metrics_registry.get_sample_value("fleet_ingest_rejected_total", {"reason": reason}) or 0.0


def test_malformed_messages_are_rejected_with_reasons_and_later_events_still_stored(make_stack: Any) -> None:
    st = make_stack(2)
    bad = RawClient(st.port, "t-000", st.passwords["t-000"])  # a buggy or tampered terminal
    admin = RawClient(st.port, st.settings.broker_username, st.server_password)
    own = topics.topic("t-000", Channel.EVENTS)
    epoch = uuid.uuid4().hex
    try:
        bad.publish(own, b"{not json")
        bad.publish(own, json.dumps({"v": 99, "events": []}))
        bad.publish(own, json.dumps({"v": 1, "events": "nope"}))
        bad.publish(own, b"x" * 300_000)
        bad.publish(own, json.dumps({"v": 1, "events": [_env("t-001", 1, epoch)]}))  # spoofed id
        bad.publish(own, json.dumps({"v": 1, "events": [_env("t-000", 1, epoch, type="service.teleport")]}))
        bad.publish(
            own,
            json.dumps(
                {"v": 1, "events": [_env("t-000", 2, epoch, body={"session": "x", "service_code": "not-a-code"})]}
            ),
        )
        bad.publish(own, json.dumps({"v": 1, "events": [_env("t-000", 3, epoch, ts="2026-11-27T10:00:00+08:00")]}))
        bad.publish(topics.topic("t-000", Channel.STATUS), b"\xff\xfe")
        ghost = json.dumps({"v": 1, "events": [_env("ghost-1", 1, epoch)]})
        admin.publish(topics.topic("ghost-1", Channel.EVENTS), ghost)
        admin.publish("fleet/v1/t/Not_An_Id/events", b"{}")
        # a valid event in the same stream still goes through
        bad.publish(own, json.dumps({"v": 1, "events": [_env("t-000", 4, epoch)]}))
        wait_for(lambda: st.stored("t-000") == 1, 15, what="the valid event after the bad ones")
    finally:
        bad.close()
        admin.close()
    expected = {
        "malformed_json": 1,
        "schema_version": 1,
        "schema": 2,
        "oversized": 1,
        "terminal_mismatch": 1,
        "unknown_type": 1,
        "bad_body": 1,
        "bad_status": 1,
        "unknown_terminal": 1,
        "bad_topic": 1,
    }
    wait_for(lambda: all(_rejected(st, r) >= n for r, n in expected.items()), 10, what="reject counters")
    st.settle()  # counters come first in a batch's after-commit work; the stream state follows
    assert {r: _rejected(st, r) for r in expected} == expected
    # the refused event whose seq was readable is quarantined and receipted, not retried forever
    assert st.server is not None
    row = st.server.ingest.streams()[("t-000", epoch)]
    assert row.seqs.upto == 4 and row.quarantined == 3 and row.stored == 1
    # and the real agent of that terminal still works afterwards
    agent = st.agent("t-001")
    st.tracked_agents.append(agent)
    agent.start()
    agent.post_events(list(service_events(50)))
    wait_for(lambda: st.stored("t-001") == 50, 20, what="50 valid events from t-001")


def test_rejects_are_listed_with_reason_over_the_api(make_stack: Any) -> None:
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app

    st = make_stack(1)
    bad = RawClient(st.port, "t-000", st.passwords["t-000"])
    try:
        bad.publish(topics.topic("t-000", Channel.EVENTS), b"[1, 2")
    finally:
        bad.close()
    assert st.server is not None
    wait_for(lambda: _rejected(st, "malformed_json") == 1, 10, what="reject counted")
    app = create_app(st.settings, st.server)
    with TestClient(app) as client:
        assert client.get("/api/v1/ingest/rejects").status_code == 401
        rejects = client.get("/api/v1/ingest/rejects", headers={"Authorization": f"Bearer {st.admin_token}"}).json()
    assert rejects[0]["reason"] == "malformed_json" and rejects[0]["terminal"] == "t-000"
    assert "not JSON" in rejects[0]["detail"]


def test_terminal_cannot_publish_into_another_terminals_topics(make_stack: Any) -> None:
    st = make_stack(2)
    watcher = RawClient(st.port, st.settings.broker_username, st.server_password)
    watcher.subscribe("fleet/v1/t/t-001/#")
    spoof311 = RawClient(st.port, "t-000", st.passwords["t-000"], v5=False)
    spoof5 = RawClient(st.port, "t-000", st.passwords["t-000"])
    victim = RawClient(st.port, "t-001", st.passwords["t-001"])
    try:
        epoch = uuid.uuid4().hex
        forged = json.dumps({"v": 1, "events": [_env("t-001", 1, epoch)]})
        spoof311.publish(topics.topic("t-001", Channel.EVENTS), forged)  # PUBACKed, silently dropped
        rc = spoof5.publish(topics.topic("t-001", Channel.STATUS), b'{"state":"offline"}')
        assert rc is not None and rc.value == 135  # MQTT 5: not authorized
        # t-000 also cannot listen to t-001's receipts
        spoof5.subscribe(topics.topic("t-001", Channel.RECEIPT))
        # control: t-001's own message does arrive, so the watcher really watches
        victim.publish(topics.topic("t-001", Channel.CMD_ACK), b'{"ok":true}')
        got = watcher.drain(wait_s=3.0)
        assert [t for t, _ in got] == ["fleet/v1/t/t-001/cmd/ack"]
        # the server sends t-001 a receipt; t-000 must not receive it
        victim.publish(topics.topic("t-001", Channel.EVENTS), json.dumps({"v": 1, "events": [_env("t-001", 1, epoch)]}))
        wait_for(lambda: st.stored("t-001") == 1, 10, what="t-001's own event")
        seen: list[str] = []  # the receipt goes out after the batch's listeners, then a broker hop

        def receipt_seen() -> bool:
            seen.extend(t for t, _ in watcher.drain(wait_s=0.2))
            return any(t.endswith("/receipt") for t in seen)

        wait_for(receipt_seen, 10, what="the server's receipt for t-001")
        assert spoof5.drain(wait_s=1.0) == []
        assert st.stored("t-001") == 1
    finally:
        for c in (watcher, spoof311, spoof5, victim):
            c.close()
