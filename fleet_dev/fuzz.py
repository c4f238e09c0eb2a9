"""A fuzz round against a real stack: one terminal's credentials publish hostile payloads of every
class while honest terminals post events through their agents; then the ingest's accounting is
checked against what was published and what the database holds. Used by `bench/fuzz.py` and by
the test suite (a small round).
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet_dev.devstack import DevStack
from fleet_dev.proc import wait_for
from fleet_wire import topics
from fleet_wire.topics import Channel

CLASSES = (
    "random_bytes",
    "truncated_json",
    "wrong_types",
    "seq_extremes",
    "far_seqs",
    "fresh_epochs",
    "foreign_terminal",
    "poison",
    "retained_garbage",
    "oversized",
    "cmd_ack_garbage",
    "valid",
    "resend",
    "foreign_topic",  # into another terminal's topic: the ACL must keep it from the server
)


@dataclass(frozen=True, slots=True)
class Payload:
    kind: str
    topic: str
    data: bytes
    retain: bool = False
    own: bool = True  # published on the fuzzing terminal's own topics (the broker delivers it)


def _ts(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Generator:
    """Payloads of every class from one seeded RNG, for terminal `tid` (`other` is a victim)."""

    def __init__(self, rng: random.Random, tid: str, other: str) -> None:
        self.rng, self.tid, self.other = rng, tid, other
        self.epoch = uuid.uuid4().hex
        self.far_epoch = uuid.uuid4().hex
        self.seq = 0
        self.valid_ids: set[str] = set()  # ids the generator meant to be storable
        self.sent_valid: list[dict[str, Any]] = []
        self.events_topic = topics.topic(tid, Channel.EVENTS)
        self.status_topic = topics.topic(tid, Channel.STATUS)

    def _event(self, **over: Any) -> dict[str, Any]:
        self.seq += 1
        doc: dict[str, Any] = {
            "v": 1,
            "terminal": self.tid,
            "epoch": self.epoch,
            "seq": self.seq,
            "id": uuid.uuid4().hex,
            "ts": _ts(),
            "type": "service.completed",
            "body": {"session": f"fz-{self.seq}", "service_code": "TQ02", "duration_s": 61.5, "face_login": True},
        }
        doc.update(over)
        return doc

    def _batch(self, *events: dict[str, Any]) -> bytes:
        # ASCII escapes: a lone surrogate travels as \ud800, which is valid JSON (and a poison)
        return json.dumps({"v": 1, "events": list(events)}).encode()

    def _valid(self, **over: Any) -> dict[str, Any]:
        ev = self._event(**over)
        self.valid_ids.add(ev["id"])
        return ev

    def one(self, kind: str) -> Payload:
        r = self.rng
        ev_topic = self.events_topic
        if kind == "random_bytes":
            return Payload(kind, r.choice([ev_topic, self.status_topic]), r.randbytes(r.randrange(0, 600)))
        if kind == "truncated_json":
            whole = self._batch(self._event(), self._event())
            return Payload(kind, ev_topic, whole[: r.randrange(1, len(whole) - 1)])
        if kind == "wrong_types":
            field_, value = r.choice(
                [
                    ("v", True),
                    ("ts", 1764590000),
                    ("ts", 0),
                    ("ts", "2026-12-01T10:00:00+08:00"),
                    ("seq", "7"),
                    ("seq", 3.0),
                    ("body", {"session": "s", "service_code": "TQ02", "duration_s": True}),
                    ("body", {"session": "s", "service_code": "TQ02", "duration_s": "95"}),
                    ("body", {"session": "s", "service_code": "TQ02", "duration_s": 9.0, "face_login": "yes"}),
                    ("epoch", self.epoch + "\n"),
                    ("id", 12345),
                    ("type", None),
                ]
            )
            return Payload(kind, ev_topic, self._batch(self._event(**{field_: value})))
        if kind == "seq_extremes":
            seq = r.choice([0, -1, 2**53 + 1, 2**63, 2**64 + 7, -(2**63)])
            return Payload(kind, ev_topic, self._batch(self._event(seq=seq)))
        if kind == "far_seqs":
            return Payload(kind, ev_topic, self._batch(self._valid(epoch=self.far_epoch, seq=r.randrange(1, 2**53))))
        if kind == "fresh_epochs":
            return Payload(kind, ev_topic, self._batch(self._valid(epoch=uuid.uuid4().hex, seq=1)))
        if kind == "foreign_terminal":
            return Payload(kind, ev_topic, self._batch(self._event(terminal=self.other)))
        if kind == "poison":
            choice = r.randrange(6)
            if choice == 0:
                data = b'{"v":1,"events":' + b"[" * r.randrange(50, 5000) + b"]}"
            elif choice == 1:
                data = b'{"v":1,"events":[{"seq":' + b"7" * r.randrange(40, 6000) + b"}]}"
            elif choice == 2:
                data = self._batch(self._event())[:-2] + b',"x":NaN}]}'
            elif choice == 3:
                data = self._batch(self._event(body={"session": "s", "service_code": "TQ02", "duration_s": 1e400}))
            elif choice == 4:
                data = self._batch(
                    self._event(
                        type="service.abandoned",
                        body={"session": "s", "service_code": "TQ02", "duration_s": 1.0, "step": "\ud800"},
                    )
                )
            else:
                data = self._batch(self._event(ts=_ts(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))))
            return Payload(kind, ev_topic, data)
        if kind == "retained_garbage":
            data = r.choice(
                [
                    r.randbytes(40),
                    b'{"state":"online","x":' + b"[" * 3000,
                    b'{"state":true}',
                    b'{"state":"online","hb_interval_s":1e12}',
                    b'{"state":"online","hb_interval_s":"5"}',
                    b'{"state":"online","outbox":{"depth":' + b"9" * 5000 + b"}}",
                ]
            )
            return Payload(kind, self.status_topic, data, retain=True)
        if kind == "oversized":
            return Payload(kind, ev_topic, b'{"v":1,"events":[' + b" " * (256 * 1024) + b"]}")
        if kind == "cmd_ack_garbage":
            return Payload(kind, topics.topic(self.tid, Channel.CMD_ACK), r.choice([b"{", b'{"ok":true}', b"[" * 900]))
        if kind == "valid":
            events = [self._valid() for _ in range(r.randrange(1, 4))]
            self.sent_valid.extend(events)
            return Payload(kind, ev_topic, self._batch(*events))
        if kind == "resend":
            if not self.sent_valid:
                return self.one("valid")
            return Payload(kind, ev_topic, self._batch(r.choice(self.sent_valid)))
        if kind == "foreign_topic":
            channel = r.choice([Channel.EVENTS, Channel.STATUS])
            return Payload(
                kind, topics.topic(self.other, channel), self._batch(self._event(terminal=self.other)), own=False
            )
        raise ValueError(f"unknown payload class {kind!r}")

    def stream(self, n: int) -> Iterator[Payload]:
        # Every class appears; the cheap ones most often (the oversized one costs 256 KiB each).
        weights = {"oversized": 0.2, "poison": 2.0, "valid": 2.0}
        kinds = list(CLASSES)
        w = [weights.get(k, 1.0) for k in kinds]
        for i in range(n):
            yield self.one(kinds[i] if i < len(kinds) else self.rng.choices(kinds, w)[0])


class Publisher:
    """A paho client with a pipelined QoS 1 window; counts PUBACKs by outcome."""

    def __init__(self, port: int, username: str, password: str, client_id: str) -> None:
        self.ok = 0
        self.refused = 0
        self._pending = threading.Semaphore(200)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        c.username_pw_set(username, password)
        c.max_inflight_messages_set(200)
        c.on_connect = lambda cl, u, f, rc, p: self._connected.set()
        c.on_publish = self._on_publish
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("fuzz publisher did not connect")
        self.client = c

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._lock:
            if rc.is_failure:
                self.refused += 1
            else:
                self.ok += 1
        self._pending.release()

    def publish(self, p: Payload) -> None:
        self._pending.acquire()
        self.client.publish(p.topic, p.data, qos=1, retain=p.retain)

    def settle(self, expected: int, timeout_s: float = 30.0) -> None:
        wait_for(lambda: self.ok + self.refused >= expected, timeout_s, what="PUBACKs for every fuzz payload")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connack(port: int, username: str, password: str, client_id: str, timeout_s: float = 10.0) -> bool:
    """One connection attempt; True when the broker accepted it (a takeover succeeded)."""
    got: list[Any] = []
    done = threading.Event()

    def on_connect(cl: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        got.append(rc)
        done.set()

    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set(username, password)
    c.on_connect = on_connect
    c.on_disconnect = lambda *a: done.set()
    try:
        c.connect("127.0.0.1", port)
    except OSError:
        return False
    c.loop_start()
    try:
        done.wait(timeout_s)
        return bool(got) and not got[0].is_failure
    finally:
        c.disconnect()
        c.loop_stop()


@dataclass
class HonestLoad:
    """Honest terminals posting through their agents; receipt latency per event."""

    agents: list[Any]
    rate_per_s: float
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    _posted: dict[tuple[int, int], float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        interval = 1.0 / self.rate_per_s
        nxt = time.monotonic()
        i = 0
        while not self._stop.is_set():
            agent_no = i % len(self.agents)
            a = self.agents[agent_no]
            body = {"session": f"hon-{i}", "service_code": "TQ02", "duration_s": 42.0, "face_login": False}
            item = a.post_event("service.completed", body)
            self._posted[(agent_no, item.seq)] = time.monotonic()
            self.sent += 1
            i += 1
            self._reap()
            nxt += interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    def _reap(self) -> None:
        if not self._posted:
            return
        held = {(n, s) for n, a in enumerate(self.agents) for s in a.outbox.all_seqs()}
        now = time.monotonic()
        for key in [k for k in self._posted if k not in held]:
            self.latencies.append(now - self._posted.pop(key))

    def finish(self, timeout_s: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while self._posted and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def run_round(
    st: DevStack,
    fuzzer: str,
    honest: list[str],
    n: int,
    *,
    seed: int = 8,
    honest_rate_per_s: float = 50.0,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run one fuzz round on a started stack; returns the figures (see bench/fuzz.py)."""
    assert st.server is not None
    server = st.server
    registry = server.metrics_registry

    def rejected_total() -> float:
        return sum(
            s.value
            for m in registry.collect()
            if m.name == "fleet_ingest_rejected"
            for s in m.samples
            if s.name.endswith("_total")
        )

    agents = [st.agent(t) for t in honest]
    for a in agents:
        a.start()
    tracked = getattr(st, "tracked_agents", None)
    if tracked is not None:
        tracked.extend(agents)
    # receipt latency is measured from a connected agent, not from its start-up
    wait_for(lambda: all(a.link.connected for a in agents), 20, what="honest agents connected")
    load = HonestLoad(agents, honest_rate_per_s)
    loader = threading.Thread(target=load.run, name="fuzz-honest", daemon=True)
    rss_before = _rss_mb()
    rejected_before = rejected_total()
    gen = Generator(random.Random(seed), fuzzer, honest[0])
    pub = Publisher(st.port, fuzzer, st.passwords[fuzzer], client_id=fuzzer)
    counts: dict[str, int] = {}
    own = 0
    t0 = time.monotonic()
    loader.start()
    try:
        for i, p in enumerate(gen.stream(n)):
            pub.publish(p)
            counts[p.kind] = counts.get(p.kind, 0) + 1
            own += p.own
            if i and i % 2000 == 0:
                log(f"  {i} payloads published ({time.monotonic() - t0:.1f}s)")
        pub.publish(Payload("clear", gen.status_topic, b"", retain=True))  # leave no retained poison behind
        own += 1
        pub.settle(n + 1)
        publish_s = time.monotonic() - t0

        def settled() -> bool:
            t = server.ingest.tallies.get(fuzzer)
            return t is not None and t.messages >= own and server.ingest.idle.is_set()

        try:
            wait_for(settled, 60, what="the ingest to process every delivered fuzz payload")
        except TimeoutError:
            log("  the ingest saw fewer fuzz messages than were published (see lost_in_transit)")
    finally:
        load.finish(30)
        loader.join(10)
        pub.close()
    tally = server.ingest.tallies.get(fuzzer)
    assert tally is not None
    with sqlite3.connect(st.settings.db_path) as conn:
        stored_fuzz_ids = {r[0] for r in conn.execute("SELECT id FROM events WHERE terminal=?", (fuzzer,))}
        marks = ",".join("?" * len(honest))
        honest_stored = conn.execute(
            "SELECT count(DISTINCT json_extract(body, '$.session')) FROM events"
            f" WHERE type='service.completed' AND terminal IN ({marks})",
            honest,
        ).fetchone()[0]
    rejected = rejected_total() - rejected_before
    counted_by_tally = tally.rejected + tally.quarantined + tally.limited
    # A payload is accounted for when the ingest classified it (whole-message reject, or decoded
    # with each event stored / duplicate / quarantined / limited) and the database agrees.
    unaccounted = max(0, tally.messages - (tally.accepted + tally.rejected))
    unaccounted += abs(len(stored_fuzz_ids) - tally.stored)
    wrongly_stored = len(stored_fuzz_ids - gen.valid_ids)
    # Takeovers last: a successful one would wipe the victim's session (and with it queued fuzz).
    takeovers = {
        cid: connack(st.port, fuzzer, st.passwords[fuzzer], cid) for cid in (honest[0], server.link.settings.client_id)
    }
    for a in agents:
        a.stop()
    alive = server.link.connected.wait(20) and server.ingest._thread is not None and server.ingest._thread.is_alive()
    return {
        "fuzzed": n,
        "published_own": own,
        "delivered": tally.messages,
        "lost_in_transit": max(0, own - tally.messages),
        "acl_refused": pub.refused,
        "rejected_counted": int(rejected),
        "rejected_by_tally": counted_by_tally,
        "unaccounted": unaccounted,
        "wrongly_stored": wrongly_stored,
        "fuzz_stored": len(stored_fuzz_ids),
        "honest_sent": load.sent,
        "honest_lost": load.sent - honest_stored,
        "honest_receipt_p99_s": round(_p99(load.latencies), 3),
        "takeover_successes": sum(takeovers.values()),
        "takeovers": {k: int(v) for k, v in takeovers.items()},
        "server_alive": int(alive),
        "server_rss_growth_mb": round(_rss_mb() - rss_before, 1),
        "publish_s": round(publish_s, 2),
        "classes": counts,
        "ingest_errors": server.ingest.errors,
    }
