"""For any interleaving of enqueue / publish / PUBACK / broker drop / delivery / receipt /
reconnect / time / crash-restart, the outbox loses nothing and re-sends only unconfirmed rows.

The outbox is real (SQLite file); the broker and the server are a model (a list of messages in
transit and the set of stored seqs), because the point is every interleaving, not one run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edge_agent.outbox import Outbox, OutboxLimits, SendWindow
from fleet_wire.receipt import Receipt, SeqSet

TID = "t-prop"


class OutboxMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prop-"))
        self.now = 0.0
        self.enqueued: set[int] = set()
        self.stored = SeqSet()  # what the (model) server has committed
        self.known_stored: set[int] = set()  # what the agent has learned from receipts
        self.transit: list[tuple[int, list[int], bool]] = []  # (mid, seqs, pubacked)
        self.next_mid = 1
        self._open()

    def _open(self) -> None:
        self.box = Outbox(
            self.dir / "o.db", TID, OutboxLimits(max_rows=10**6), synchronous="NORMAL", clock=lambda: self.now
        )
        self.window = SendWindow(
            self.box, window=3, batch_events=4, batch_bytes=10**6, receipt_timeout_s=5.0, clock=lambda: self.now
        )

    def teardown(self) -> None:
        if not hasattr(self, "box"):
            return
        try:
            self.eventually_everything_is_stored()
        finally:
            self.box.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the terminal --------------------------------------------------------------------------

    @rule(n=st.integers(1, 6))
    def enqueue(self, n: int) -> None:
        items = self.box.enqueue_many([("service.started", {"session": "s", "service_code": "TQ01"}, None)] * n)
        for item in items:
            assert item.seq not in self.enqueued, "seq reused"
            self.enqueued.add(item.seq)

    @rule()
    def publish(self) -> None:
        batch = self.window.next_batch()
        if batch is None:
            return
        seqs = [e["seq"] for e in json.loads(batch.payload)["events"]]
        assert seqs == batch.seqs
        assert not set(seqs) & self.known_stored, "re-sent a row the agent knew was stored"
        assert all(s in self.enqueued for s in seqs)
        mid = self.next_mid
        self.next_mid += 1
        self.window.published(batch, mid)
        self.transit.append((mid, seqs, False))

    @rule(data=st.data())
    def puback(self, data: st.DataObject) -> None:
        pending = [i for i, (_, _, acked) in enumerate(self.transit) if not acked]
        if not pending:
            return
        i = data.draw(st.sampled_from(pending))
        mid, seqs, _ = self.transit[i]
        self.transit[i] = (mid, seqs, True)
        self.window.puback(mid)

    # -- the broker and the server ---------------------------------------------------------------

    @rule(data=st.data(), deliver=st.booleans())
    def broker_forwards_or_drops(self, data: st.DataObject, deliver: bool) -> None:
        acked = [i for i, (_, _, a) in enumerate(self.transit) if a]
        if not acked:
            return
        i = data.draw(st.sampled_from(acked))
        _, seqs, _ = self.transit.pop(i)
        if deliver:
            for s in seqs:
                self.stored.add(s)

    @rule(lost=st.booleans())
    def server_sends_receipt(self, lost: bool) -> None:
        if lost:
            return
        receipt = Receipt.from_seqset(TID, self.box.epoch, self.stored)
        self.window.receipt(receipt)
        self.known_stored |= {s for s in self.enqueued if receipt.covers(s)}

    @rule(session_present=st.booleans())
    def reconnect(self, session_present: bool) -> None:
        if not session_present:
            # a fresh broker session: un-PUBACKed messages in paho's queue are re-sent by paho
            self.transit = [(m, s, False) for m, s, _ in self.transit]
        self.window.connected(session_present)

    @rule(dt=st.floats(0, 30))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        self.window.tick(True)

    @rule()
    def crash_and_restart(self) -> None:
        self.box.close()
        self.transit = [t for t in self.transit if t[2]]  # the dead process's un-sent queue is gone
        self._open()

    # -- what must always hold -----------------------------------------------------------------

    @invariant()
    def nothing_lost(self) -> None:
        if not hasattr(self, "box"):
            return
        held = set(self.box.all_seqs())
        for s in self.enqueued:
            assert s in held or s in self.stored, f"seq {s} is neither in the outbox nor stored"

    @invariant()
    def only_receipted_rows_deleted(self) -> None:
        if not hasattr(self, "box"):
            return
        gone = self.enqueued - set(self.box.all_seqs())
        assert gone <= self.known_stored

    @precondition(lambda self: hasattr(self, "box"))
    @rule()
    def link_heals(self) -> None:
        self.eventually_everything_is_stored()

    def eventually_everything_is_stored(self) -> None:
        """Let the link heal for long enough: every event ends up stored, the outbox empty."""
        for _ in range(200):
            self.now += 200
            self.window.tick(True)
            while (batch := self.window.next_batch()) is not None:
                self.window.published(batch, self.next_mid)
                self.window.puback(self.next_mid)
                self.next_mid += 1
                for s in batch.seqs:
                    self.stored.add(s)
            receipt = Receipt.from_seqset(TID, self.box.epoch, self.stored)
            self.window.receipt(receipt)
            self.known_stored |= {s for s in self.enqueued if receipt.covers(s)}
            if self.box.depth == 0:
                break
        assert self.box.depth == 0
        assert all(s in self.stored for s in self.enqueued)


OutboxMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_outbox_interleavings = OutboxMachine.TestCase
