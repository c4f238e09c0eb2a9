"""The outbox's fast body path (the model's fields as a typed dict, no model instance per body)
accepts exactly what fleet_wire's model accepts and writes the same canonical JSON, for every
event type: valid bodies, each field replaced by hostile values or left out, an extra key, model
instances, and arbitrary generated bodies."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edge_agent.outbox.store import InvalidEvent, _codec
from fleet_wire.errors import EnvelopeInvalid
from fleet_wire.events import EVENT_SPECS, TOMBSTONE, validate_body_json

VALID: dict[str, dict[str, Any]] = {
    "service.started": {"session": "s-1", "service_code": "TQ02"},
    "service.completed": {"session": "s-1", "service_code": "TQ02", "duration_s": 12.5, "face_login": True},
    "service.abandoned": {"session": "s.1:a_b", "service_code": "DK01", "duration_s": 0, "step": "upload"},
    "peripheral.fault": {"peripheral": "printer", "code": "paper_out", "message": "打印机缺纸"},
    "peripheral.recovered": {"peripheral": "id_reader"},
    "face.decision": {
        "mode": "verify",
        "decision": "match",
        "score": 7.5,
        "latency_ms": 310.0,
        "model_version": "arc-3",
    },
    "agent.lifecycle": {"phase": "started", "version": "3.4.1"},
    "update.status": {
        "rollout": "r-1",
        "cmd": "0" * 32,
        "kind": "agent",
        "target": "agent/7/kiosk_agent-3.5.0-py3-none-any.whl",
        "version": "3.5.0",
        "counter": 7,
        "state": "downloading",
        "report": 2,
    },
    "telemetry.sample": {"cpu_pct": 3.5, "mem_pct": 41, "disk_pct": 37.2, "outbox_depth": 0},
}
HOSTILE: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    2**60,
    math.nan,
    math.inf,
    "",
    "1",
    "ok",
    "x" * 600,
    "A\n",
    [],
    {},
    b"ok",
]
TYPES = sorted(t for t in EVENT_SPECS if t != TOMBSTONE)


def _model_way(event_type: str, bodies: list[Any]) -> list[str] | None:
    codec = _codec(event_type)
    try:
        models = codec.many.validate_python(bodies)
    except ValueError:
        return None
    return [codec.to_json(m).decode() for m in models]


def _fast_way(event_type: str, bodies: list[Any]) -> list[str] | None:
    codec = _codec(event_type)
    assert codec.fields is not None and codec.fields_to_json is not None, f"{event_type} has no fast path"
    try:
        dicts = codec.fields.validate_python(bodies)
    except ValueError:
        return None
    return [codec.fields_to_json(d).decode() for d in dicts]


def _variants(event_type: str) -> list[dict[str, Any]]:
    good = VALID[event_type]
    fields = list(EVENT_SPECS[event_type].body.model_fields)
    out = [good, {**good, "unexpected": 1}]
    for name in fields:
        out.append({k: v for k, v in good.items() if k != name})
        out += [{**good, name: value} for value in HOSTILE]
    return out


def test_every_event_type_has_a_valid_example_and_a_fast_path() -> None:
    assert sorted(VALID) == TYPES
    for event_type in TYPES:
        assert _codec(event_type).fields is not None, event_type
        assert _codec(event_type).first_key is not None, event_type  # a batch's bodies dumped in one call
        validate_body_json(event_type, VALID[event_type])


@pytest.mark.parametrize("event_type", TYPES)
def test_fast_path_accepts_and_writes_exactly_what_the_model_does(event_type: str) -> None:
    accepted = 0
    for body in _variants(event_type):
        model, fast = _model_way(event_type, [body]), _fast_way(event_type, [body])
        assert fast == model, (event_type, body)
        accepted += model is not None
    assert accepted >= 2  # the valid body and at least one harmless variant went through


@pytest.mark.parametrize("event_type", TYPES)
def test_encode_gives_the_models_json_and_the_models_error(event_type: str) -> None:
    codec = _codec(event_type)
    good = VALID[event_type]
    instance = EVENT_SPECS[event_type].body.model_validate(good)
    # a model instance is not a plain dict: the model's own path takes the batch
    assert codec.encode(event_type, [good, instance]) == _model_way(event_type, [good, good])
    for body in _variants(event_type):
        if _model_way(event_type, [body]) is not None:
            continue
        with pytest.raises(EnvelopeInvalid) as got:
            codec.encode(event_type, [good, body])
        with pytest.raises(EnvelopeInvalid) as single:
            validate_body_json(event_type, body)
        assert (got.value.reason, str(got.value)) == (single.value.reason, str(single.value))


def test_outbox_refuses_what_the_model_refuses(tmp_path: Any) -> None:
    from edge_agent.outbox import Outbox

    box = Outbox(tmp_path / "o.db", "t-1")
    with pytest.raises(InvalidEvent):
        box.enqueue_many(
            [("service.completed", VALID["service.completed"], None)] * 3
            + [("service.completed", {"session": "s-1", "service_code": "TQ02", "duration_s": "12"}, None)]
        )
    assert box.depth == 0
    box.close()


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=80)
    | st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TYPES), st.data())
def test_fast_path_agrees_with_the_model_on_generated_bodies(event_type: str, data: st.DataObject) -> None:
    good = VALID[event_type]
    model_cls: type[BaseModel] = EVENT_SPECS[event_type].body
    names = [*model_cls.model_fields, "extra"]
    body = dict(good)
    for name in data.draw(st.lists(st.sampled_from(names), max_size=3)):
        if data.draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = data.draw(_values)
    assert _fast_way(event_type, [body]) == _model_way(event_type, [body])


# Strings that look like the seam between two bodies in the batch's JSON, or like JSON itself.
SEAMS = ['},{"session":', '"},{"session":"', "}\x00{", "\x00", '\\",{', "]}[{", '{"v":1}', "𝄞\u2028"]


def _string_fields(event_type: str) -> list[str]:
    good = VALID[event_type]
    return [name for name, value in good.items() if isinstance(value, str)]


@pytest.mark.parametrize("event_type", TYPES)
def test_a_batch_is_dumped_exactly_as_its_bodies_one_at_a_time(event_type: str) -> None:
    """The outbox dumps a batch's bodies in one serializer call and cuts the result at the seams
    between bodies; every body must come out as the model writes it alone, also when its strings
    hold what the seam looks like."""
    codec = _codec(event_type)
    good = VALID[event_type]
    bodies = [good] + [b for b in _variants(event_type) if _fast_way(event_type, [b]) is not None]
    for name in _string_fields(event_type):
        bodies += [{**good, name: seam} for seam in SEAMS]
    batch = [b for b in bodies if _fast_way(event_type, [b]) is not None]
    assert len(batch) >= 2
    assert codec.fields is not None
    dicts = codec.fields.validate_python(batch)
    assert codec.dump_fields(dicts) == _fast_way(event_type, batch)
    assert codec.encode(event_type, batch) == _model_way(event_type, batch)


def test_a_seam_inside_a_body_falls_back_to_one_body_at_a_time() -> None:
    """A body with a nested list of objects can hold the seam itself; the cut then gives more parts
    than bodies and the bodies are dumped one at a time (no event type has such a body today)."""
    from edge_agent.outbox.store import _BodyCodec
    from fleet_wire.events import EventClass, EventSpec, _Body

    class Nested(_Body):
        key: str
        items: list[dict[str, Any]]

    codec = _BodyCodec(EventSpec("test.nested", EventClass.TELEMETRY, Nested))
    assert codec.first_key == '"key":' and codec.fields is not None
    batch = [{"key": "a", "items": [{"x": 1}, {"key": 2}]}, {"key": "b", "items": []}]
    dicts = codec.fields.validate_python(batch)
    assert codec.fields_list_to_json is not None and '},{"key":2' in codec.fields_list_to_json(dicts).decode()
    assert codec.dump_fields(dicts) == ['{"key":"a","items":[{"x":1},{"key":2}]}', '{"key":"b","items":[]}']


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TYPES), st.data())
def test_batches_of_generated_bodies_dump_as_one_at_a_time(event_type: str, data: st.DataObject) -> None:
    good = VALID[event_type]
    strings = _string_fields(event_type)
    batch = []
    for _ in range(data.draw(st.integers(min_value=2, max_value=6))):
        body = dict(good)
        for name in data.draw(st.lists(st.sampled_from(strings), max_size=2)) if strings else []:
            body[name] = data.draw(st.text(alphabet=st.sampled_from('{}[],:"\\\x00 sessionk€'), max_size=30) | _values)
        batch.append(body)
    model = _model_way(event_type, batch)
    if model is None:
        with pytest.raises(EnvelopeInvalid):
            _codec(event_type).encode(event_type, batch)
    else:
        assert _codec(event_type).encode(event_type, batch) == model
