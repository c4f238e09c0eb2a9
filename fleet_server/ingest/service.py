"""The ingest writer: validates messages, stores each event once, publishes receipts.

Paho's thread only enqueues (`submit`). One writer thread takes messages in batches, validates
them, writes events + stream marks in one transaction, and only after COMMIT publishes receipts
and acknowledges the MQTT messages (manual ack): a crash before COMMIT leaves the messages
unacknowledged at the broker, which redelivers them to our persistent session.

Hostile or broken input (issue 8) costs one message, never a batch: each message is decoded on
its own (bounded, strict: `fleet_wire`), every failure is a counted reject, and a message the
database refuses to store is isolated by re-trying the batch message by message. State kept per
terminal is bounded (`IngestLimits`): ranges in a stream's receipt state, streams, new epochs a
day, reject-log rows a minute. Past a limit only that terminal is refused, with a counted reason
(`fleet_ingest_terminal_limited_total{reason}`); the rest of the fleet is untouched.
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
from datetime import UTC, datetime, timedelta
from typing import Any

from fleet_server.db import connect
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.store import IngestStore, StreamRow
from fleet_wire import topics
from fleet_wire.commands import decode_cmd_ack
from fleet_wire.envelope import decode_batch, format_ts, is_late
from fleet_wire.errors import CmdAckInvalid, StatusInvalid, TopicError
from fleet_wire.events import TOMBSTONE
from fleet_wire.receipt import Receipt, SeqSet
from fleet_wire.status import decode_status
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

BATCH_MAX_MESSAGES = 500
BATCH_WAIT_S = 0.02  # group commit: wait this long for more messages once one has arrived
STATUS_BATCH_WAIT_S = 0.25  # …and this long while the batch holds only heartbeats (no receipt waits)
QUEUE_MAX = 20_000  # paho's thread blocks past this, which pushes back on the broker
UNKNOWN = ""  # tally and reject-log key for messages of no enrolled terminal (never one key per id)


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """What one terminal may make the server keep; past a limit that terminal is refused."""

    # Ranges above the contiguous mark in one stream's receipt state. An honest outbox sends in
    # seq order and leaves a handful of holes (a broker drop); 200,000 far-apart seqs once made
    # 7.5 MB rewritten per batch. A seq that would open a range past this is refused, not stored.
    max_ranges_per_stream: int = 512
    # Streams (outbox epochs) one terminal may have; an epoch is new with each new outbox file.
    max_streams_per_terminal: int = 64
    # New epochs one terminal may open in 24 h (a reinstall a day is already unusual).
    max_new_epochs_per_day: int = 8
    # Reject-log rows written per terminal per minute; the rest are counted, not written.
    max_reject_rows_per_minute: int = 30
    # The gap gauge counts each gap up to this many seqs: a far seq is not 9e15 lost events.
    max_counted_gap: int = 10_000


@dataclass(slots=True)
class MessageTally:
    """What became of one terminal's messages (the fuzz benchmark's accounting, and diagnostics)."""

    messages: int = 0  # delivered to the ingest and processed
    accepted: int = 0  # decoded as a whole (each of its events is counted below)
    rejected: int = 0  # refused as a whole, counted under a reason
    write_failed: int = 0  # lost to a database error before COMMIT (the terminal re-sends)
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0  # refused events whose seq is receipted (counted as rejects)
    limited: int = 0  # events refused by a per-terminal limit (counted as rejects)
    dropped: int = 0  # tombstones

    def add(self, other: MessageTally) -> None:
        for name in MessageTally.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


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
    late: int = 0
    unlogged: int = 0
    limited_reasons: dict[str, int] = field(default_factory=dict)
    cmd_ack_states: dict[str, int] = field(default_factory=dict)
    ids: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)  # event id -> seq, this batch
    tallies: dict[str, MessageTally] = field(default_factory=dict)
    acks: list[tuple[int, int]] = field(default_factory=list)

    def tally(self, terminal: str | None) -> MessageTally:
        key = terminal or UNKNOWN
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = MessageTally()
        return t


class IngestService:
    def __init__(
        self,
        db_path: str,
        metrics: IngestMetrics,
        terminal_offices: Callable[[], dict[str, str]],
        *,
        publish: Callable[[str, bytes], None] = lambda t, p: None,
        ack: Callable[[int, int], None] = lambda mid, qos: None,
        limits: IngestLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db_path = db_path
        self.limits = limits or IngestLimits()
        self._clock = clock
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
        self._epochs: dict[str, dict[str, str]] = {}  # terminal -> {epoch: first_seen}
        self._reject_minute = ""
        self._reject_rows: dict[str, int] = {}  # reject-log rows written this minute, per terminal
        self.tallies: dict[str, MessageTally] = {}  # per terminal id; UNKNOWN for everyone else
        self._store: IngestStore | None = None
        self._conn: sqlite3.Connection | None = None
        self.batches = 0
        self.errors = 0
        self._refresh = threading.Event()
        self.idle = threading.Event()  # set: nothing pending and no batch in progress
        self._idle_lock = threading.Lock()
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
        for (terminal, epoch), row in self._streams.items():
            self._epochs.setdefault(terminal, {})[epoch] = row.first_seen
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
        while len(self._pending) >= QUEUE_MAX and not self._stop.is_set():
            time.sleep(0.005)  # back-pressure: paho stops reading, the broker holds the rest
        with self._idle_lock:  # the writer's empty-check-and-set cannot fall between these two
            self._pending.append(msg)
            self.idle.clear()
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
                self._set_idle()
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
            msgs: list[Inbound] = []
            while self._pending and len(msgs) < BATCH_MAX_MESSAGES:
                msgs.append(self._pending.popleft())
            # list() copies in C under the GIL; a generator over the deque itself raised
            # "deque mutated during iteration" when paho's thread appended, killing the writer
            if any(m.topic.endswith("/events") for m in list(self._pending)):
                self._events_arrived.set()  # more events left behind this batch: no long wait
            self.metrics.queue_depth.set(len(self._pending))
            try:
                self._process(msgs)
            except Exception:
                self.errors += 1
                log.exception("ingest batch of %d messages failed; terminals will re-send", len(msgs))
                for m in msgs:
                    self._safe_ack(m.mid, m.qos)
            self._set_idle()

    def _set_idle(self) -> None:
        with self._idle_lock:
            if not self._pending:
                self.idle.set()

    def _process(self, msgs: list[Inbound]) -> None:
        if self._refresh.is_set():
            self._refresh.clear()
            self._offices = dict(self._terminal_offices_source())
        started = time.perf_counter()
        now_dt = self._clock()
        now = format_ts(now_dt)
        b = _Batch()
        for m in msgs:
            b.acks.append((m.mid, m.qos))
            self._take(b, now, now_dt, m)
        try:
            assert self._store is not None
            # one transaction (one fsync) for everything the batch holds, none when it holds nothing
            if b.events or b.dropped or b.rejects or b.streams or b.status:
                self._store.write(b.events, b.dropped, b.rejects, list(b.streams.values()), list(b.status.values()))
        except Exception as err:
            if not _environmental(err):
                self._isolate(msgs, err)
                return
            # Disk full, I/O error…: nothing of this batch is stored, no receipt goes out, the
            # terminals keep their rows and re-send after their receipt time-out.
            self.metrics.write_errors.inc()
            self.errors += 1
            log.error("ingest write failed (%s); %d messages will be re-sent by terminals", err, len(msgs))
            for key, t in b.tallies.items():
                self._tally(key).write_failed += t.messages
            for mid, qos in b.acks:
                self._safe_ack(mid, qos)
            return
        self._committed(b)
        for mid, qos in b.acks:
            self._safe_ack(mid, qos)
        self.batches += 1
        if b.streams:
            self._update_gap_gauge(b.streams)
        if self.batches % 1000 == 0:
            self._store.trim_rejects()
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _isolate(self, msgs: list[Inbound], err: Exception) -> None:
        """The database refused a batch for its content: store it message by message, refuse the culprit."""
        if len(msgs) > 1:
            log.warning(
                "ingest batch of %d refused by the database (%s); storing it message by message", len(msgs), err
            )
            for m in msgs:
                self._process([m])
            return
        [m] = msgs
        log.error("message on %s cannot be stored (%s: %s); refused", m.topic[:120], type(err).__name__, err)
        self.metrics.rejected.labels("unstorable").inc()
        terminal = _topic_terminal(m.topic)
        t = self._tally(terminal if terminal in self._offices else UNKNOWN)
        t.messages += 1
        t.rejected += 1
        self._safe_ack(m.mid, m.qos)

    def _committed(self, b: _Batch) -> None:
        """After COMMIT: counters, live state, listeners, receipts.

        Counters come first: whoever sees a stream's new state (streams(), the API) also sees the
        counters of the batch that made it.
        """
        for t_name, n in b.ingested_types.items():
            self.metrics.ingested.labels(t_name).inc(n)
        for r, n in b.dropped_reasons.items():
            self.metrics.dropped.labels(r).inc(n)
        for r, n in b.reject_reasons.items():
            self.metrics.rejected.labels(r).inc(n)
        for r, n in b.limited_reasons.items():
            self.metrics.terminal_limited.labels(r).inc(n)
        for s, n in b.status_states.items():
            self.metrics.status_messages.labels(s).inc(n)
        for s, n in b.cmd_ack_states.items():
            self.metrics.cmd_acks.labels(s).inc(n)
        if b.duplicates:
            self.metrics.duplicates.inc(b.duplicates)
        if b.late:
            self.metrics.late_events.inc(b.late)
        if b.unlogged:
            self.metrics.rejects_unlogged.inc(b.unlogged)
        self._streams.update(b.streams)
        for (terminal, epoch), row in b.streams.items():
            self._epochs.setdefault(terminal, {}).setdefault(epoch, row.first_seen)
        for key, t in b.tallies.items():
            self._tally(key).add(t)
        if b.events:
            for hook in self.on_commit:
                self._call_hook(hook, b.events)
        if b.status:
            rows = list(b.status.values())
            for status_hook in self.on_status:
                self._call_hook(status_hook, rows)
        for (terminal, epoch), row in b.streams.items():
            receipt = Receipt.from_seqset(terminal, epoch, row.seqs)
            try:
                self.publish(topics.topic(terminal, Channel.RECEIPT), receipt.encode())
                self.metrics.receipts.inc()
            except Exception:
                log.exception("could not publish receipt to %s", terminal)

    def _call_hook(self, hook: Callable[[Any], None], rows: Any) -> None:
        # A listener's failure must neither lose the batch (it is committed) nor stop the next
        # one: log it, count it (alert on the metric), carry on.
        try:
            hook(rows)
        except Exception:
            name = getattr(hook, "__qualname__", type(hook).__name__)[:60]
            self.metrics.hook_errors.labels(name).inc()
            log.exception("after-commit listener %s failed on %d rows; the ingest carries on", name, len(rows))

    def _tally(self, key: str) -> MessageTally:
        t = self.tallies.get(key)
        if t is None:
            t = self.tallies[key] = MessageTally()
        return t

    def _take(self, b: _Batch, now: str, now_dt: datetime, m: Inbound) -> None:
        """Classify one message into the batch; whatever happens, it is counted exactly once."""
        try:
            ref = topics.parse(m.topic)
        except TopicError as err:
            b.tally(None).messages += 1
            self._reject_message(b, now, None, m, err.reason, str(err))
            return
        known = ref.terminal_id in self._offices
        tally = b.tally(ref.terminal_id if known else None)
        tally.messages += 1
        if not known:
            self._reject_message(
                b,
                now,
                ref.terminal_id,
                m,
                "unknown_terminal",
                f"terminal {ref.terminal_id!r} is not enrolled (or was revoked)",
            )
            return
        try:
            if ref.channel == Channel.EVENTS:
                self._take_events(b, now, now_dt, ref.terminal_id, m)
            elif ref.channel == Channel.STATUS:
                self._take_status(b, now, ref.terminal_id, m)
            elif ref.channel == Channel.CMD_ACK:
                self._take_cmd_ack(b, now, ref.terminal_id, m)
            else:
                self._reject_message(b, now, ref.terminal_id, m, "bad_topic", f"{ref.channel} is not an uplink topic")
        except Exception as err:  # a bug must cost this message, never the batch
            log.exception("ingest could not process a message from %s", ref.terminal_id)
            self._reject_message(b, now, ref.terminal_id, m, "internal", f"{type(err).__name__} while processing")

    def _take_events(self, b: _Batch, now: str, now_dt: datetime, terminal: str, m: Inbound) -> None:
        decoded = decode_batch(terminal, m.payload, now=now_dt)
        tally = b.tally(terminal)
        if decoded.message_refused:
            [rej] = decoded.rejected
            self._reject_message(b, now, terminal, m, rej.reason, rej.detail)
            return
        tally.accepted += 1
        office = self._offices[terminal]
        for rej in decoded.rejected:
            row = None
            if rej.epoch is not None and rej.seq is not None:
                row = self._admit(b, now, terminal, rej.epoch, rej.seq, m)
                if row is None:
                    continue  # refused by a limit (counted there)
            self._reject(b, now, terminal, m, rej.reason, rej.detail, rej.epoch, rej.seq)
            tally.quarantined += 1
            if row is not None and rej.seq is not None and row.seqs.add(rej.seq):
                # Quarantined, not lost: the row is in `rejects`, and the receipt covers it so the
                # terminal stops re-sending a poisoned event.
                row.quarantined += 1
        known_ids = self._known_ids(b, terminal, decoded.events)
        for env in decoded.events:
            row = self._admit(b, now, terminal, env.epoch, env.seq, m)
            if row is None:
                continue
            if env.seq in row.seqs:
                row.duplicates += 1
                b.duplicates += 1
                tally.duplicates += 1
                continue
            ids = b.ids.setdefault((terminal, env.epoch), {})
            holder = ids.get(env.id, known_ids.get((env.epoch, env.id)))
            if holder is not None and holder != env.seq:
                # event ids are unique per stream: a reused id is quarantined, never stored twice
                self._reject(
                    b,
                    now,
                    terminal,
                    m,
                    "duplicate_id",
                    f"event id {env.id} is already seq {holder}",
                    env.epoch,
                    env.seq,
                )
                tally.quarantined += 1
                row.seqs.add(env.seq)
                row.quarantined += 1
                continue
            ids[env.id] = env.seq
            row.seqs.add(env.seq)
            ts = format_ts(env.ts)
            if env.type == TOMBSTONE:
                body = env.body
                b.dropped.append(
                    (terminal, env.epoch, env.seq, body["reason"], body["original_type"], body["original_class"], ts)
                )
                row.dropped += 1
                tally.dropped += 1
                b.dropped_reasons[body["reason"]] = b.dropped_reasons.get(body["reason"], 0) + 1
                continue
            if is_late(env.ts, now_dt):
                b.late += 1  # an offline terminal's backlog: stored; received_at notes when it came
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
            tally.stored += 1
            b.ingested_types[env.type] = b.ingested_types.get(env.type, 0) + 1

    def _known_ids(self, b: _Batch, terminal: str, events: list[Any]) -> dict[tuple[str, str], int]:
        """Seqs already stored under the ids of `events` (new seqs only: re-sends are dropped anyway)."""
        by_epoch: dict[str, list[str]] = {}
        for env in events:
            live = self._streams.get((terminal, env.epoch))
            if live is not None and env.seq not in live.seqs:
                by_epoch.setdefault(env.epoch, []).append(env.id)
        assert self._store is not None
        out: dict[tuple[str, str], int] = {}
        for epoch, ids in by_epoch.items():
            for event_id, seq in self._store.seqs_for_ids(terminal, epoch, ids).items():
                out[(epoch, event_id)] = seq
        return out

    def _take_status(self, b: _Batch, now: str, terminal: str, m: Inbound) -> None:
        try:
            doc = decode_status(m.payload)
        except StatusInvalid as err:
            self._reject_message(b, now, terminal, m, err.reason, str(err))
            return
        b.tally(terminal).accepted += 1
        reason = doc.reason or ("heartbeat" if doc.state == "online" else "unknown")
        b.status[terminal] = (terminal, doc.state, reason, now, now, doc.to_json())
        b.status_states[doc.state] = b.status_states.get(doc.state, 0) + 1

    def _take_cmd_ack(self, b: _Batch, now: str, terminal: str, m: Inbound) -> None:
        try:
            ack = decode_cmd_ack(m.payload)
        except CmdAckInvalid as err:
            self._reject_message(b, now, terminal, m, err.reason, str(err))
            return
        b.tally(terminal).accepted += 1
        b.cmd_ack_states[ack.state] = b.cmd_ack_states.get(ack.state, 0) + 1

    def _admit(self, b: _Batch, now: str, terminal: str, epoch: str, seq: int, m: Inbound) -> StreamRow | None:
        """The stream row that may take `seq`, or None when a per-terminal limit refuses it (counted)."""
        key = (terminal, epoch)
        if key not in b.streams and key not in self._streams:
            epochs = self._epochs.get(terminal, {})
            new_here = [e for (t, e) in b.streams if t == terminal and (t, e) not in self._streams]
            if len(epochs) + len(new_here) >= self.limits.max_streams_per_terminal:
                self._limited(b, now, terminal, m, "streams", epoch, seq)
                return None
            day_ago = format_ts(self._clock() - timedelta(days=1))
            recent = sum(1 for first in epochs.values() if first >= day_ago) + len(new_here)
            if recent >= self.limits.max_new_epochs_per_day:
                self._limited(b, now, terminal, m, "new_epochs", epoch, seq)
                return None
        row = self._stream(b, terminal, epoch, now)
        if row.seqs.range_count >= self.limits.max_ranges_per_stream and row.seqs.adds_range(seq):
            self._limited(b, now, terminal, m, "ranges", epoch, seq)
            return None
        return row

    def _limited(self, b: _Batch, now: str, terminal: str, m: Inbound, limit: str, epoch: str, seq: int) -> None:
        detail = {
            "streams": f"terminal already has {self.limits.max_streams_per_terminal} streams (epochs)",
            "new_epochs": f"terminal opened {self.limits.max_new_epochs_per_day} new epochs in the last 24 h",
            "ranges": f"stream holds {self.limits.max_ranges_per_stream} disjoint seq ranges; fill the gaps first",
        }[limit]
        self._reject(b, now, terminal, m, f"limit_{limit}", f"{detail}; seq {seq} refused, not stored", epoch, seq)
        b.limited_reasons[limit] = b.limited_reasons.get(limit, 0) + 1
        b.tally(terminal).limited += 1

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

    def _reject_message(self, b: _Batch, now: str, terminal: str | None, m: Inbound, reason: str, detail: str) -> None:
        """A message refused as a whole."""
        b.tally(terminal if terminal in self._offices else None).rejected += 1
        self._reject(b, now, terminal, m, reason, detail)

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
        b.reject_reasons[reason] = b.reject_reasons.get(reason, 0) + 1
        # Every reject is counted; only the first few per terminal a minute are written, so a
        # flood costs a counter increment, not a row (and not a log line) each.
        minute = now[:16]
        if minute != self._reject_minute:
            self._reject_minute = minute
            self._reject_rows.clear()
        key = terminal if terminal in self._offices else UNKNOWN
        written = self._reject_rows.get(key, 0)
        if written >= self.limits.max_reject_rows_per_minute:
            b.unlogged += 1
            return
        self._reject_rows[key] = written + 1
        b.rejects.append(
            (now, terminal, _safe_text(m.topic[:200]), reason, _safe_text(detail[:500]), epoch, seq, len(m.payload))
        )
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
            gap = row.seqs.missing_count(self.limits.max_counted_gap) if row.seqs.ranges else 0
            if gap:
                self._gaps[key] = gap
            else:
                self._gaps.pop(key, None)
        self.metrics.gap_events.set(sum(self._gaps.values()))


def _environmental(err: Exception) -> bool:
    """Tell a database that cannot write now (disk full, I/O, locked) from one refusing this content."""
    return isinstance(err, sqlite3.OperationalError) or type(err) is sqlite3.DatabaseError


def _topic_terminal(topic: str) -> str | None:
    try:
        return topics.parse(topic).terminal_id
    except TopicError:
        return None


def _safe_text(text: str) -> str:
    """Text SQLite can store: a lone surrogate from a hostile payload must not fail the batch."""
    return text.encode("utf-8", "replace").decode("utf-8")
