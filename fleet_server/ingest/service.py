"""The ingest writer: validates messages, stores each event once, publishes receipts.

Paho's thread only enqueues (`submit`). One writer thread takes messages in batches, validates
them, writes events + stream marks in one transaction, and only after COMMIT publishes receipts
and acknowledges the MQTT messages (manual ack): a crash before COMMIT leaves the messages
unacknowledged at the broker, which redelivers them to our persistent session.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet_server.db import connect
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.store import IngestStore, StreamRow
from fleet_wire import topics
from fleet_wire.envelope import decode_batch, format_ts
from fleet_wire.errors import TopicError
from fleet_wire.events import TOMBSTONE
from fleet_wire.receipt import Receipt, SeqSet
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

BATCH_MAX_MESSAGES = 500
BATCH_WAIT_S = 0.02  # group commit: wait this long for more messages once one has arrived
STATUS_BATCH_WAIT_S = 0.25  # …and this long while the batch holds only heartbeats (no receipt waits)
QUEUE_MAX = 20_000  # paho's thread blocks past this, which pushes back on the broker
STATUS_MAX_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0


@dataclass(slots=True)
class _Batch:
    events: list[tuple[str, str, int, str, str, str, str, str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str, int, str, str, int, str]] = field(default_factory=list)
    rejects: list[tuple[str, str | None, str, str, str, str | None, int | None, int]] = field(default_factory=list)
    status: dict[str, tuple[str, str, str, str, str, str]] = field(default_factory=dict)
    streams: dict[tuple[str, str], StreamRow] = field(default_factory=dict)
    ingested_types: dict[str, int] = field(default_factory=dict)
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    status_states: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    acks: list[tuple[int, int]] = field(default_factory=list)


class IngestService:
    def __init__(
        self,
        db_path: str,
        metrics: IngestMetrics,
        terminal_offices: Callable[[], dict[str, str]],
        *,
        publish: Callable[[str, bytes], None] = lambda t, p: None,
        ack: Callable[[int, int], None] = lambda mid, qos: None,
    ) -> None:
        self._db_path = db_path
        self.metrics = metrics
        self._terminal_offices_source = terminal_offices
        self._offices: dict[str, str] = {}
        self.publish = publish
        self.ack = ack
        # paho's thread appends, the writer takes whole batches: no hand-off per message (a
        # Queue.get per heartbeat cost more CPU than storing it, measured at 10k terminals)
        self._pending: deque[Inbound] = deque()
        self._arrived = threading.Event()  # anything arrived
        self._events_arrived = threading.Event()  # flush soon: events arrived or a batch is full
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._streams: dict[tuple[str, str], StreamRow] = {}
        self._gaps: dict[tuple[str, str], int] = {}
        self._store: IngestStore | None = None
        self._conn: sqlite3.Connection | None = None
        self.batches = 0
        self.errors = 0
        self._refresh = threading.Event()
        self.idle = threading.Event()
        # Called after each COMMIT with the newly stored event rows (never duplicates):
        # (terminal, epoch, seq, id, type, ts, received_at, office_id, body_json).
        self.on_commit: list[Callable[[list[tuple[str, str, int, str, str, str, str, str, str]]], None]] = []
        # Called after each COMMIT with the status rows: (terminal, state, reason, at, at, doc_json).
        self.on_status: list[Callable[[list[tuple[str, str, str, str, str, str]]], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._conn = connect(self._db_path)
        self._store = IngestStore(self._conn)
        self._streams = self._store.load_streams()
        self._offices = dict(self._terminal_offices_source())
        self._update_gap_gauge()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._arrived.set()
        self._events_arrived.set()
        if self._thread:
            self._thread.join(10)
        if self._conn:
            self._conn.close()

    def submit(self, msg: Inbound) -> None:
        """Hand a message over from paho's thread (blocks when the writer is far behind)."""
        self.idle.clear()
        while len(self._pending) >= QUEUE_MAX and not self._stop.is_set():
            time.sleep(0.005)  # back-pressure: paho stops reading, the broker holds the rest
        self._pending.append(msg)
        if msg.topic.endswith("/events") or len(self._pending) >= BATCH_MAX_MESSAGES:
            self._events_arrived.set()  # flush soon: a receipt waits, or a batch is full
        self._arrived.set()

    @property
    def backlog(self) -> int:
        """Messages waiting for the writer."""
        return len(self._pending)

    def refresh_terminals(self) -> None:
        """Re-read the registry's enabled terminals (after enrol/revoke)."""
        self._refresh.set()

    def streams(self) -> dict[tuple[str, str], StreamRow]:
        return dict(self._streams)

    # -- writer ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._pending:
                self.idle.set()
                self._arrived.wait(0.5)
                self._arrived.clear()
                continue
            started = time.monotonic()
            # Events wait for their receipt: commit them quickly. Heartbeats wait for nobody, so a
            # batch of only heartbeats gathers longer and costs fewer commits.
            if not self._events_arrived.is_set():
                self._events_arrived.wait(STATUS_BATCH_WAIT_S)
            if self._stop.is_set():
                break
            remaining = started + BATCH_WAIT_S - time.monotonic()
            if remaining > 0 and len(self._pending) < BATCH_MAX_MESSAGES:
                time.sleep(remaining)
            self._events_arrived.clear()
            msgs = []
            while self._pending and len(msgs) < BATCH_MAX_MESSAGES:
                msgs.append(self._pending.popleft())
            if any(m.topic.endswith("/events") for m in self._pending):
                self._events_arrived.set()  # more events left behind this batch: no long wait
            self.metrics.queue_depth.set(len(self._pending))
            try:
                self._process(msgs)
            except Exception:
                self.errors += 1
                log.exception("ingest batch of %d messages failed; terminals will re-send", len(msgs))
                for m in msgs:
                    self._safe_ack(m.mid, m.qos)
            if not self._pending:
                self.idle.set()

    def _process(self, msgs: list[Inbound]) -> None:
        if self._refresh.is_set():
            self._refresh.clear()
            self._offices = dict(self._terminal_offices_source())
        started = time.perf_counter()
        now = format_ts(datetime.now(UTC))
        b = _Batch()
        for m in msgs:
            b.acks.append((m.mid, m.qos))
            try:
                ref = topics.parse(m.topic)
            except TopicError as err:
                self._reject(b, now, None, m, err.reason, str(err))
                continue
            if ref.terminal_id not in self._offices:
                self._reject(
                    b,
                    now,
                    ref.terminal_id,
                    m,
                    "unknown_terminal",
                    f"terminal {ref.terminal_id!r} is not enrolled (or was revoked)",
                )
                continue
            if ref.channel == Channel.EVENTS:
                self._take_events(b, now, ref.terminal_id, m)
            elif ref.channel == Channel.STATUS:
                self._take_status(b, now, ref.terminal_id, m)
        try:
            assert self._store is not None
            # one transaction (one fsync) for everything the batch holds, none when it holds nothing
            if b.events or b.dropped or b.rejects or b.streams or b.status:
                self._store.write(b.events, b.dropped, b.rejects, list(b.streams.values()), list(b.status.values()))
        except sqlite3.Error as err:
            # Disk full, I/O error…: nothing of this batch is stored, no receipt goes out, the
            # terminals keep their rows and re-send after their receipt time-out.
            self.metrics.write_errors.inc()
            self.errors += 1
            log.error("ingest write failed (%s); %d messages will be re-sent by terminals", err, len(msgs))
            for mid, qos in b.acks:
                self._safe_ack(mid, qos)
            return
        self._streams.update(b.streams)
        for hook in self.on_commit:
            if b.events:
                try:
                    hook(b.events)
                except Exception:
                    log.exception("on_commit listener failed")
        for status_hook in self.on_status:
            if b.status:
                try:
                    status_hook(list(b.status.values()))
                except Exception:
                    log.exception("on_status listener failed")
        for t, n in b.ingested_types.items():
            self.metrics.ingested.labels(t).inc(n)
        for r, n in b.dropped_reasons.items():
            self.metrics.dropped.labels(r).inc(n)
        for r, n in b.reject_reasons.items():
            self.metrics.rejected.labels(r).inc(n)
        for s, n in b.status_states.items():
            self.metrics.status_messages.labels(s).inc(n)
        if b.duplicates:
            self.metrics.duplicates.inc(b.duplicates)
        for (terminal, epoch), row in b.streams.items():
            receipt = Receipt.from_seqset(terminal, epoch, row.seqs)
            try:
                self.publish(topics.topic(terminal, Channel.RECEIPT), receipt.encode())
                self.metrics.receipts.inc()
            except Exception:
                log.exception("could not publish receipt to %s", terminal)
        for mid, qos in b.acks:
            self._safe_ack(mid, qos)
        self.batches += 1
        if b.streams:
            self._update_gap_gauge(b.streams)
        if self.batches % 1000 == 0:
            self._store.trim_rejects()
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _take_events(self, b: _Batch, now: str, terminal: str, m: Inbound) -> None:
        decoded = decode_batch(terminal, m.payload)
        office = self._offices[terminal]
        for rej in decoded.rejected:
            self._reject(b, now, terminal, m, rej.reason, rej.detail, rej.epoch, rej.seq)
            if rej.epoch is not None and rej.seq is not None:
                # Quarantined, not lost: the row is in `rejects`, and the receipt covers it so the
                # terminal stops re-sending a poisoned event.
                row = self._stream(b, terminal, rej.epoch, now)
                if row.seqs.add(rej.seq):
                    row.quarantined += 1
        for env in decoded.events:
            row = self._stream(b, terminal, env.epoch, now)
            if not row.seqs.add(env.seq):
                row.duplicates += 1
                b.duplicates += 1
                continue
            ts = format_ts(env.ts)
            if env.type == TOMBSTONE:
                body = env.body
                b.dropped.append(
                    (terminal, env.epoch, env.seq, body["reason"], body["original_type"], body["original_class"], ts)
                )
                row.dropped += 1
                b.dropped_reasons[body["reason"]] = b.dropped_reasons.get(body["reason"], 0) + 1
                continue
            b.events.append(
                (
                    terminal,
                    env.epoch,
                    env.seq,
                    env.id,
                    env.type,
                    ts,
                    now,
                    office,
                    json.dumps(env.body, ensure_ascii=False, separators=(",", ":")),
                )
            )
            row.stored += 1
            b.ingested_types[env.type] = b.ingested_types.get(env.type, 0) + 1

    def _take_status(self, b: _Batch, now: str, terminal: str, m: Inbound) -> None:
        if len(m.payload) > STATUS_MAX_BYTES:
            self._reject(b, now, terminal, m, "oversized", f"status is {len(m.payload)} bytes")
            return
        try:
            doc: Any = json.loads(m.payload) if m.payload else {"state": "offline", "reason": "cleared"}
            state = doc["state"]
            if state not in ("online", "offline"):
                raise ValueError(f"state {state!r} is neither online nor offline")
        except (ValueError, KeyError, TypeError) as err:
            self._reject(b, now, terminal, m, "bad_status", f"status document: {err}")
            return
        reason = str(doc.get("reason", "heartbeat" if state == "online" else "unknown"))[:64]
        b.status[terminal] = (
            terminal,
            state,
            reason,
            now,
            now,
            m.payload.decode("utf-8", "replace") if m.payload else json.dumps(doc),
        )
        b.status_states[state] = b.status_states.get(state, 0) + 1

    def _stream(self, b: _Batch, terminal: str, epoch: str, now: str) -> StreamRow:
        key = (terminal, epoch)
        row = b.streams.get(key)
        if row is None:
            old = self._streams.get(key)
            if old is None:
                row = StreamRow(terminal, epoch, SeqSet(), first_seen=now)
            else:
                # copy: the live marks change only after COMMIT
                row = StreamRow(
                    terminal,
                    epoch,
                    SeqSet(old.seqs.upto, old.seqs.ranges),
                    old.stored,
                    old.dropped,
                    old.quarantined,
                    old.duplicates,
                    old.first_seen,
                )
            b.streams[key] = row
        row.last_seen = now
        return row

    def _reject(
        self,
        b: _Batch,
        now: str,
        terminal: str | None,
        m: Inbound,
        reason: str,
        detail: str,
        epoch: str | None = None,
        seq: int | None = None,
    ) -> None:
        b.rejects.append((now, terminal, m.topic[:200], reason, detail[:500], epoch, seq, len(m.payload)))
        b.reject_reasons[reason] = b.reject_reasons.get(reason, 0) + 1
        log.info("rejected %s from %s: %s", reason, terminal or m.topic[:80], detail[:200])

    def _safe_ack(self, mid: int, qos: int) -> None:
        if qos <= 0:
            return
        try:
            self.ack(mid, qos)
        except Exception:
            log.exception("manual ack of mid %d failed", mid)

    def _update_gap_gauge(self, touched: dict[tuple[str, str], StreamRow] | None = None) -> None:
        for key, row in (touched or self._streams).items():
            gap = sum(e - s + 1 for s, e in row.seqs.missing(limit=1000)) if row.seqs.ranges else 0
            if gap:
                self._gaps[key] = gap
            else:
                self._gaps.pop(key, None)
        self.metrics.gap_events.set(sum(self._gaps.values()))
