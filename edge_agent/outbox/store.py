"""SQLite (WAL) outbox. Rows leave only when the server's receipt says they are stored.

Each row holds the complete envelope JSON, built once at enqueue time, so draining is string
concatenation. `seq` is assigned here, per epoch, strictly increasing and never reused
(AUTOINCREMENT keeps its high-water mark even when every row has been deleted).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple, cast

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import CoreSchema, SchemaSerializer, SchemaValidator

from fleet_wire.envelope import SCHEMA_VERSION, event_id_parts, format_ts, new_epoch, new_event_id, utc_now_iso
from fleet_wire.errors import EnvelopeInvalid
from fleet_wire.events import TOMBSTONE, EventClass, EventSpec, describe, spec_for, validate_body_json
from fleet_wire.receipt import Receipt
from fleet_wire.storage import transaction
from fleet_wire.topics import check_terminal_id

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    type    TEXT    NOT NULL,
    class   INTEGER NOT NULL,
    created REAL    NOT NULL,
    expires REAL,
    env     TEXT    NOT NULL,
    size    INTEGER NOT NULL
);
-- Idempotency keys the kiosk app sent with its events, kept a day after the event itself, with a
-- hash of the request (type, explicit time, canonical body); `hash` is NULL for keys stored before
-- it existed (added by migration in Outbox.__init__).
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL,
                                 created REAL NOT NULL, hash TEXT);
-- No secondary index: it would cost every durable insert a second B-tree write, and the
-- queries that would use it (eviction, TTL) run only when the outbox is full or once a minute.
DROP INDEX IF EXISTS outbox_class;
"""


# The pragmas of every outbox connection; bench/enqueue.py gives its raw-SQLite baseline the same.
PRAGMAS = ("journal_mode=WAL", "busy_timeout=5000")
KEY_TTL_S = 24 * 3600.0  # a kiosk retries within seconds; a day is generous
_TOMBSTONE_SIZE_ESTIMATE = 300  # bytes of a tombstone envelope, for eviction arithmetic
_ENVELOPE_OVERHEAD_BYTES = 200  # envelope fields around a body, for the room check before building
# The outbox holds citizens' transactions: owner only, also for the -wal and -shm sidecars.
FILE_MODE = 0o600


class OutboxError(Exception):
    """Root of outbox errors."""


class InvalidEvent(OutboxError):
    """The caller's event is malformed: fix the input; nothing was stored."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class OutboxStorageError(OutboxError):
    """The disk refused the write (full, read-only, I/O error): nothing was stored; retry later."""


class IdempotencyKeyReused(OutboxError):
    """The key was already used for a different request: nothing was stored; use a fresh key."""

    def __init__(self, key: str, seq: int, event_type: str):
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (stored as seq {seq}, "
            f"type {event_type}); nothing was stored: a retry must repeat the request unchanged, "
            f"a new event needs a new key"
        )
        self.key = key
        self.seq = seq
        self.event_type = event_type


class OutboxFull(OutboxError):
    """The outbox is at its bound and holds nothing this event may displace: refused, not stored."""

    def __init__(self, message: str, event_class: EventClass):
        super().__init__(message)
        self.event_class = event_class


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds and time-to-live per class; `None` TTL means keep until receipted."""

    max_rows: int = 200_000
    max_bytes: int = 256 * 1024 * 1024
    ttl_s: dict[EventClass, float | None] = field(
        default_factory=lambda: {
            EventClass.TELEMETRY: 24 * 3600.0,
            EventClass.OPERATIONAL: 14 * 24 * 3600.0,
            EventClass.BUSINESS: None,
        }
    )


class OutboxItem(NamedTuple):
    # A tuple, not a frozen dataclass: made once per enqueued event on the hot path (3× cheaper).
    seq: int
    type: str
    event_class: int
    env: str  # complete envelope JSON
    size: int
    replayed: bool = False  # the caller's idempotency key was seen before: nothing new was stored


# An OutboxItem from a tuple of all six fields, made in C (OutboxItem._make is a Python call each).
_new_item = cast("Callable[[Iterable[Any]], OutboxItem]", functools.partial(tuple.__new__, OutboxItem))
_first, _second, _third = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass(slots=True)
class _Batch:
    """Validated events, ready to be numbered and stored: one list per column, no object per event."""

    types: list[str]
    classes: list[int]
    stamps: list[str]  # event time, formatted
    bodies: list[str]  # canonical body JSON
    ttls: list[float | None]
    explicit_ts: list[bool]  # the caller gave the time (it is part of what an idempotency key stands for)

    def __len__(self) -> int:
        return len(self.bodies)

    def take(self, positions: list[int]) -> _Batch:
        return _Batch(*([column[i] for i in positions] for column in self._columns()))

    def _columns(self) -> tuple[list[Any], ...]:
        return (self.types, self.classes, self.stamps, self.bodies, self.ttls, self.explicit_ts)


class _BodyCodec:
    """Validation and serialisation of one event type's bodies, a batch per pydantic call.

    The schema is fleet_wire's model itself (its config, validators and strictness), validated as a
    list so pydantic-core loops in Rust, and dumped by the model's own serializer.

    Plain-dict bodies (what the kiosk's JSON gives) first take `fields`: the model's own field
    schemas and config as a typed dict, which pydantic-core validates and dumps without making a
    model instance per body (a third of the cost). Anything it refuses — a bad body, a model
    instance — goes the model's own way, which decides and words the error.
    """

    __slots__ = ("fields", "fields_list_to_json", "fields_to_json", "first_key", "many", "spec", "to_json")

    def __init__(self, spec: EventSpec) -> None:
        self.spec = spec
        model = cast("type[BaseModel]", spec.body)
        self.many: TypeAdapter[list[Any]] = TypeAdapter(list[model])  # type: ignore[valid-type]
        self.to_json = model.__pydantic_serializer__.to_json
        self.fields: SchemaValidator | None = None
        self.fields_to_json: Callable[[Any], bytes] | None = None
        self.fields_list_to_json: Callable[[Any], bytes] | None = None
        self.first_key: str | None = None
        schema = _fields_schema(model)
        if schema is not None:
            self.fields = SchemaValidator({"type": "list", "items_schema": schema})
            self.fields_to_json = SchemaSerializer(schema).to_json
            self.fields_list_to_json = SchemaSerializer({"type": "list", "items_schema": schema}).to_json
            self.first_key = _first_key(schema)

    def encode(self, event_type: str, bodies: list[Any]) -> list[str]:
        """Validate `bodies` and return their canonical JSON, or raise EnvelopeInvalid for the first bad one."""
        if self.fields is not None and self.fields_to_json is not None:
            try:
                dicts = self.fields.validate_python(bodies)
            except ValidationError:
                pass  # the model's own validation below accepts or refuses, as it always did
            else:
                return self.dump_fields(dicts)
        try:
            models = self.many.validate_python(bodies)
        except ValidationError as err:
            raise _first_bad_body(event_type, bodies, err) from err
        return list(map(bytes.decode, map(self.to_json, models)))

    def dump_fields(self, dicts: list[Any]) -> list[str]:
        """The canonical JSON of each validated typed-dict body, the whole batch in one serializer call.

        The list's JSON is `[` body `,` body … `]`: each body starts with its first field, `{"key":`,
        so `},{"key":` stands between two bodies. It cannot overlap itself or the brackets, so it
        occurs once between each two bodies and, if ever, inside a body (a nested object with
        that key): the split is right exactly when it gives one part per body; otherwise each
        body is dumped alone. JSON text never holds a raw NUL (it is escaped), so NUL marks the cuts.
        """
        n = len(dicts)
        if n == 1 or self.first_key is None or self.fields_list_to_json is None:
            assert self.fields_to_json is not None
            return list(map(bytes.decode, map(self.fields_to_json, dicts)))
        text = self.fields_list_to_json(dicts).decode()
        between = "},{" + self.first_key
        bodies = text[1:-1].replace(between, "}\0{" + self.first_key).split("\0")
        if len(bodies) == n:
            return bodies
        assert self.fields_to_json is not None
        return list(map(bytes.decode, map(self.fields_to_json, dicts)))


def _first_key(schema: CoreSchema) -> str | None:
    """`"key":` of the field every dumped body of this typed-dict schema starts with, or None if a
    body might start otherwise (the first field may be left out of the output)."""
    fields: dict[str, Any] = cast("dict[str, Any]", schema)["fields"]
    if not fields:
        return None
    name, field_schema = next(iter(fields.items()))
    if (
        field_schema.get("serialization_exclude")
        or "serialization_alias" in field_schema  # the key written depends on by_alias: take no chances
        or not (field_schema.get("required") or field_schema["schema"].get("type") == "default")
    ):
        return None
    return f'"{name}":' if name.isidentifier() else None


# What a model field may carry for its typed-dict twin to validate and dump exactly like it.
_PLAIN_FIELD_KEYS = {"type", "schema", "metadata", "validation_alias", "serialization_alias", "serialization_exclude"}


def _fields_schema(model: type[BaseModel]) -> CoreSchema | None:
    """The model's fields as a typed-dict core schema (the same field schemas: types, constraints,
    patterns, defaults, field validators and serializers), or None when the model has anything that
    acts on the whole model (model validators or serializer, computed fields, a custom __init__ or
    post-init, shared definitions), which only the model itself can apply."""
    outer: Any = model.__pydantic_core_schema__
    if (
        outer.get("type") != "model"
        or outer.get("custom_init")
        or outer.get("root_model")
        or outer.get("post_init")
        or "serialization" in outer
    ):
        return None
    inner = outer["schema"]
    if inner.get("type") != "model-fields" or inner.get("computed_fields") or "extras_schema" in inner:
        return None
    fields: dict[str, Any] = {}
    for name, spec in inner["fields"].items():
        if spec.get("type") != "model-field" or set(spec) - _PLAIN_FIELD_KEYS:
            return None
        twin = {k: v for k, v in spec.items() if k not in ("type", "metadata")}
        twin["type"] = "typed-dict-field"
        twin["required"] = spec["schema"].get("type") != "default"
        fields[name] = twin
    # the model's config (strict, extra="forbid", string options…) goes inside, as it does for the model
    config = outer.get("config") or {}
    schema = {"type": "typed-dict", "fields": fields, "config": config}
    if "strict" in config:
        schema["strict"] = config["strict"]
    if "extra_fields_behavior" in config:
        schema["extra_behavior"] = config["extra_fields_behavior"]
    return cast("CoreSchema", schema)


def _first_bad_body(event_type: str, bodies: list[Any], err: ValidationError) -> EnvelopeInvalid:
    """The same error validate_body_json gives for the first refused body of a batch."""
    first = err.errors()[0]
    index = first["loc"][0] if first["loc"] and isinstance(first["loc"][0], int) else 0
    try:
        validate_body_json(event_type, bodies[index])
    except EnvelopeInvalid as single:
        return single
    # Both paths use the same model: this only happens if fleet_wire adds checks outside it.
    return EnvelopeInvalid(f"body of {event_type}: {describe(err)}", reason="bad_body", where="body")


@functools.lru_cache(maxsize=64)
def _codec(event_type: str) -> _BodyCodec:
    # Only known types get here (spec_for raises otherwise, and lru_cache keeps no exceptions).
    return _BodyCodec(spec_for(event_type))


def request_hash(event_type: str, stamp: str | None, body_json: str) -> str:
    """What an idempotency key stands for: the type, the caller's own event time and the canonical body."""
    return hashlib.sha256(f"{event_type}\n{stamp or ''}\n{body_json}".encode()).hexdigest()[:32]


def _create_private(path: str) -> None:
    """Create the database file owner-only before SQLite opens it; tighten an older, looser one."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        _tighten(path)


def _tighten(path: str) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & ~FILE_MODE:
        os.chmod(path, FILE_MODE)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    live: int
    bytes: int
    oldest_age_s: float
    by_class: dict[str, int]
    next_seq: int
    epoch: str


@dataclass(slots=True)
class OutboxCounters:
    """Monotonic counters since the process started (exported as metrics)."""

    enqueued: int = 0
    confirmed: int = 0
    evicted: int = 0
    expired: int = 0
    refused: int = 0


class Outbox:
    """The terminal's durable event queue."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        terminal_id: str,
        limits: OutboxLimits | None = None,
        *,
        synchronous: str = "FULL",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.terminal_id = check_terminal_id(terminal_id)
        self.limits = limits or OutboxLimits()
        self.counters = OutboxCounters()
        self._clock = clock
        self._lock = threading.Lock()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = os.fspath(path)
        _create_private(self.path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
        # cached_statements: room for the multi-row INSERT of every batch size up to 128 beside the rest
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=256)
        for pragma in PRAGMAS:
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(SCHEMA)
        self._migrate()
        # SQLite gives its sidecars the database file's mode; an outbox made before 0600 may have
        # left looser ones behind.
        for sidecar in ("-wal", "-shm"):
            _tighten(self.path + sidecar)
        self.epoch = self._load_epoch()
        self._env_prefix = f'{{"v":{SCHEMA_VERSION},"terminal":"{self.terminal_id}","epoch":"{self.epoch}","seq":'
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
        self._next_seq = (row[0] if row else 0) + 1
        self._rows = 0
        self._live = 0
        self._bytes = 0
        for _cls, typ_is_tomb, n, size in self._db.execute(
            "SELECT class, type = ?, count(*), coalesce(sum(size), 0) FROM outbox GROUP BY 1, 2",
            (TOMBSTONE,),
        ):
            self._rows += n
            self._bytes += size
            if not typ_is_tomb:
                self._live += n

    # -- writing ---------------------------------------------------------------------------

    def enqueue(self, event_type: str, body: Any, *, ts: datetime | None = None, key: str | None = None) -> OutboxItem:
        """Validate and durably store one event; returns once it is committed.

        With `key`, a retry of the same request (the kiosk never saw the first answer) returns the
        first event's seq with `replayed=True` instead of storing the event a second time.
        """
        if key:
            return self.enqueue_many([(event_type, body, ts)], keys=[key])[0]
        batch = self._prepare([(event_type, body, ts)])
        now = self._clock()
        with self._lock:
            return self._store_one(now, batch)

    def _store_one(self, now: float, batch: _Batch) -> OutboxItem:
        """`_store` for one event without a key, in fewer steps (caller holds the lock): what a kiosk
        posts. A full outbox (eviction) or an open transaction (refusal) takes `_store` itself."""
        body = batch.bodies[0]
        db = self._db
        if db.in_transaction or not self._fits(1, len(body) + _ENVELOPE_OVERHEAD_BYTES):
            return self._store(now, batch, None)[0]
        seq = self._next_seq
        event_type, cls, ttl = batch.types[0], batch.classes[0], batch.ttls[0]
        # the envelope exactly as _store writes it
        env = (
            f'{self._env_prefix}{seq},"id":"{new_event_id(now)}","ts":"{batch.stamps[0]}",'
            f'"type":"{event_type}","body":{body}}}'
        )
        size = len(env)
        try:
            # one statement, its own transaction: on disk (synchronous=FULL) when execute returns
            db.execute(_insert_sql(1), (seq, event_type, cls, now, None if ttl is None else now + ttl, env, size))
        except sqlite3.DatabaseError as err:
            self.counters.refused += 1
            raise OutboxStorageError(f"the terminal's disk refused the event ({err}); nothing was stored") from err
        self._next_seq = seq + 1
        self._rows += 1
        self._live += 1
        self._bytes += size
        self.counters.enqueued += 1
        return _new_item((seq, event_type, cls, env, size, False))

    def enqueue_many(
        self,
        events: Iterable[tuple[str, Any, datetime | None]],
        keys: Sequence[str | None] | None = None,
    ) -> list[OutboxItem]:
        """Validate and durably store several events in one transaction (all or none).

        Raises InvalidEvent (nothing stored), IdempotencyKeyReused when a key already stands for a
        different request, OutboxFull or OutboxStorageError.
        """
        events = events if isinstance(events, list) else list(events)
        if not events:
            return []
        if keys is not None and len(keys) != len(events):
            raise ValueError("one idempotency key (or None) per event")
        batch = self._prepare(events)
        now = self._clock()
        if keys is None or not any(keys):
            with self._lock:
                return self._store(now, batch, None)
        hashes = [
            request_hash(t, st if explicit else None, body)
            for t, st, body, explicit in zip(batch.types, batch.stamps, batch.bodies, batch.explicit_ts)
        ]
        with self._lock:
            return self._store_keyed(now, batch, list(keys), hashes)

    def _store_keyed(self, now: float, batch: _Batch, keys: list[str | None], hashes: list[str]) -> list[OutboxItem]:
        """Store the events whose key is new; a repeated request answers its first event (caller holds the lock)."""
        wanted = list({k for k in keys if k})
        seen: dict[str, tuple[int, str, str | None]] = {
            k: (seq, typ, h)
            for k, seq, typ, h in self._db.execute(
                f"SELECT key, seq, type, hash FROM keys WHERE key IN ({','.join('?' * len(wanted))})", wanted
            )
        }
        fresh: list[int] = []  # positions to store
        first_in_call: dict[str, int] = {}  # key -> position of its first event in this call
        for i, (key, digest) in enumerate(zip(keys, hashes)):
            if not key:
                fresh.append(i)
            elif key in seen:
                seq, typ, stored_hash = seen[key]
                # a key stored before hashes existed cannot be checked: trust it, as before
                if stored_hash is not None and stored_hash != digest:
                    raise IdempotencyKeyReused(key, seq, typ)
            elif key in first_in_call:
                if hashes[first_in_call[key]] != digest:
                    raise IdempotencyKeyReused(key, self._next_seq + len(fresh), batch.types[first_in_call[key]])
            else:
                first_in_call[key] = i
                fresh.append(i)
        stored = self._store(now, batch.take(fresh), [(keys[i], hashes[i]) for i in fresh]) if fresh else []
        by_position = dict(zip(fresh, stored))
        out: list[OutboxItem] = []
        for i, key in enumerate(keys):
            if i in by_position:
                out.append(by_position[i])
            elif key in seen:
                seq, typ, _ = seen[key]
                out.append(OutboxItem(seq, typ, 0, "", 0, True))
            else:
                first = by_position[first_in_call[key]]  # type: ignore[index]
                out.append(OutboxItem(first.seq, first.type, first.event_class, "", 0, True))
        return out

    def _store(self, now: float, batch: _Batch, keyed: list[tuple[str | None, str]] | None) -> list[OutboxItem]:
        """Number and insert validated events in one transaction (caller holds the lock)."""
        n = len(batch)
        need_bytes = sum(map(len, batch.bodies)) + _ENVELOPE_OVERHEAD_BYTES * n
        if not self._fits(n, need_bytes):
            self._make_room(batch, need_bytes)
        seq0 = self._next_seq
        seqs = range(seq0, seq0 + n)
        prefix = self._env_prefix
        # time-ordered ids, so the server's id index stays cheap; written straight into the envelope
        id_prefix, counters, randoms = event_id_parts(n, now)
        types, stamps, bodies, classes = batch.types, batch.stamps, batch.bodies, batch.classes
        ttls = batch.ttls
        uniform = types.count(types[0]) == n
        if uniform and stamps.count(stamps[0]) == n:
            # the usual batch: one type at one time, so everything between id and body is shared
            mid = f'","ts":"{stamps[0]}","type":"{types[0]}","body":'
            id_head = f',"id":"{id_prefix}'
            envs = [
                f"{prefix}{seq}{id_head}{c}{r}{mid}{body}}}" for seq, c, r, body in zip(seqs, counters, randoms, bodies)
            ]
        else:
            envs = [
                f'{prefix}{seq},"id":"{id_prefix}{c}{r}","ts":"{stamp}","type":"{t}","body":{body}}}'
                for seq, c, r, stamp, t, body in zip(seqs, counters, randoms, stamps, types, bodies)
            ]
        sizes = list(map(len, envs))
        db = self._db
        params: Sequence[Any]
        if n == 1:
            ttl = ttls[0]
            params = (seq0, types[0], classes[0], now, None if ttl is None else now + ttl, envs[0], sizes[0])
        else:
            # the rows' columns one after another, each column set by one slice assignment (in C)
            flat: list[Any] = [None] * (_COLUMNS * n)
            flat[0::_COLUMNS] = seqs
            flat[1::_COLUMNS] = types
            flat[2::_COLUMNS] = classes
            flat[3::_COLUMNS] = [now] * n
            if uniform:  # one type: one class, one TTL
                if ttls[0] is not None:
                    flat[4::_COLUMNS] = [now + ttls[0]] * n
            else:
                flat[4::_COLUMNS] = [None if ttl is None else now + ttl for ttl in ttls]
            flat[5::_COLUMNS] = envs
            flat[6::_COLUMNS] = sizes
            params = flat
        try:
            if not keyed and n <= _ONE_STATEMENT_ROWS and not db.in_transaction:
                # one statement, which SQLite runs as its own transaction: all rows or none, on disk
                # (synchronous=FULL) when execute returns, without a BEGIN and a COMMIT round trip
                # (never inside an open transaction, whose COMMIT would come later: none is left
                # open here, and if one were, BEGIN below refuses the event as a storage error)
                db.execute(_insert_sql(n), params)
            else:
                with transaction(db):
                    _insert_chunks(db, n, params)
                    if keyed:
                        db.executemany(
                            "INSERT INTO keys (key, seq, type, created, hash) VALUES (?, ?, ?, ?, ?)",
                            [(k, seq, t, now, h) for (k, h), seq, t in zip(keyed, seqs, types) if k],
                        )
        except sqlite3.DatabaseError as err:
            self.counters.refused += n
            raise OutboxStorageError(f"the terminal's disk refused the event ({err}); nothing was stored") from err
        self._next_seq = seq0 + n
        self._rows += n
        self._live += n
        self._bytes += sum(sizes)
        self.counters.enqueued += n
        # tuple.__new__ over zip: the items are made in C, not one Python call per event
        return list(map(_new_item, zip(seqs, types, classes, envs, sizes, repeat(False))))

    def _prepare(self, events: list[tuple[str, Any, datetime | None]]) -> _Batch:
        """Validate every event (bodies of one type in one pydantic call); raise InvalidEvent for the first bad one."""
        n = len(events)
        if n == 1:  # what a kiosk posts: the same steps without a list per column
            event = events[0]
            event_type, ts = event[0], event[2]
            bodies, cls, ttl = self._encode(event_type, [event[1]])
            if ts is None:
                return _Batch([event_type], [cls], [utc_now_iso()], bodies, [ttl], [False])
            if not isinstance(ts, datetime) or ts.tzinfo is None:
                raise InvalidEvent("event time must carry a time zone", "schema")
            return _Batch([event_type], [cls], [format_ts(ts)], bodies, [ttl], [True])
        default_ts = utc_now_iso()
        types: list[str] = list(map(_first, events))
        first = types[0]
        if types.count(first) == n:  # the usual batch: one type
            groups: dict[str, list[int]] | None = None
            encoded = {first: self._encode(first, list(map(_second, events)))}
        else:
            groups = {}
            for i, event_type in enumerate(types):
                groups.setdefault(event_type, []).append(i)
            encoded = {t: self._encode(t, [events[i][1] for i in positions]) for t, positions in groups.items()}
        if groups is None:
            bodies, cls, ttl = encoded[first]
            classes, ttls = [cls] * n, [ttl] * n
        else:
            bodies, classes, ttls = [""] * n, [0] * n, [None] * n
            for t, positions in groups.items():
                group_bodies, cls, ttl = encoded[t]
                for i, body in zip(positions, group_bodies):
                    bodies[i], classes[i], ttls[i] = body, cls, ttl
        stamps = [default_ts] * n
        explicit = [False] * n
        times = list(map(_third, events))
        if times.count(None) != n:  # the caller gave some event times
            for i, ts in enumerate(times):
                if ts is not None:
                    if not isinstance(ts, datetime) or ts.tzinfo is None:
                        raise InvalidEvent("event time must carry a time zone", "schema")
                    stamps[i], explicit[i] = format_ts(ts), True
        return _Batch(types, classes, stamps, bodies, ttls, explicit)

    def _encode(self, event_type: Any, bodies: list[Any]) -> tuple[list[str], int, float | None]:
        """Canonical JSON of each body, the type's class and its TTL; raise InvalidEvent if one is refused."""
        try:
            if not isinstance(event_type, str):
                spec_for(event_type)  # raises unknown_type with the list of known ones
                what = type(event_type).__name__
                raise EnvelopeInvalid(f"event type must be a string, not {what}", reason="unknown_type")
            if event_type == TOMBSTONE:
                raise EnvelopeInvalid("tombstones are made by the outbox itself", reason="reserved")
            codec = _codec(event_type)
            encoded = codec.encode(event_type, bodies)
        except EnvelopeInvalid as err:
            raise InvalidEvent(str(err), err.reason) from err
        cls = codec.spec.event_class
        return encoded, int(cls), self.limits.ttl_s.get(cls)

    def _make_room(self, batch: _Batch, need_bytes: int) -> None:
        """Evict lower-class rows (to tombstones) until `batch` fits, or refuse it."""
        need_rows = len(batch)
        top_class = max(batch.classes)
        for victim_class in (EventClass.TELEMETRY, EventClass.OPERATIONAL):
            if victim_class > top_class:
                break
            while not self._fits(need_rows, need_bytes):
                candidates = self._db.execute(
                    "SELECT seq, size FROM outbox WHERE class = ? AND type != ? ORDER BY seq LIMIT 256",
                    (int(victim_class), TOMBSTONE),
                ).fetchall()
                if not candidates:
                    break
                # evict the oldest rows, just as many as the new events need
                seqs: list[int] = []
                freed = 0
                for seq, size in candidates:
                    seqs.append(seq)
                    freed += max(0, size - _TOMBSTONE_SIZE_ESTIMATE)
                    if (
                        self._live - len(seqs) + need_rows <= self.limits.max_rows
                        and self._bytes - freed + need_bytes <= self.limits.max_bytes
                    ):
                        break
                self._tombstone(seqs, "evicted")
                self.counters.evicted += len(seqs)
        if not self._fits(need_rows, need_bytes):
            self.counters.refused += len(batch)
            raise OutboxFull(
                f"outbox is full ({self._live} events, {self._bytes} bytes; limits "
                f"{self.limits.max_rows} events, {self.limits.max_bytes} bytes) and holds nothing "
                f"of lower priority to make room",
                EventClass(top_class),
            )

    def _fits(self, rows: int, size: int) -> bool:
        return self._live + rows <= self.limits.max_rows and self._bytes + size <= self.limits.max_bytes

    def _tombstone(self, seqs: list[int], reason: str) -> None:
        """Replace rows by small tombstones with the same seq (caller holds the lock)."""
        now_ts = format_ts(datetime.fromtimestamp(self._clock(), UTC))
        updates = []
        freed = 0
        for seq, event_type, cls, size in self._db.execute(
            f"SELECT seq, type, class, size FROM outbox WHERE seq IN ({','.join('?' * len(seqs))})",
            seqs,
        ).fetchall():
            body = json.dumps(
                {"reason": reason, "original_type": event_type, "original_class": cls}, separators=(",", ":")
            )
            env = (
                f'{{"v":{SCHEMA_VERSION},"terminal":"{self.terminal_id}","epoch":"{self.epoch}",'
                f'"seq":{seq},"id":"{new_event_id()}","ts":"{now_ts}","type":"{TOMBSTONE}",'
                f'"body":{body}}}'
            )
            updates.append((TOMBSTONE, int(EventClass.TELEMETRY), env, len(env), seq))
            freed += size - len(env)
        with transaction(self._db):
            self._db.executemany(
                "UPDATE outbox SET type = ?, class = ?, expires = NULL, env = ?, size = ? WHERE seq = ?", updates
            )
        self._live -= len(updates)
        self._bytes -= freed
        log.warning("outbox %s %d events (oldest seq %d)", reason, len(updates), min(seqs))

    def expire(self) -> int:
        """Turn rows past their class TTL into tombstones (and forget old keys); returns how many."""
        with self._lock:
            self._db.execute("DELETE FROM keys WHERE created < ?", (self._clock() - KEY_TTL_S,))
            seqs = [
                r[0]
                for r in self._db.execute(
                    "SELECT seq FROM outbox WHERE expires IS NOT NULL AND expires <= ? AND type != ?",
                    (self._clock(), TOMBSTONE),
                )
            ]
            for i in range(0, len(seqs), 500):
                self._tombstone(seqs[i : i + 500], "expired")
            self.counters.expired += len(seqs)
            return len(seqs)

    def confirm(self, receipt: Receipt) -> int:
        """Delete every row the receipt says the server has stored; returns rows deleted."""
        if receipt.epoch != self.epoch or receipt.terminal != self.terminal_id:
            return 0
        clauses = ["seq <= ?"] + ["seq BETWEEN ? AND ?"] * len(receipt.ranges)
        params: list[int] = [receipt.upto]
        for start, end in receipt.ranges:
            params += [start, end]
        where = " OR ".join(clauses)
        with self._lock:
            gone = self._db.execute(
                f"SELECT count(*), coalesce(sum(size), 0), coalesce(sum(type != ?), 0) FROM outbox WHERE {where}",
                [TOMBSTONE, *params],
            ).fetchone()
            if not gone[0]:
                return 0
            with transaction(self._db):
                self._db.execute(f"DELETE FROM outbox WHERE {where}", params)
            self._rows -= gone[0]
            self._bytes -= gone[1]
            self._live -= gone[2]
            self.counters.confirmed += gone[0]
            return int(gone[0])

    # -- reading ---------------------------------------------------------------------------

    def after(self, seq: int, limit: int, max_bytes: int) -> list[OutboxItem]:
        """Rows with seq greater than `seq`, in order, up to `limit` rows and about `max_bytes`."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, type, class, env, size FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            )
            return _take_bytes(cur, max_bytes)

    def get(self, seqs: Sequence[int], max_bytes: int) -> list[OutboxItem]:
        """The rows with these seqs that still exist, in seq order, up to about `max_bytes`."""
        if not seqs:
            return []
        with self._lock:
            cur = self._db.execute(
                f"SELECT seq, type, class, env, size FROM outbox WHERE seq IN "
                f"({','.join('?' * len(seqs))}) ORDER BY seq",
                list(seqs),
            )
            return _take_bytes(cur, max_bytes)

    def all_seqs(self) -> list[int]:
        """Every seq still held (for tests and diagnostics)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT seq FROM outbox ORDER BY seq")]

    def stats(self) -> OutboxStats:
        """Depth, bytes, oldest age and per-class counts."""
        with self._lock:
            oldest = self._db.execute("SELECT min(created) FROM outbox").fetchone()[0]
            by_class = {
                EventClass(c).name.lower(): n
                for c, n in self._db.execute(
                    "SELECT class, count(*) FROM outbox WHERE type != ? GROUP BY class", (TOMBSTONE,)
                )
            }
            tomb = self._rows - self._live
            if tomb:
                by_class["tombstone"] = tomb
            age = max(0.0, self._clock() - oldest) if oldest is not None else 0.0
            return OutboxStats(self._rows, self._live, self._bytes, age, by_class, self._next_seq, self.epoch)

    @property
    def depth(self) -> int:
        return self._rows

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        """Bring an outbox file made by an older agent up to this schema (idempotent)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(keys)")}
        if "hash" not in columns:
            self._db.execute("ALTER TABLE keys ADD COLUMN hash TEXT")

    def _load_epoch(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return str(row[0])
        epoch = new_epoch()
        self._db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch


# Rows go in as multi-row INSERTs: one statement step for many rows instead of a step, a reset and
# a round of binding per row (~1 µs a row less than executemany here). Up to 128 rows (896
# parameters, below the 999 of older SQLite builds) are one statement; more rows are statements of
# 128, 64 … 1 rows inside one transaction.
_COLUMNS = 7
_ONE_STATEMENT_ROWS = 128


@functools.lru_cache(maxsize=_ONE_STATEMENT_ROWS)
def _insert_sql(rows: int) -> str:
    return "INSERT INTO outbox (seq, type, class, created, expires, env, size) VALUES " + ",".join(
        ["(?, ?, ?, ?, ?, ?, ?)"] * rows
    )


def _insert_chunks(db: sqlite3.Connection, n: int, params: Sequence[Any]) -> None:
    """Insert `n` outbox rows (their columns one after another in `params`) inside the caller's transaction."""
    if n == 1:
        db.execute(_insert_sql(1), params)
        return
    at, size = 0, _ONE_STATEMENT_ROWS
    while at < n:
        while size > n - at:
            size //= 2
        db.execute(_insert_sql(size), params[at * _COLUMNS : (at + size) * _COLUMNS])
        at += size


def _take_bytes(cur: sqlite3.Cursor, max_bytes: int) -> list[OutboxItem]:
    items: list[OutboxItem] = []
    total = 0
    for seq, event_type, cls, env, size in cur:
        if items and total + size > max_bytes:
            break
        items.append(OutboxItem(seq, event_type, cls, env, size))
        total += size
    return items
