"""Run many simulated terminals (real agents) from one thread that plays their citizens."""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

from edge_agent.outbox.store import InvalidEvent, OutboxFull, OutboxStorageError
from fleet_dev.sim.traffic import PlannedEvent, SimClock, TrafficModel, load_catalogue

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

STEP_S = 0.1  # real seconds between simulation steps
FAULTS_PER_TERMINAL_DAY = 1.5


@dataclass
class FleetCounters:
    sessions: int = 0
    events_posted: int = 0
    refused: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


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
        self.agents = {a.settings.terminal_id: a for a in agents}
        self.clock = clock
        catalogue = load_catalogue()
        self.models = {
            tid: TrafficModel(
                catalogue,
                random.Random(f"{seed}-{tid}"),
                peak_sessions_per_hour=peak_sessions_per_hour,
                always_open=always_open,
            )
            for tid in self.agents
        }
        self.rng = random.Random(seed)
        self.counters = FleetCounters()
        self._due: list[tuple[float, int, str, PlannedEvent]] = []
        self._n = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def step(self, real_now: float, dt_real: float) -> None:
        """Advance the simulation: start sessions, post the events that are due."""
        local = self.clock.at(real_now)
        dt_sim = dt_real * self.clock.speed
        for tid, model in self.models.items():
            for _ in range(model.arrivals(local, dt_sim)):
                self.counters.sessions += 1
                for ev in model.session(tid, local):
                    self._plan(tid, ev)
            if model.rate_per_hour(local) and self.rng.random() < FAULTS_PER_TERMINAL_DAY * dt_sim / (9 * 3600):
                for ev in model.peripheral_incident(local):
                    self._plan(tid, ev)
        now_ts = local.timestamp()
        while self._due and self._due[0][0] <= now_ts:
            _, _, tid, ev = heapq.heappop(self._due)
            self._post(tid, ev)

    def _plan(self, tid: str, ev: PlannedEvent) -> None:
        self._n += 1
        heapq.heappush(self._due, (ev.at.timestamp(), self._n, tid, ev))

    def _post(self, tid: str, ev: PlannedEvent) -> None:
        agent = self.agents[tid]
        if ev.type == "peripheral.fault":
            agent.peripherals[ev.body["peripheral"]] = {"state": "fault", "code": ev.body["code"]}
        elif ev.type == "peripheral.recovered":
            agent.peripherals[ev.body["peripheral"]] = {"state": "ok"}
        try:
            agent.post_event(ev.type, ev.body, ts=ev.at.astimezone(UTC))
        except (OutboxFull, OutboxStorageError, InvalidEvent) as err:
            self.counters.refused += 1
            log.warning("terminal %s refused %s: %s", tid, ev.type, err)
            return
        self.counters.events_posted += 1
        self.counters.by_type[ev.type] = self.counters.by_type.get(ev.type, 0) + 1

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
            "by_type": dict(self.counters.by_type),
            "sim_time": self.clock.at(time.time()).isoformat(timespec="minutes"),
        }
