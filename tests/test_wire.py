"""The wire contract: topics, envelopes, batches and receipts (pure logic, fast)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_wire import topics
from fleet_wire.envelope import decode_batch, encode_batch
from fleet_wire.errors import TopicError, WireError
from fleet_wire.receipt import Receipt, SeqSet
from fleet_wire.topics import Channel

terminal_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,62}\Z")


@given(terminal_ids, st.sampled_from(list(Channel)))
def test_topic_build_parse_round_trip(tid: str, channel: Channel) -> None:
    ref = topics.parse(topics.topic(tid, channel))
    assert (ref.terminal_id, ref.channel) == (tid, channel)


@pytest.mark.parametrize(
    "bad",
    [
        "fleet/v1/t/a/events",
        "fleet/v2/t/t-1/events",
        "fleet/v1/t/t-1/nope",
        "fleet/v1/t/T-1/events",
        "fleet/v1/t/+/events",
        "fleet/v1/t/t 1/events",
    ],
)
def test_parse_refuses_foreign_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.parse(bad)


def test_building_a_topic_refuses_wildcards_in_terminal_id() -> None:
    with pytest.raises(TopicError, match="terminal id"):
        topics.topic("t-1/#", Channel.EVENTS)


def test_acl_patterns_confine_terminals_to_their_own_subtree() -> None:
    for line in topics.acl_patterns():
        assert line.startswith("pattern ") and "/%u/" in line and "#" not in line and "+" not in line


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=200))
def test_seqset_behaves_like_a_set(seqs: list[int]) -> None:
    model: set[int] = set()
    s = SeqSet()
    for x in seqs:
        assert s.add(x) == (x not in model)
        model.add(x)
    assert s.count() == len(model)
    for x in range(1, 302):
        assert (x in s) == (x in model)
    upto = 0
    while upto + 1 in model:
        upto += 1
    assert s.upto == upto
    # ranges are disjoint, sorted, non-adjacent and above upto + 1
    prev_end = upto
    for a, b in s.ranges:
        assert a > prev_end + 1 and a <= b
        prev_end = b
    missing = {x for a, b in s.missing() for x in range(a, b + 1)}
    assert missing == {x for x in range(1, max(model, default=0) + 1) if x not in model}


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=100))
def test_receipt_round_trips_and_covers_exactly_the_stored_seqs(seqs: list[int]) -> None:
    s = SeqSet()
    for x in seqs:
        s.add(x)
    epoch = uuid.uuid4().hex
    r = Receipt.decode(Receipt.from_seqset("t-1", epoch, s).encode())
    assert r.upto == s.upto
    if len(s.ranges) <= 64:
        assert all(r.covers(x) == (x in s) for x in range(1, 202))
    else:  # truncated receipts may under-report, never over-report
        assert all(x in s for x in range(1, 202) if r.covers(x))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"v":1}',
        b'{"v":1,"terminal":"t","epoch":"x","upto":0}',
        b'{"v":1,"terminal":"t","epoch":"' + b"a" * 32 + b'","upto":5,"ranges":[[3,4]]}',
    ],
)
def test_malformed_receipts_are_refused(payload: bytes) -> None:
    with pytest.raises(WireError):
        Receipt.decode(payload)


def _event(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "v": 1,
        "terminal": "t-1",
        "epoch": "a" * 32,
        "seq": 1,
        "id": "b" * 32,
        "ts": datetime.now(UTC).isoformat(),
        "type": "service.completed",
        "body": {"session": "s1", "service_code": "TQ02", "duration_s": 10.0},
    }
    doc.update(over)
    return doc


def test_batch_rejects_only_the_bad_event_and_salvages_its_seq() -> None:
    payload = encode_batch([_event(seq=1), _event(seq=2, body={"session": "s"}), _event(seq=3)])
    out = decode_batch("t-1", payload)
    assert [e.seq for e in out.events] == [1, 3]
    [rej] = out.rejected
    assert rej.reason == "bad_body" and rej.seq == 2 and "events[1]" in rej.detail
    assert "service_code" in rej.detail  # names the missing field


@pytest.mark.parametrize(
    "over, reason",
    [
        ({"terminal": "t-2"}, "terminal_mismatch"),
        ({"seq": 0}, "schema"),
        ({"seq": "1"}, "schema"),
        ({"ts": "2026-01-01T00:00:00"}, "schema"),
        ({"ts": "2026-01-01T08:00:00+08:00"}, "schema"),
        ({"type": "x.y"}, "unknown_type"),
        ({"extra": 1}, "schema"),
        ({"body": {"session": "s", "service_code": "TQ02", "duration_s": 1, "x": "y" * 9000}}, "oversized"),
    ],
)
def test_event_faults_have_stable_reasons(over: dict[str, object], reason: str) -> None:
    out = decode_batch("t-1", encode_batch([_event(**over)]))
    assert not out.events and out.rejected[0].reason == reason


def test_whole_message_faults() -> None:
    assert decode_batch("t-1", b"\x00\x01").rejected[0].reason == "malformed_json"
    assert decode_batch("t-1", json.dumps({"v": 2, "events": []}).encode()).rejected[0].reason == "schema_version"
    assert decode_batch("t-1", b"x" * 300_000).rejected[0].reason == "oversized"
    big = json.dumps({"v": 1, "events": [{}] * 501}).encode()
    assert decode_batch("t-1", big).rejected[0].reason == "oversized"
