"""The event envelope and the batch message that carries envelopes on an events topic.

Decoding is strict and bounded: the payload is measured before it is parsed (`fleet_wire.codec`),
types are never coerced (no bool or string as a number, no number as a timestamp), epochs and
ids match their pattern exactly (a trailing newline is not the same epoch), and every failure is
a `WireError` with a stable reason, for that one message or that one event only.

Timestamps are checked against the receiver's clock (`fleet_wire.limits`):

- more than 1 day in the future: refused as `ts_future` (a clock gone wrong); the event's seq
  is still salvaged, so the server quarantines and receipts it instead of having it re-sent;
- more than 400 days in the past: refused as `ts_too_old` (a clock reset), quarantined the same way;
- between 30 and 400 days old: an offline terminal's backlog. It is *stored* with the time it
  happened (the citizen's transaction really took place then) and the server notes the receive
  time (`received_at`, on every row) and counts it as late (`is_late`), so no business event of a
  terminal that was offline for weeks is thrown away.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypeGuard

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet_wire import limits
from fleet_wire.codec import dumps_checked, loads_bounded
from fleet_wire.errors import EnvelopeInvalid, TimestampOutOfWindow, WireError
from fleet_wire.events import describe, validate_body
from fleet_wire.topics import TERMINAL_ID_PATTERN

SCHEMA_VERSION: Final = 1
# Patterns for pydantic (its Rust regex engine: `$` is the end of the text, never before a
# trailing newline). Python's `re` with `$` would accept "…\n": use the compiled ones with fullmatch.
EPOCH_PATTERN = r"^[0-9a-f]{32}$"
EVENT_ID_PATTERN = r"^[0-9a-f]{32}$"
_EPOCH_RE = re.compile(r"[0-9a-f]{32}")
_EVENT_ID_RE = _EPOCH_RE
# UTC only, ISO 8601 with an optional fraction of up to 6 digits: what format_ts and
# datetime.isoformat() produce. No offsets other than zero, no bare dates, no numbers.
_TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|\+00:00)")


def new_epoch() -> str:
    """A fresh outbox epoch: random, so a reinstalled terminal's seq 1 is a new stream."""
    return uuid.uuid4().hex


_COUNTERS: Final = tuple(f"{i:04x}" for i in range(0x10000))  # formatted once, not per id
_POOL_IDS: Final = 512  # random parts drawn per system call


class _RandomParts:
    """The 64 random bits of event ids as 16 hex digits, drawn from os.urandom 512 ids at a time:
    one system call per ~500 ids instead of one per call (a system call costs microseconds here,
    and a single enqueue makes one id).

    Ids need uniqueness, not secrecy, but the bits are the operating system's CSPRNG output all the
    same, each handed out once: the parts wait in a list iterator, whose every step is atomic, so
    threads never share one without a lock; two threads refilling at once each draw fresh bytes. A
    forked child starts empty (`register_at_fork`), so it never hands out what its parent does.
    """

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: Iterator[str] = iter(())

    def take(self, n: int) -> list[str]:
        """`n` fresh random parts of 16 hex digits."""
        got = list(itertools.islice(self.parts, n))
        if len(got) < n:
            more = n - len(got)
            if more > _POOL_IDS // 2:
                got += _hex_parts(more)
            else:
                fresh = iter(_hex_parts(_POOL_IDS))
                got += itertools.islice(fresh, more)
                self.parts = fresh
        return got

    def reset(self) -> None:
        self.parts = iter(())


def _hex_parts(n: int) -> list[str]:
    # bytes.hex with a separator every 8 bytes, then split: the n parts made in C
    return os.urandom(8 * n).hex(" ", 8).split(" ")


_RANDOM: Final = _RandomParts()
os.register_at_fork(after_in_child=_RANDOM.reset)


def event_id_parts(n: int, now_s: float | None = None) -> tuple[str, Iterable[str], list[str]]:
    """The parts of `n` event ids, for callers that write ids straight into a larger string:
    the id at position i is `prefix + counters[i] + randoms[i]` (see `new_event_ids`).

    `counters` is an iterable of the 4-digit counters (it repeats after 65,536 ids, like the
    counter itself); `randoms` holds n strings of 16 hex digits.
    """
    prefix = f"{int((time.time() if now_s is None else now_s) * 1000) & 0xFFFF_FFFF_FFFF:012x}"
    randoms = _RANDOM.take(n) if n else []
    return prefix, _COUNTERS if n <= len(_COUNTERS) else itertools.cycle(_COUNTERS), randoms


def new_event_ids(n: int, now_s: float | None = None) -> list[str]:
    """`n` globally unique event ids that sort by creation time (32 hex digits, like UUIDv7):
    48 bits of Unix milliseconds, 16 bits counting within the call, 64 random bits.

    Time order matters to the receiver: it keeps event ids unique per stream with an index, and
    ids that follow each other land at the end of the stream's part of it instead of at random
    pages (random ids cost that index ~10 µs a row, growing with the table).
    """
    prefix, counters, randoms = event_id_parts(n, now_s)
    return [f"{prefix}{c}{r}" for c, r in zip(counters, randoms)]


def new_event_id(now_s: float | None = None) -> str:
    """A globally unique, time-ordered event id (the first of `new_event_ids`)."""
    prefix = f"{int((time.time() if now_s is None else now_s) * 1000) & 0xFFFF_FFFF_FFFF:012x}"
    return f"{prefix}{_COUNTERS[0]}{_RANDOM.take(1)[0]}"


def is_epoch(value: object) -> TypeGuard[str]:
    """Tell whether `value` is exactly an epoch (32 lowercase hex digits, nothing after)."""
    return isinstance(value, str) and _EPOCH_RE.fullmatch(value) is not None


def is_event_id(value: object) -> TypeGuard[str]:
    """Tell whether `value` is exactly an event id."""
    return isinstance(value, str) and _EVENT_ID_RE.fullmatch(value) is not None


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds and a Z suffix (what `format_ts` gives)."""
    ms = time.time_ns() // 1_000_000
    second, milli = divmod(ms, 1000)
    global _SECOND
    cached = _SECOND
    if cached[0] != second:  # the date and time of day, formatted once a second
        cached = _SECOND = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{cached[1]}{milli:03d}Z"


_SECOND: tuple[int, str] = (-1, "")  # (Unix second, its "YYYY-MM-DDTHH:MM:SS.") for utc_now_iso


def format_ts(moment: datetime) -> str:
    """Format an aware datetime as UTC ISO 8601 with a Z suffix."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(value: object) -> datetime:
    """Parse a wire timestamp (a UTC ISO 8601 string), raising ValueError with what is wrong."""
    if not isinstance(value, str):
        raise ValueError(
            f"timestamp must be a UTC ISO 8601 string like 2026-11-27T02:00:00.000Z, not {type(value).__name__}"
        )
    if _TS_RE.fullmatch(value) is None:
        raise ValueError("timestamp must be UTC ISO 8601 like 2026-11-27T02:00:00.000Z (suffix Z or +00:00)")
    return datetime.fromisoformat(value)


def _optional_ts(value: str | None) -> str | None:
    if value is not None:
        parse_ts(value)
    return value


# An optional wire timestamp kept as the string it came as (status documents, command acks).
OptionalWireTs = Annotated[str | None, AfterValidator(_optional_ts)]


def check_ts_window(ts: datetime, now: datetime) -> None:
    """Raise TimestampOutOfWindow if `ts` is implausible against the receiver's clock `now`."""
    if ts > now + timedelta(seconds=limits.TS_MAX_FUTURE_S):
        raise TimestampOutOfWindow(
            f"timestamp {format_ts(ts)} is more than {limits.TS_MAX_FUTURE_S // 3600} h ahead of the receiver's clock"
            f" ({format_ts(now)}); fix the terminal's clock (NTP)",
            reason="ts_future",
        )
    if ts < now - timedelta(seconds=limits.TS_MAX_PAST_S):
        raise TimestampOutOfWindow(
            f"timestamp {format_ts(ts)} is more than {limits.TS_MAX_PAST_S // 86400} days before the receiver's clock"
            f" ({format_ts(now)}); fix the terminal's clock (NTP)",
            reason="ts_too_old",
        )


def is_late(ts: datetime, now: datetime) -> bool:
    """Tell whether an accepted event is an old backlog event (stored, but worth counting)."""
    return ts < now - timedelta(seconds=limits.TS_LATE_AFTER_S)


class Envelope(BaseModel):
    """One event as it crosses the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = SCHEMA_VERSION
    terminal: str = Field(pattern=TERMINAL_ID_PATTERN)
    epoch: str = Field(pattern=EPOCH_PATTERN)
    seq: int = Field(ge=1, le=limits.MAX_SEQ)
    id: str = Field(pattern=EVENT_ID_PATTERN)
    ts: AwareDatetime
    type: str = Field(min_length=1, max_length=64)
    body: dict[str, Any]

    @field_validator("v", mode="before")
    @classmethod
    def _no_bool_version(cls, value: Any) -> Any:
        if isinstance(value, bool):  # Literal[1] would take True (True == 1 in Python)
            raise ValueError("schema version must be the number 1, not a boolean")
        return value

    @field_validator("ts", mode="before")
    @classmethod
    def _wire_ts(cls, value: Any) -> datetime:
        return parse_ts(value)


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
    message_refused: bool = False  # the whole message was refused (its one rejection says why)

    def refuse(self, reason: str, detail: str) -> "DecodedBatch":
        """Record a whole-message refusal."""
        self.rejected.append(Rejected(reason, detail))
        self.message_refused = True
        return self


def encode_batch(envelopes: list[dict[str, Any]]) -> bytes:
    """Serialise envelopes (already-built dicts) into one events message."""
    return dumps_checked({"v": SCHEMA_VERSION, "events": envelopes}, what="batch").encode()


def decode_batch(topic_terminal: str, payload: bytes, *, now: datetime | None = None) -> DecodedBatch:
    """Decode and validate an events message published on `topic_terminal`'s events topic.

    Whole-message faults (too large, too deep, not JSON, wrong shape) yield one rejection.
    Per-event faults reject only that event; when its terminal, epoch and seq were readable they
    are kept so the server can still receipt the seq and the terminal does not re-send a poisoned
    row forever. Never raises: every failure is in `rejected`.
    """
    out = DecodedBatch()
    now = now or datetime.now(UTC)
    try:
        doc = loads_bounded(payload, max_bytes=limits.MAX_MESSAGE_BYTES)
    except WireError as err:
        return out.refuse(err.reason, str(err))
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        return out.refuse("schema", "message must be an object with an 'events' list")
    version = doc.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        return out.refuse("schema_version", f"schema version {version!r} is not supported (want {SCHEMA_VERSION})")
    events = doc["events"]
    if len(events) > limits.MAX_BATCH_EVENTS:
        return out.refuse("oversized", f"{len(events)} events in one message; the limit is {limits.MAX_BATCH_EVENTS}")
    for index, raw in enumerate(events):
        try:
            out.events.append(decode_envelope(topic_terminal, raw, where=f"events[{index}]", now=now))
        except WireError as err:
            out.rejected.append(Rejected(err.reason, str(err), *_salvage_keys(topic_terminal, raw)))
        except Exception as err:  # a validator bug must cost one event, never the batch
            out.rejected.append(
                Rejected("undecodable", f"events[{index}]: {type(err).__name__}", *_salvage_keys(topic_terminal, raw))
            )
    return out


def decode_envelope(topic_terminal: str, raw: Any, *, where: str = "event", now: datetime | None = None) -> Envelope:
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
    try:
        check_ts_window(env.ts, now or datetime.now(UTC))
        body_size = len(dumps_checked(env.body, what="body").encode())
    except WireError as err:
        raise type(err)(str(err), reason=err.reason, where=where) from err
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
    if not is_epoch(epoch):
        return (None, None, None)
    if not (isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= limits.MAX_SEQ):
        return (None, None, None)
    return (epoch, seq, event_id if is_event_id(event_id) else None)
