"""Run many simulated terminals (real agents) from one thread that plays their kiosk apps.

Everything reaches an agent the way a real kiosk app's requests do: events over HTTP to its local
API with idempotency keys, peripheral readings to its peripheral route. Each agent's local API is
served on its own loopback port for the fleet's lifetime (or until the agent stops).
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

import httpx

from fleet_dev.sim.kiosk import KioskClient, LocalApi, api_token, one_tokenless_warning
from fleet_dev.sim.traffic import (
    INCIDENT_READINGS,
    PlannedEvent,
    SimClock,
    TrafficModel,
    healthy_readings,
    load_catalogue,
)

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

STEP_S = 0.1  # real seconds between simulation steps
FAULTS_PER_TERMINAL_DAY = 1.5
READINGS_EVERY_S = 30.0  # real seconds between a kiosk app's routine peripheral reports (stale after 90+)
PAPER_PER_RECEIPT_PCT = 0.4  # an 80 m roll prints roughly 250 receipts


@dataclass
class FleetCounters:
    sessions: int = 0
    events_posted: int = 0
    refused: int = 0
    readings_posted: int = 0
    readings_refused: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


@dataclass
class _Kiosk:
    """One terminal's kiosk app: its HTTP client, its peripherals, the state of its printer roll."""

    terminal: str
    api: LocalApi
    client: KioskClient
    peripherals: dict[str, str]  # id -> kind, as the agent's profile lists them
    paper_left_pct: float = 100.0
    faults: dict[str, tuple[str, dict[str, float]]] = field(default_factory=dict)
    next_report: float = 0.0


class SimulatedFleet:
    def __init__(
        self,
        agents: Sequence["Agent"],
        clock: SimClock,
        *,
        seed: int = 7,
        peak_sessions_per_hour: float = 30.0,
        always_open: bool = False,
    ) -> None:
        self.clock = clock
        catalogue = load_catalogue()
        tids = [a.settings.terminal_id for a in agents]
        self.models = {
            tid: TrafficModel(
                catalogue,
                random.Random(f"{seed}-{tid}"),
                peak_sessions_per_hour=peak_sessions_per_hour,
                always_open=always_open,
            )
            for tid in tids
        }
        self.rng = random.Random(seed)
        self.counters = FleetCounters()
        self._due: list[tuple[float, int, str, PlannedEvent]] = []
        self._n = 0
        self._keys = uuid.uuid4().hex[:12]  # idempotency keys unique to this fleet run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kiosks: dict[str, _Kiosk] = {}
        try:
            with one_tokenless_warning():  # one line for the fleet, not one per terminal
                for agent in agents:
                    self.kiosks[agent.settings.terminal_id] = self._kiosk(agent)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _kiosk(agent: "Agent") -> _Kiosk:
        api = LocalApi(agent).start()
        client = KioskClient(api.url, api_token(agent))
        profile = client.peripherals()["profile"]
        kinds = {pid: str(p["kind"]) for pid, p in profile["peripherals"].items()}
        return _Kiosk(agent.settings.terminal_id, api, client, kinds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)  # a step ends at its next request; the clients close after it
        self.close()

    def close(self) -> None:
        """Stop serving the agents' local APIs (the agents themselves keep running)."""
        for kiosk in self.kiosks.values():
            kiosk.client.close()
            kiosk.api.stop()

    def step(self, real_now: float, dt_real: float) -> None:
        """Advance the simulation: start sessions, post the events and readings that are due."""
        local = self.clock.at(real_now)
        dt_sim = dt_real * self.clock.speed
        for tid, model in self.models.items():
            for _ in range(model.arrivals(local, dt_sim)):
                self.counters.sessions += 1
                for ev in model.session(tid, local):
                    self._plan(tid, ev)
            if model.rate_per_hour(local) and self.rng.random() < FAULTS_PER_TERMINAL_DAY * dt_sim / (9 * 3600):
                for ev in model.peripheral_incident(local):
                    if ev.body["peripheral"] in self.kiosks[tid].peripherals:  # only what this model carries
                        self._plan(tid, ev)
        now_ts = local.timestamp()
        while self._due and self._due[0][0] <= now_ts and not self._stop.is_set():
            _, _, tid, ev = heapq.heappop(self._due)
            self._post(tid, ev)
        for kiosk in self.kiosks.values():
            if real_now >= kiosk.next_report and not self._stop.is_set():
                # spread over the interval: 18 kiosk apps reporting in the same step stall the simulation
                kiosk.next_report = real_now + READINGS_EVERY_S * self.rng.uniform(0.5, 1.0)
                self._report_all(kiosk)

    def _plan(self, tid: str, ev: PlannedEvent) -> None:
        self._n += 1
        heapq.heappush(self._due, (ev.at.timestamp(), self._n, tid, ev))

    def _post(self, tid: str, ev: PlannedEvent) -> None:
        kiosk = self.kiosks[tid]
        self._n += 1
        key = f"sim.{self._keys}.{self._n}"
        try:
            r = kiosk.client.post_event(ev.type, ev.body, ev.at.astimezone(UTC).isoformat(), key)
        except httpx.HTTPError as err:
            self.counters.refused += 1
            log.warning("terminal %s: %s not posted: %s", tid, ev.type, err)
            return
        if r.status_code not in (200, 201):
            self.counters.refused += 1
            log.warning("terminal %s refused %s: %s %s", tid, ev.type, r.status_code, r.text[:200])
            return
        self.counters.events_posted += 1
        self.counters.by_type[ev.type] = self.counters.by_type.get(ev.type, 0) + 1
        self._follow(kiosk, ev)

    def _follow(self, kiosk: _Kiosk, ev: PlannedEvent) -> None:
        """What the peripherals say after this event (a receipt printed, a fault, its repair)."""
        if ev.type == "service.completed" and "receipt_printer" in kiosk.peripherals:
            kiosk.paper_left_pct = max(0.0, kiosk.paper_left_pct - PAPER_PER_RECEIPT_PCT)
            if kiosk.paper_left_pct <= 1:  # the office staff change the roll at the end of it
                kiosk.paper_left_pct = 100.0
            self._report(kiosk, "receipt_printer")
        elif ev.type == "peripheral.fault":
            peripheral = ev.body["peripheral"]
            kiosk.faults[peripheral] = (ev.body["message"], dict(INCIDENT_READINGS.get(ev.body["code"], {})))
            self._report(kiosk, peripheral)
        elif ev.type == "peripheral.recovered":
            peripheral = ev.body["peripheral"]
            kiosk.faults.pop(peripheral, None)
            if peripheral == "receipt_printer":
                kiosk.paper_left_pct = 100.0
            self._report(kiosk, peripheral)

    def _report_all(self, kiosk: _Kiosk) -> None:
        for peripheral, kind in kiosk.peripherals.items():
            if kind != "camera":  # the agent opens the camera itself
                self._report(kiosk, peripheral)

    def _report(self, kiosk: _Kiosk, peripheral: str) -> None:
        kind = kiosk.peripherals[peripheral]
        readings = healthy_readings(kind, self.rng)
        if kind == "receipt_printer":
            readings["paper_left_pct"] = round(kiosk.paper_left_pct, 1)
        fault = kiosk.faults.get(peripheral)
        if fault is not None:
            readings.update(fault[1])
        try:
            r = kiosk.client.post_readings(peripheral, readings, fault[0] if fault else None)
        except httpx.HTTPError as err:
            self.counters.readings_refused += 1
            log.warning("terminal %s: readings of %s not posted: %s", kiosk.terminal, peripheral, err)
            return
        if r.status_code == 200:
            self.counters.readings_posted += 1
        else:
            self.counters.readings_refused += 1
            log.warning("terminal %s refused readings of %s: %s", kiosk.terminal, peripheral, r.text[:200])

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(STEP_S):
            now = time.monotonic()
            try:
                self.step(time.time(), now - last)
            except Exception:
                log.exception("simulation step failed")
            last = now

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": self.counters.sessions,
            "events_posted": self.counters.events_posted,
            "refused": self.counters.refused,
            "readings_posted": self.counters.readings_posted,
            "by_type": dict(self.counters.by_type),
            "sim_time": self.clock.at(time.time()).isoformat(timespec="minutes"),
        }
