"""The event envelope and the batch message that carries envelopes on an events topic."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet_wire import limits
from fleet_wire.errors import EnvelopeInvalid
from fleet_wire.events import describe, validate_body
from fleet_wire.topics import TERMINAL_ID_PATTERN

SCHEMA_VERSION = 1
EPOCH_PATTERN = r"^[0-9a-f]{32}$"
_EPOCH_RE = re.compile(EPOCH_PATTERN)


def new_epoch() -> str:
    """A fresh outbox epoch: random, so a reinstalled terminal's seq 1 is a new stream."""
    return uuid.uuid4().hex


def new_event_id() -> str:
    """A globally unique event id."""
    return uuid.uuid4().hex


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds and a Z suffix."""
    return format_ts(datetime.now(UTC))


def format_ts(moment: datetime) -> str:
    """Format an aware datetime as UTC ISO 8601 with a Z suffix."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Envelope(BaseModel):
    """One event as it crosses the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = SCHEMA_VERSION
    terminal: str = Field(pattern=TERMINAL_ID_PATTERN)
    epoch: str = Field(pattern=EPOCH_PATTERN)
    seq: int = Field(ge=1, le=2**53, strict=True)
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    ts: AwareDatetime
    type: str = Field(min_length=1, max_length=64)
    body: dict[str, Any]

    @field_validator("ts")
    @classmethod
    def _utc_only(cls, value: datetime) -> datetime:
        if value.utcoffset() != datetime.now(UTC).utcoffset():
            raise ValueError("timestamp must be in UTC (suffix Z or +00:00)")
        return value


@dataclass(slots=True)
class Rejected:
    """An event (or a whole message) refused by validation, with the reason code and detail."""

    reason: str
    detail: str
    epoch: str | None = None
    seq: int | None = None
    event_id: str | None = None


@dataclass(slots=True)
class DecodedBatch:
    """What one events message held: the valid envelopes and the refused parts."""

    events: list[Envelope] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def encode_batch(envelopes: list[dict[str, Any]]) -> bytes:
    """Serialise envelopes (already-built dicts) into one events message."""
    return json.dumps({"v": SCHEMA_VERSION, "events": envelopes}, ensure_ascii=False, separators=(",", ":")).encode()


def decode_batch(topic_terminal: str, payload: bytes) -> DecodedBatch:
    """Decode and validate an events message published on `topic_terminal`'s events topic.

    Whole-message faults (too large, not JSON, wrong shape) yield one rejection. Per-event faults
    reject only that event; when its terminal, epoch and seq were readable they are kept so the
    server can still receipt the seq and the terminal does not re-send a poisoned row forever.
    """
    out = DecodedBatch()
    if len(payload) > limits.MAX_MESSAGE_BYTES:
        out.rejected.append(
            Rejected("oversized", f"message is {len(payload)} bytes; the limit is {limits.MAX_MESSAGE_BYTES}")
        )
        return out
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        out.rejected.append(Rejected("malformed_json", f"not JSON: {err}"))
        return out
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        out.rejected.append(Rejected("schema", "message must be an object with an 'events' list"))
        return out
    if doc.get("v") != SCHEMA_VERSION:
        out.rejected.append(
            Rejected("schema_version", f"schema version {doc.get('v')!r} is not supported (want {SCHEMA_VERSION})")
        )
        return out
    events = doc["events"]
    if len(events) > limits.MAX_BATCH_EVENTS:
        out.rejected.append(
            Rejected("oversized", f"{len(events)} events in one message; the limit is {limits.MAX_BATCH_EVENTS}")
        )
        return out
    for index, raw in enumerate(events):
        try:
            out.events.append(decode_envelope(topic_terminal, raw, where=f"events[{index}]"))
        except EnvelopeInvalid as err:
            keys = _salvage_keys(topic_terminal, raw)
            out.rejected.append(Rejected(err.reason, str(err), *keys))
    return out


def decode_envelope(topic_terminal: str, raw: Any, *, where: str = "event") -> Envelope:
    """Validate one envelope and its body; the envelope's terminal must be the topic's."""
    try:
        env = Envelope.model_validate(raw)
    except ValidationError as err:
        raise EnvelopeInvalid(describe(err), reason="schema", where=where) from err
    if env.terminal != topic_terminal:
        raise EnvelopeInvalid(
            f"envelope says terminal {env.terminal!r} but was published on {topic_terminal!r}'s topic",
            reason="terminal_mismatch",
            where=where,
        )
    body_size = len(json.dumps(env.body, ensure_ascii=False).encode())
    if body_size > limits.MAX_EVENT_BODY_BYTES:
        raise EnvelopeInvalid(
            f"body is {body_size} bytes; the limit is {limits.MAX_EVENT_BODY_BYTES}", reason="oversized", where=where
        )
    try:
        body = validate_body(env.type, env.body)
    except EnvelopeInvalid as err:
        raise EnvelopeInvalid(str(err), reason=err.reason, where=where) from err
    if body != env.body:
        env = env.model_copy(update={"body": body})
    return env


def _salvage_keys(topic_terminal: str, raw: Any) -> tuple[str | None, int | None, str | None]:
    """Pull epoch/seq/id out of a refused event when they are themselves well-formed."""
    if not isinstance(raw, dict) or raw.get("terminal") != topic_terminal:
        return (None, None, None)
    epoch, seq, event_id = raw.get("epoch"), raw.get("seq"), raw.get("id")
    if not (isinstance(epoch, str) and _EPOCH_RE.match(epoch)):
        return (None, None, None)
    if not (isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= 2**53):
        return (None, None, None)
    return (epoch, seq, event_id if isinstance(event_id, str) else None)
