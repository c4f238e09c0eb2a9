"""The send window: which outbox rows are on the wire, which await a receipt, which to re-send.

No I/O of its own besides reading the outbox; the pump thread publishes what `next_batch` returns
and feeds PUBACKs, receipts, connects and clock ticks back in. Every unconfirmed row with
`seq <= cursor` is in exactly one flight or in the re-send set; rows above the cursor have not
been sent by this process yet. After a restart the cursor starts at 0, so everything unconfirmed
goes out again; the server's idempotent store drops what it already has.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.outbox.store import Outbox, OutboxItem
from fleet_wire.envelope import SCHEMA_VERSION
from fleet_wire.receipt import Receipt

RECEIPT_TIMEOUT_S = 10.0  # PUBACKed but no receipt this long: the broker or server lost it
RECEIPT_TIMEOUT_MAX_S = 120.0  # back-off ceiling while the server stays silent
PUBACK_TIMEOUT_S = 20.0  # published on a live connection and no PUBACK: re-send


@dataclass(slots=True)
class Batch:
    """One events message: the seqs it carries and its payload."""

    token: int
    seqs: list[int]
    payload: bytes
    resend: bool
    sent_at: float = 0.0
    acked_at: float | None = None
    mid: int | None = None


@dataclass(slots=True)
class WindowCounters:
    sent_events: int = 0
    resent_events: int = 0
    batches: int = 0
    receipt_timeouts: int = 0
    rejected_pubacks: int = 0


@dataclass(slots=True)
class SendWindow:
    outbox: Outbox
    window: int = 16  # messages awaiting a receipt
    batch_events: int = 200
    batch_bytes: int = 128 * 1024
    receipt_timeout_s: float = RECEIPT_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    counters: WindowCounters = field(default_factory=WindowCounters)
    cursor: int = 0
    _flights: dict[int, Batch] = field(default_factory=dict)
    _by_mid: dict[int, int] = field(default_factory=dict)
    _resend: list[int] = field(default_factory=list)
    _next_token: int = 1
    _timeout_s: float = 0.0

    def __post_init__(self) -> None:
        self._timeout_s = self.receipt_timeout_s

    # -- what to send ----------------------------------------------------------------------

    def next_batch(self) -> Batch | None:
        """The next message to publish, or None if the window is full or nothing is waiting."""
        if len(self._flights) >= self.window:
            return None
        resend = False
        items: list[OutboxItem] = []
        while self._resend and not items:
            take, self._resend = self._resend[: self.batch_events], self._resend[self.batch_events :]
            items = self.outbox.get(take, self.batch_bytes)
            kept = {i.seq for i in items}
            # rows beyond the byte budget go back; rows already confirmed are simply gone
            leftover = [s for s in take if s not in kept and s > (items[-1].seq if items else 0)]
            if items and leftover:
                self._resend = leftover + self._resend
            resend = True
        if not items:
            resend = False
            items = self.outbox.after(self.cursor, self.batch_events, self.batch_bytes)
            if not items:
                return None
            self.cursor = items[-1].seq
        payload = (f'{{"v":{SCHEMA_VERSION},"events":[' + ",".join(i.env for i in items) + "]}").encode()
        batch = Batch(self._next_token, [i.seq for i in items], payload, resend)
        self._next_token += 1
        return batch

    def published(self, batch: Batch, mid: int | None) -> None:
        """Record that `batch` was handed to the MQTT client under message id `mid`."""
        batch.sent_at = self.clock()
        batch.mid = mid
        self._flights[batch.token] = batch
        self.counters.batches += 1
        if mid is None:
            # the client refused it outright (its own queue full): straight back to re-send
            self._requeue(batch.token)
            return
        self._by_mid[mid] = batch.token
        if batch.resend:
            self.counters.resent_events += len(batch.seqs)
        else:
            self.counters.sent_events += len(batch.seqs)

    # -- what comes back -------------------------------------------------------------------

    def puback(self, mid: int, accepted: bool = True) -> None:
        """The broker acknowledged message `mid` (MQTT 5 reason < 0x80 means accepted)."""
        token = self._by_mid.pop(mid, None)
        batch = self._flights.get(token) if token is not None else None
        if batch is None:
            return
        batch.acked_at = self.clock()
        if not accepted:
            # Refused by the broker (e.g. ACL): keep the rows; the receipt timeout re-sends them
            # with back-off while the operator fixes the configuration.
            self.counters.rejected_pubacks += 1

    def receipt(self, receipt: Receipt) -> int:
        """Apply a server receipt: delete stored rows, drop covered seqs from flights."""
        deleted = self.outbox.confirm(receipt)
        if receipt.epoch != self.outbox.epoch:
            return 0
        progressed = deleted > 0
        for token in list(self._flights):
            batch = self._flights[token]
            left = [s for s in batch.seqs if not receipt.covers(s)]
            if len(left) != len(batch.seqs):
                progressed = True
            if left:
                batch.seqs = left
            else:
                self._drop(token)
        if self._resend:
            self._resend = [s for s in self._resend if not receipt.covers(s)]
        if progressed:
            self._timeout_s = self.receipt_timeout_s
        return deleted

    def connected(self, session_present: bool) -> None:
        """A (re)connection. Without a session the broker kept nothing of ours: re-send it all."""
        if session_present:
            return
        # Without a session nothing we sent is safe at the broker; paho may re-send what it still
        # holds too, which costs a duplicate the server drops, never a loss or a stall.
        for token in list(self._flights):
            self._requeue(token)

    def tick(self, online: bool) -> int:
        """Re-queue flights whose receipt (or PUBACK) is overdue; returns seqs re-queued."""
        if not online:
            return 0
        now = self.clock()
        moved = 0
        timed_out = False
        for token, batch in list(self._flights.items()):
            if batch.acked_at is not None:
                overdue = now - batch.acked_at >= self._timeout_s  # PUBACKed, no receipt
            else:
                overdue = now - batch.sent_at >= max(PUBACK_TIMEOUT_S, self._timeout_s)  # no PUBACK
            if overdue:
                moved += self._requeue(token)
                timed_out = True
        if timed_out:
            self.counters.receipt_timeouts += 1
            self._timeout_s = min(self._timeout_s * 2, RECEIPT_TIMEOUT_MAX_S)
        return moved

    # -- introspection ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def flight_seqs(self) -> list[int]:
        return sorted(s for b in self._flights.values() for s in b.seqs)

    def resend_seqs(self) -> list[int]:
        return list(self._resend)

    @property
    def current_timeout_s(self) -> float:
        return self._timeout_s

    def _requeue(self, token: int) -> int:
        batch = self._drop(token)
        for seq in batch.seqs:
            i = bisect.bisect_left(self._resend, seq)
            if i == len(self._resend) or self._resend[i] != seq:
                self._resend.insert(i, seq)
        return len(batch.seqs)

    def _drop(self, token: int) -> Batch:
        batch = self._flights.pop(token)
        if batch.mid is not None and self._by_mid.get(batch.mid) == token:
            del self._by_mid[batch.mid]
        return batch
