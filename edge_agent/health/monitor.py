"""The agent's view of its peripherals: latest readings, probes on a timer, states for the heartbeat.

Probes run in their own short-lived threads, started from the monitor's thread, never from the
pump: a camera that hangs in its driver costs one stuck probe thread (reported as a fault after the
probe timeout, and not started again while it hangs), never a late heartbeat or a stalled outbox.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge_agent.health.evaluate import Judgement, PeripheralRecord, Reading, describe, judge
from edge_agent.health.probes import ProbeResult
from edge_agent.health.profile import HOST_ID, AgentProfile, PeripheralSpec
from fleet_wire.profile_checks import CheckState

log = logging.getLogger(__name__)

STALE_AFTER_INTERVALS = 3.0  # three reporting intervals without a reading: stale
MONITOR_TICK_S = 0.5
MAX_READINGS_PER_REPORT = 32

Probe = Callable[[], ProbeResult]


class ReadingRefused(ValueError):
    """A kiosk-app report the profile cannot judge; `code` names the reason for the HTTP answer."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass(slots=True)
class _ProbeSlot:
    peripheral: str
    probe: Probe
    interval_s: float
    next_at: float = 0.0
    thread: threading.Thread | None = None
    started: float = 0.0
    timed_out: bool = False


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class HealthMonitor:
    def __init__(
        self,
        profile: AgentProfile,
        probes: dict[str, Probe],
        *,
        clock: Callable[[], float] = time.time,
        probe_interval_s: float | None = None,
        probe_timeout_s: float = 10.0,
        stale_after_s: float | None = None,
        name: str = "health",
    ) -> None:
        """`probes` maps a peripheral id (or `host`) to what measures it; the rest wait for the kiosk app."""
        self.profile = profile
        self._clock = clock
        self._probe_timeout_s = probe_timeout_s
        self._stale_override = stale_after_s
        self._interval_override = probe_interval_s
        self._lock = threading.Lock()
        self._started_at = clock()
        self._records: dict[str, PeripheralRecord] = {s.id: PeripheralRecord() for s in self._specs()}
        self._since: dict[str, tuple[CheckState, str | None, float]] = {}
        self._slots = [
            _ProbeSlot(pid, probe, self._interval(spec))
            for pid, probe in probes.items()
            if (spec := profile.spec(pid)) is not None
        ]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = name

    def _specs(self) -> list[PeripheralSpec]:
        return [self.profile.host, *self.profile.peripherals]

    def _interval(self, spec: PeripheralSpec) -> float:
        return self._interval_override or spec.probe_interval_s

    def stale_after_s(self, spec: PeripheralSpec) -> float:
        return self._stale_override or STALE_AFTER_INTERVALS * self._interval(spec)

    # -- input -----------------------------------------------------------------------------------

    def report(self, peripheral: str, readings: dict[str, float], fault: str | None = None) -> dict[str, Any]:
        """A reading from the kiosk app (or a probe); returns the peripheral's state after it."""
        spec = self.profile.spec(peripheral)
        if spec is None or spec.id == HOST_ID:
            known = ", ".join(p.id for p in self.profile.peripherals) or "none"
            raise ReadingRefused(
                "unknown_peripheral",
                f"this terminal's device profile ({self.profile.id}) has no peripheral {peripheral!r}; known: {known}",
            )
        self._check(spec, readings)
        self._store(spec, ProbeResult(dict(readings), fault))
        return self.state(peripheral)

    def _check(self, spec: PeripheralSpec, readings: dict[str, float]) -> None:
        if len(readings) > MAX_READINGS_PER_REPORT:
            raise ReadingRefused("too_many_readings", f"at most {MAX_READINGS_PER_REPORT} readings per report")
        for name, value in readings.items():
            if name not in spec.checks:
                raise ReadingRefused(
                    "unknown_check",
                    f"{spec.id} ({spec.kind}) has no check {name!r}; its checks: {', '.join(spec.checks)}",
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ReadingRefused("bad_reading", f"{spec.id}.{name}: {value!r} is not a finite number")

    def _store(self, spec: PeripheralSpec, result: ProbeResult) -> None:
        now = self._clock()
        with self._lock:
            rec = self._records[spec.id]
            for name, value in result.readings.items():
                rec.readings[name] = Reading(float(value), now)
            rec.fault, rec.fault_at = (result.fault[:200], now) if result.fault else (None, 0.0)
            rec.unavailable = result.unavailable

    # -- probes ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._slots and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def probe_now(self) -> None:
        """Run every probe once and wait for each (up to the probe timeout): for tests and `doctor`."""
        for slot in self._slots:
            self._launch(slot, time.monotonic())
        for slot in self._slots:
            if slot.thread is not None:
                slot.thread.join(self._probe_timeout_s)
        self._watch(time.monotonic(), force=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self._slots:
                if now >= slot.next_at:
                    self._launch(slot, now)
            self._watch(now)
            self._stop.wait(MONITOR_TICK_S)

    def _launch(self, slot: _ProbeSlot, now: float) -> None:
        if slot.thread is not None and slot.thread.is_alive():
            return  # still running (or hung): never pile up probe threads
        slot.next_at = now + slot.interval_s
        slot.started, slot.timed_out = now, False
        slot.thread = threading.Thread(target=self._probe, args=(slot,), name=f"probe-{slot.peripheral}", daemon=True)
        slot.thread.start()

    def _probe(self, slot: _ProbeSlot) -> None:
        spec = self.profile.spec(slot.peripheral)
        assert spec is not None
        try:
            result = slot.probe()
        except Exception as err:  # a probe must never take the monitor down
            log.exception("probe of %s failed", slot.peripheral)
            result = ProbeResult(fault=f"probe failed: {err}")
        self._store(spec, result)

    def _watch(self, now: float, force: bool = False) -> None:
        for slot in self._slots:
            t = slot.thread
            hung = t is not None and t.is_alive() and (force or now - slot.started > self._probe_timeout_s)
            if hung and not slot.timed_out:
                slot.timed_out = True
                spec = self.profile.spec(slot.peripheral)
                assert spec is not None
                log.warning("probe of %s did not answer within %g s", slot.peripheral, self._probe_timeout_s)
                self._store(spec, ProbeResult(fault=f"probe did not answer within {self._probe_timeout_s:g} s"))

    # -- output ----------------------------------------------------------------------------------

    def _judge(self, spec: PeripheralSpec, now: float) -> tuple[Judgement, float]:
        j = judge(spec.checks, self._records[spec.id], now, self.stale_after_s(spec), self._started_at)
        prev = self._since.get(spec.id)
        if prev is None or prev[:2] != (j.state, j.check):
            self._since[spec.id] = (j.state, j.check, now)
            return j, now
        return j, prev[2]

    def _wire(self, spec: PeripheralSpec, now: float) -> dict[str, Any]:
        j, since = self._judge(spec, now)
        return {
            "state": j.state.value,
            "check": j.check,
            "reading": dict(j.reading),
            "limit": j.limit,
            "since": _iso(since),
            "error": j.error,
        }

    def state(self, peripheral: str) -> dict[str, Any]:
        """One peripheral's state as the heartbeat carries it."""
        spec = self.profile.spec(peripheral)
        assert spec is not None
        with self._lock:
            return self._wire(spec, self._clock())

    def peripherals(self) -> dict[str, dict[str, Any]]:
        """Every profile peripheral's state: `{id: {state, check, reading, limit, since, error}}`."""
        now = self._clock()
        with self._lock:
            return {s.id: self._wire(s, now) for s in self.profile.peripherals}

    def host(self) -> dict[str, Any]:
        """The host's own checks (disk, memory, CPU temperature), in the same shape."""
        with self._lock:
            return self._wire(self.profile.host, self._clock())

    def problems(self) -> list[str]:
        """What is wrong, in plain words, one line per peripheral that is not ok."""
        now = self._clock()
        out: list[str] = []
        with self._lock:
            for spec in self._specs():
                j, since = self._judge(spec, now)
                if j.state is CheckState.OK or (j.state is CheckState.UNKNOWN and j.error == "no reading yet"):
                    continue
                line = describe(spec.id, spec.required, j, spec.checks, self.stale_after_s(spec))
                out.append(f"{line} (since {_iso(since)})")
        return out
