"""The wire contract: topics, envelopes, batches and receipts (pure logic, fast)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_wire import topics
from fleet_wire.commands import decode_cmd_ack
from fleet_wire.envelope import decode_batch, encode_batch, is_epoch, is_late
from fleet_wire.errors import CmdAckInvalid, StatusInvalid, TopicError, WireError
from fleet_wire.receipt import Receipt, SeqSet
from fleet_wire.status import decode_status
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


# -- hostile input (issue 8): bounded, strict, never escapes --------------------------------------

epochs = st.text("0123456789abcdef", min_size=32, max_size=32)
moments = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC)).map(
    lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
)
bodies = st.fixed_dictionaries(
    {
        "session": st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z"),
        "service_code": st.from_regex(r"\A[A-Z]{2}[0-9]{2}\Z"),
        "duration_s": st.floats(min_value=0, max_value=86400, allow_nan=False),
        "face_login": st.booleans(),
    }
)
NOW = datetime(2026, 12, 31, tzinfo=UTC)


@given(terminal_ids, epochs, st.integers(min_value=1, max_value=2**53), moments, bodies)
def test_valid_envelopes_round_trip_exactly(
    tid: str, epoch: str, seq: int, moment: datetime, body: dict[str, object]
) -> None:
    doc = {
        "v": 1,
        "terminal": tid,
        "epoch": epoch,
        "seq": seq,
        "id": uuid.uuid4().hex,
        "ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "type": "service.completed",
        "body": body,
    }
    out = decode_batch(tid, encode_batch([doc]), now=NOW)
    assert not out.rejected
    [env] = out.events
    assert (env.terminal, env.epoch, env.seq, env.id, env.ts) == (tid, epoch, seq, doc["id"], moment)
    assert env.body == body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_no_payload_escapes_any_decoder(payload: bytes) -> None:
    out = decode_batch("t-1", payload)  # never raises
    if not out.rejected:  # nothing refused: it was a well-formed batch
        assert json.loads(payload)["events"] == [e.model_dump(mode="json") for e in out.events]
    for decode in (decode_status, decode_cmd_ack, Receipt.decode):
        try:
            decode(payload)
        except WireError:
            pass


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b'{"v":1,"events":' + b"[" * 3000 + b"]" * 3000 + b"}", "too_deep"),
        (b"[" * 200_000, "too_deep"),
        (b'{"v":1,"events":[{"seq":' + b"9" * 5000 + b"}]}", "number_too_long"),
        (b'{"v":1,"events":[NaN]}', "non_finite_number"),
        (b'{"v":1,"events":[1e400]}', "non_finite_number"),
        (b'"' + b'\\"' * 100_000, "malformed_json"),  # quadratic for a naive string regex
        (b'{"v":true,"events":[]}', "schema_version"),
    ],
)
def test_poisons_are_refused_as_a_whole_with_their_reason(payload: bytes, reason: str) -> None:
    out = decode_batch("t-1", payload)
    assert out.message_refused and [r.reason for r in out.rejected] == [reason]


def test_brackets_and_digits_inside_strings_are_not_structure() -> None:
    body = {"session": "s", "service_code": "TQ02", "duration_s": 1.0, "step": "[[[[[[[[[[[[" + "9" * 40}
    out = decode_batch("t-1", encode_batch([_event(type="service.abandoned", body=body)]))
    assert [e.body["step"] for e in out.events] == [body["step"]]


@pytest.mark.parametrize(
    "over",
    [
        {"v": True},
        {"ts": 1764590000},
        {"ts": 0},
        {"ts": "2026-12-01"},
        {"seq": True},
        {"seq": 2**53 + 1},
        {"epoch": "a" * 32 + "\n"},
        {"id": "b" * 32 + "\n"},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": True}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": "95"}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": 9.0, "face_login": "yes"}},
        {"body": {"session": "s", "service_code": "TQ02", "duration_s": 9.0, "face_login": 1}},
    ],
)
def test_wrong_types_are_refused_not_coerced(over: dict[str, object]) -> None:
    out = decode_batch("t-1", encode_batch([_event(**over)]))
    assert not out.events and out.rejected[0].reason in ("schema", "bad_body")


def test_an_epoch_with_a_trailing_newline_is_not_salvaged_as_a_stream() -> None:
    out = decode_batch("t-1", encode_batch([_event(epoch="a" * 32 + "\n", body={"session": "x"})]))
    assert out.rejected[0].epoch is None and out.rejected[0].seq is None
    assert not is_epoch("a" * 32 + "\n") and is_epoch("a" * 32)
    assert not topics.is_terminal_id("t-1\n")
    with pytest.raises(TopicError):
        topics.parse("fleet/v1/t/t-1\n/events")


@pytest.mark.parametrize(
    "delta, reason",
    [(timedelta(days=2), "ts_future"), (timedelta(days=-401), "ts_too_old"), (timedelta(days=-45), None)],
)
def test_timestamps_are_judged_against_the_receivers_clock(delta: timedelta, reason: str | None) -> None:
    now = datetime.now(UTC)
    ts = (now + delta).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out = decode_batch("t-1", encode_batch([_event(ts=ts)]), now=now)
    if reason is None:  # an offline terminal's backlog: stored, and the server counts it as late
        assert out.events and is_late(out.events[0].ts, now)
    else:
        assert not out.events and out.rejected[0].reason == reason and out.rejected[0].seq == 1


def test_a_lone_surrogate_is_refused_before_it_reaches_storage() -> None:
    body = {"session": "s", "service_code": "TQ02", "duration_s": 1.0, "step": "\ud800"}
    payload = json.dumps({"v": 1, "events": [_event(type="service.abandoned", body=body)]}).encode()
    out = decode_batch("t-1", payload)
    assert not out.events and out.rejected[0].reason == "bad_text"


@given(st.lists(st.integers(min_value=1, max_value=10_000), max_size=200), st.integers(min_value=1, max_value=50))
def test_seqset_range_accounting(seqs: list[int], cap: int) -> None:
    s = SeqSet()
    for x in seqs:
        before = s.range_count
        grows = s.adds_range(x)
        s.add(x)
        assert (s.range_count == before + 1) == grows
    assert s.missing_count(cap) == sum(min(b - a + 1, cap) for a, b in s.missing(limit=10**6))


def test_far_seq_is_one_capped_gap() -> None:
    s = SeqSet()
    for x in (1, 2, 5, 2**53):
        s.add(x)
    assert s.missing_count(10_000) == 2 + 10_000


def test_status_documents_are_bounded_and_strict() -> None:
    doc = {"state": "online", "hb_interval_s": 5.0, "outbox": {"depth": 3, "oldest_age_s": 1.5}, "new_field": 1}
    status = decode_status(json.dumps(doc).encode())
    assert json.loads(status.to_json()) == {k: v for k, v in doc.items() if k != "new_field"} | {
        "outbox": {"depth": 3, "oldest_age_s": 1.5, "refused": 0}
    }
    assert decode_status(b"").state == "offline"
    for bad in (
        b'{"state":"online","x":' + b"[" * 3000,
        b'{"state":true}',
        b'{"state":"online","hb_interval_s":1e12}',
        b'{"state":"online","hb_interval_s":"5"}',
        b'{"state":"online","outbox":{"depth":' + b"9" * 5000 + b"}}",
        b"\xff\xfe",
    ):
        with pytest.raises(StatusInvalid) as err:
            decode_status(bad)
        assert err.value.reason == "bad_status"
    with pytest.raises(StatusInvalid) as err:
        decode_status(b" " * 20_000)
    assert err.value.reason == "oversized"


def test_cmd_acks_are_strict() -> None:
    ack = decode_cmd_ack(json.dumps({"v": 1, "cmd": "c" * 32, "state": "done"}).encode())
    assert ack.state == "done"
    for bad in (b'{"ok":true}', b'{"v":true,"cmd":"' + b"c" * 32 + b'","state":"done"}', b"[" * 900):
        with pytest.raises(CmdAckInvalid):
            decode_cmd_ack(bad)


def test_event_ids_sort_by_creation_and_stay_unique() -> None:
    """Time-ordered ids keep the server's per-stream id index appending, not scattering."""
    from fleet_wire.envelope import is_event_id, new_event_ids

    early, late = new_event_ids(300, now_s=1_800_000_000.0), new_event_ids(300, now_s=1_800_000_000.5)
    assert all(is_event_id(i) for i in early + late)
    assert early == sorted(early) and max(early) < min(late)
    assert len(set(early + late)) == 600
