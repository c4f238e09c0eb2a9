"""Composition root of the edge agent: builds the outbox, the link and the pump from settings."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from edge_agent import __version__
from edge_agent.config import AgentSettings
from edge_agent.health import HealthMonitor, ProfileUnusable, load_agent_profile
from edge_agent.health.probes import CameraProbe, HostProbe, ProbeResult
from edge_agent.health.profile import BUILTIN_PROFILE, HOST_ID, AgentProfile
from edge_agent.link import LinkEvent, LinkSettings, MqttLink
from edge_agent.outbox import Outbox, OutboxItem, OutboxLimits, SendWindow
from edge_agent.outbox.store import InvalidEvent, OutboxFull
from fleet_wire import topics
from fleet_wire.errors import WireError
from fleet_wire.receipt import Receipt
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

PUMP_TICK_S = 0.25
EXPIRE_EVERY_S = 60.0
_WAKE = LinkEvent("wake")


class Agent:
    """One terminal's agent: outbox + link + pump + heartbeat."""

    def __init__(self, settings: AgentSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._clock = clock
        self._started_at = clock()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        limits = OutboxLimits(max_rows=settings.outbox_max_rows, max_bytes=settings.outbox_max_bytes)
        self.outbox = Outbox(
            settings.data_dir / "outbox.db",
            settings.terminal_id,
            limits,
            synchronous=settings.outbox_synchronous,
            clock=clock,
        )
        self.window = SendWindow(
            self.outbox,
            window=settings.send_window,
            batch_events=settings.batch_events,
            receipt_timeout_s=settings.receipt_timeout_s,
        )
        self._inbox: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self.link = MqttLink(
            LinkSettings(
                settings.terminal_id,
                settings.broker_host,
                settings.broker_port,
                settings.username,
                settings.password,
                tls_ca=settings.tls_ca,
            ),
            on_event=self._inbox.put,
            birth=self.status_summary,
        )
        self.profile_error: str | None = None
        self.health_monitor = self._build_health_monitor(settings, clock)
        self.bad_receipts = 0
        # Updates: citizen sessions (an install never starts during one), the last receipt (could
        # this version reach the server?), and the exit code asked for (EXIT_RESTART after an install).
        from edge_agent.update.timing import SessionTracker
        from edge_agent.update.updater import Updater

        self.sessions = SessionTracker(settings.update_session_timeout_s)
        self.last_receipt_at: float | None = None
        self.exit_requested = threading.Event()
        self.exit_code = 0
        self.updater = Updater(self)
        self._events_topic = topics.topic(settings.terminal_id, Channel.EVENTS)
        self._stop = threading.Event()
        self._pump_thread: threading.Thread | None = None
        self.pump_errors = 0
        self.last_pump_turn = time.monotonic()
        from edge_agent.metrics import build_registry

        # Other components (face, update…) register their metrics here too.
        self.metrics_registry = build_registry(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def _build_health_monitor(self, settings: AgentSettings, clock: Callable[[], float]) -> HealthMonitor:
        profile: AgentProfile = BUILTIN_PROFILE
        if settings.profile_file is not None:
            try:
                profile = load_agent_profile(settings.profile_file)
            except ProfileUnusable as err:
                # Loud, but no reason to stop storing the citizens' events: judge the host only.
                self.profile_error = str(err)
                log.error("device profile unusable, judging the host by built-in limits only: %s", err)
        probes: dict[str, Callable[[], ProbeResult]] = {HOST_ID: HostProbe(settings.data_dir)}
        for camera in profile.of_kind("camera"):
            source = settings.camera_probe_source or settings.face.camera_source
            probes[camera.id] = CameraProbe(source, clock=clock)
        return HealthMonitor(
            profile,
            probes,
            clock=clock,
            probe_interval_s=settings.probe_interval_s,
            probe_timeout_s=settings.probe_timeout_s,
            stale_after_s=settings.reading_stale_after_s,
            name=f"health-{settings.terminal_id}",
        )

    def start(self) -> None:
        self.health_monitor.start()
        self.link.start()
        self._pump_thread = threading.Thread(target=self._pump, name=f"pump-{self.settings.terminal_id}", daemon=True)
        self._pump_thread.start()
        self.updater.start()

    def stop(self, graceful: bool = True) -> None:
        self._stop.set()
        self._inbox.put(_WAKE)
        self.updater.stop()
        if self._pump_thread:
            self._pump_thread.join(5)
        self.link.stop(graceful=graceful)
        self.health_monitor.stop()
        self.outbox.close()

    def request_restart(self) -> None:
        """Ask the entry point to stop cleanly and exit with EXIT_RESTART (the launcher restarts us)."""
        from edge_agent.launcher import EXIT_RESTART

        self.exit_code = EXIT_RESTART
        self.exit_requested.set()

    @property
    def stopped(self) -> bool:
        """stop() was called (the local API server shuts down with its agent)."""
        return self._stop.is_set()

    def alive(self) -> bool:
        """The pump turned recently (for the systemd watchdog)."""
        thread = self._pump_thread
        return thread is not None and thread.is_alive() and time.monotonic() - self.last_pump_turn < 30

    # -- the kiosk-facing side -----------------------------------------------------------------

    def post_event(self, event_type: str, body: Any, ts: datetime | None = None, key: str | None = None) -> OutboxItem:
        """Store one event durably and wake the pump. Raises InvalidEvent or OutboxFull."""
        item = self.outbox.enqueue(event_type, body, ts=ts, key=key)
        self.sessions.observe(event_type, body)
        self._inbox.put(_WAKE)
        return item

    def post_events(self, events: list[tuple[str, Any, datetime | None]]) -> list[OutboxItem]:
        items = self.outbox.enqueue_many(events)
        for event_type, body, _ts in events:
            self.sessions.observe(event_type, body)
        self._inbox.put(_WAKE)
        return items

    def status_summary(self) -> dict[str, Any]:
        """The heartbeat document (also the birth message)."""
        st = self.outbox.stats()
        return {
            "ts": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "version": __version__,
            "office": self.settings.office_id,
            "uptime_s": round(self._clock() - self._started_at, 1),
            "hb_interval_s": self.settings.heartbeat_interval_s,
            "outbox": {
                "depth": st.depth,
                "oldest_age_s": round(st.oldest_age_s, 1),
                "refused": self.outbox.counters.refused,
            },
            "profile": self.health_monitor.profile.id,
            # {id: {state, check, reading, limit, since, error}}; "host" has the same shape
            "peripherals": self.health_monitor.peripherals(),
            "host": self.health_monitor.host(),
            "disk_pct": _disk_pct(self.settings.data_dir),
        }

    def health(self) -> dict[str, Any]:
        """Everything a technician or the kiosk app wants to know, in one document."""
        st = self.outbox.stats()
        w = self.window.counters
        problems = []
        if not self.link.connected:
            problems.append(self.link.last_error or "not connected to the fleet broker yet")
        if self.link.auth_failures:
            problems.append("the broker refused this terminal's credentials")
        if st.oldest_age_s > 3600:
            problems.append(f"oldest unsent event is {st.oldest_age_s / 3600:.1f} h old")
        if self.profile_error:
            problems.append(f"device profile not usable, peripherals are not judged: {self.profile_error}")
        problems.extend(self.health_monitor.problems())
        return {
            "terminal": self.settings.terminal_id,
            "office": self.settings.office_id,
            "version": __version__,
            "ok": not problems,
            "problems": problems,
            "link": {
                "connected": self.link.connected,
                "connects": self.link.reconnects,
                "last_error": self.link.last_error,
            },
            "outbox": {
                "depth": st.depth,
                "live": st.live,
                "bytes": st.bytes,
                "oldest_age_s": round(st.oldest_age_s, 3),
                "by_class": st.by_class,
                "epoch": st.epoch,
                "next_seq": st.next_seq,
                "in_flight_batches": self.window.in_flight,
                "sent": w.sent_events,
                "resent": w.resent_events,
                "confirmed": self.outbox.counters.confirmed,
                "evicted": self.outbox.counters.evicted,
                "expired": self.outbox.counters.expired,
                "refused": self.outbox.counters.refused,
            },
            "profile": self.health_monitor.profile.id,
            "peripherals": self.health_monitor.peripherals(),
            "host": self.health_monitor.host(),
        }

    # -- the pump --------------------------------------------------------------------------------

    def _pump(self) -> None:
        last_tick = last_expire = last_hb = 0.0
        last_telemetry = time.monotonic()
        while not self._stop.is_set():
            self.last_pump_turn = time.monotonic()
            try:
                event: LinkEvent | None = self._inbox.get(timeout=PUMP_TICK_S)
            except queue.Empty:
                event = None
            try:
                while event is not None:
                    self._handle(event)
                    try:
                        event = self._inbox.get_nowait()
                    except queue.Empty:
                        event = None
                if self._stop.is_set():
                    break
                online = self.link.connected
                if online:
                    while (batch := self.window.next_batch()) is not None:
                        self.window.published(batch, self.link.publish(self._events_topic, batch.payload))
                now = time.monotonic()
                if now - last_tick >= PUMP_TICK_S:
                    last_tick = now
                    self.window.tick(online)
                if now - last_expire >= EXPIRE_EVERY_S:
                    last_expire = now
                    self.outbox.expire()
                if online and now - last_hb >= self.settings.heartbeat_interval_s:
                    last_hb = now
                    self.link.publish_status({"state": "online", **self.status_summary()})
                if now - last_telemetry >= self.settings.telemetry_interval_s:
                    last_telemetry = now
                    self._sample_telemetry()
            except Exception:
                self.pump_errors += 1
                log.exception("pump turn failed; continuing")
                self._stop.wait(PUMP_TICK_S)

    def _handle(self, event: LinkEvent) -> None:
        if event.kind == "puback":
            self.window.puback(event.mid, event.accepted)
        elif event.kind == "message":
            self._handle_message(event.topic, event.payload)
        elif event.kind == "connected":
            self.window.connected(event.session_present)
            log.info("connected to broker (session present: %s)", event.session_present)
        elif event.kind == "disconnected":
            log.warning("disconnected from broker: %s", event.reason)

    def _handle_message(self, topic: str, payload: bytes) -> None:
        try:
            ref = topics.parse(topic)
            if ref.channel == Channel.RECEIPT:
                self.window.receipt(Receipt.decode(payload))
                self.last_receipt_at = time.time()
            elif ref.channel == Channel.CMD:
                self.updater.submit(payload)
        except WireError as err:
            self.bad_receipts += 1
            log.warning("ignored malformed message on %s: %s", topic, err)

    def _sample_telemetry(self) -> None:
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1) * 100
        except OSError:
            load = 0.0
        body = {
            "cpu_pct": min(100.0, round(load, 1)),
            "mem_pct": _mem_pct(),
            "disk_pct": _disk_pct(self.settings.data_dir),
            "outbox_depth": self.outbox.depth,
        }
        try:
            self.outbox.enqueue("telemetry.sample", body)
        except (OutboxFull, InvalidEvent) as err:
            log.warning("telemetry sample not stored: %s", err)


def _disk_pct(path: os.PathLike[str]) -> float:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return 0.0
    return round(usage.used / usage.total * 100, 1) if usage.total else 0.0


def _mem_pct() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh if ":" in line}
        return round(100 * (1 - info["MemAvailable"] / info["MemTotal"]), 1)
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 0.0
