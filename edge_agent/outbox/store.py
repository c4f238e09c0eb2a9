"""SQLite (WAL) outbox. Rows leave only when the server's receipt says they are stored.

Each row holds the complete envelope JSON, built once at enqueue time, so draining is string
concatenation. `seq` is assigned here, per epoch, strictly increasing and never reused
(AUTOINCREMENT keeps its high-water mark even when every row has been deleted).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet_wire.envelope import SCHEMA_VERSION, format_ts, new_epoch, new_event_id
from fleet_wire.errors import EnvelopeInvalid
from fleet_wire.events import TOMBSTONE, EventClass, spec_for, validate_body_json
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
-- Idempotency keys the kiosk app sent with its events, kept a day after the event itself.
CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, type TEXT NOT NULL,
                                 created REAL NOT NULL);
-- No secondary index: it would cost every durable insert a second B-tree write, and the
-- queries that would use it (eviction, TTL) run only when the outbox is full or once a minute.
DROP INDEX IF EXISTS outbox_class;
"""


KEY_TTL_S = 24 * 3600.0  # a kiosk retries within seconds; a day is generous
_TOMBSTONE_SIZE_ESTIMATE = 300  # bytes of a tombstone envelope, for eviction arithmetic


class OutboxError(Exception):
    """Root of outbox errors."""


class InvalidEvent(OutboxError):
    """The caller's event is malformed: fix the input; nothing was stored."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class OutboxStorageError(OutboxError):
    """The disk refused the write (full, read-only, I/O error): nothing was stored; retry later."""


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


@dataclass(frozen=True, slots=True)
class OutboxItem:
    seq: int
    type: str
    event_class: int
    env: str  # complete envelope JSON
    size: int
    replayed: bool = False  # the caller's idempotency key was seen before: nothing new was stored


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
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
        self._db = sqlite3.connect(os.fspath(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self.epoch = self._load_epoch()
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
        return self.enqueue_many([(event_type, body, ts)], keys=[key])[0]

    def enqueue_many(
        self,
        events: Iterable[tuple[str, Any, datetime | None]],
        keys: Sequence[str | None] | None = None,
    ) -> list[OutboxItem]:
        """Validate and durably store several events in one transaction (all or none)."""
        batch_ts = format_ts(datetime.now(UTC))
        prepared = [self._prepare(t, b, ts, batch_ts) for t, b, ts in events]
        if not prepared:
            return []
        now = self._clock()
        keys = list(keys) if keys is not None else [None] * len(prepared)
        if len(keys) != len(prepared):
            raise ValueError("one idempotency key (or None) per event")
        with self._lock:
            seen = self._seen_keys([k for k in keys if k])
            if seen:
                replays = {k: OutboxItem(seq, typ, 0, "", 0, replayed=True) for k, (seq, typ) in seen.items()}
                fresh = [(p, k) for p, k in zip(prepared, keys) if not (k and k in replays)]
                stored = self._store(now, [p for p, _ in fresh], [k for _, k in fresh]) if fresh else []
                it = iter(stored)
                return [replays[k] if k and k in replays else next(it) for k in keys]
            return self._store(now, prepared, keys)

    def _seen_keys(self, keys: list[str]) -> dict[str, tuple[int, str]]:
        if not keys:
            return {}
        return {
            k: (seq, typ)
            for k, seq, typ in self._db.execute(
                f"SELECT key, seq, type FROM keys WHERE key IN ({','.join('?' * len(keys))})", keys
            )
        }

    def _store(
        self, now: float, prepared: list[tuple[str, int, str, str, float | None]], keys: list[str | None]
    ) -> list[OutboxItem]:
        """Insert prepared events (caller holds the lock)."""
        self._make_room(prepared)
        items: list[OutboxItem] = []
        rows = []
        seq = self._next_seq
        prefix = f'{{"v":{SCHEMA_VERSION},"terminal":"{self.terminal_id}","epoch":"{self.epoch}","seq":'
        for event_type, cls, head, body_json, expires_in in prepared:
            env = f'{prefix}{seq},{head},"body":{body_json}}}'
            size = len(env)
            rows.append((seq, event_type, cls, now, None if expires_in is None else now + expires_in, env, size))
            items.append(OutboxItem(seq, event_type, cls, env, size))
            seq += 1
        try:
            with transaction(self._db):
                self._db.executemany(
                    "INSERT INTO outbox (seq, type, class, created, expires, env, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                key_rows = [(k, r[0], r[1], now) for k, r in zip(keys, rows) if k]
                if key_rows:
                    # the same key twice in one call: the first wins, like two retries would
                    self._db.executemany(
                        "INSERT OR IGNORE INTO keys (key, seq, type, created) VALUES (?, ?, ?, ?)", key_rows
                    )
        except sqlite3.DatabaseError as err:
            self.counters.refused += len(rows)
            raise OutboxStorageError(f"the terminal's disk refused the event ({err}); nothing was stored") from err
        self._next_seq = seq
        self._rows += len(items)
        self._live += len(items)
        self._bytes += sum(i.size for i in items)
        self.counters.enqueued += len(items)
        return items

    def _prepare(
        self, event_type: str, body: Any, ts: datetime | None, default_ts: str
    ) -> tuple[str, int, str, str, float | None]:
        try:
            spec = spec_for(event_type)
            if event_type == TOMBSTONE:
                raise EnvelopeInvalid("tombstones are made by the outbox itself", reason="reserved")
            body_json = validate_body_json(event_type, body)
        except EnvelopeInvalid as err:
            raise InvalidEvent(str(err), err.reason) from err
        if ts is None:
            stamp = default_ts
        elif ts.tzinfo is None:
            raise InvalidEvent("event time must carry a time zone", "schema")
        else:
            stamp = format_ts(ts)
        # os.urandom: a random 128-bit id like uuid4, at a fifth of the cost on the hot path
        head = f'"id":"{os.urandom(16).hex()}","ts":"{stamp}","type":"{event_type}"'
        return event_type, int(spec.event_class), head, body_json, self.limits.ttl_s.get(spec.event_class)

    def _make_room(self, prepared: Sequence[tuple[str, int, str, str, float | None]]) -> None:
        """Evict lower-class rows (to tombstones) until `prepared` fits, or refuse it."""
        need_rows = len(prepared)
        need_bytes = sum(len(p[3]) + len(p[2]) + 160 for p in prepared)
        top_class = max(p[1] for p in prepared)
        if self._fits(need_rows, need_bytes):
            return
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
            self.counters.refused += len(prepared)
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

    def _load_epoch(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return str(row[0])
        epoch = new_epoch()
        self._db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch


def _take_bytes(cur: sqlite3.Cursor, max_bytes: int) -> list[OutboxItem]:
    items: list[OutboxItem] = []
    total = 0
    for seq, event_type, cls, env, size in cur:
        if items and total + size > max_bytes:
            break
        items.append(OutboxItem(seq, event_type, cls, env, size))
        total += size
    return items
