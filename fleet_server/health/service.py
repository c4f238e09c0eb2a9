"""Health of every terminal from heartbeats and Last Wills; alerts with flap suppression."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeGuard

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet_server.clock import utc_iso
from fleet_server.db import connect
from fleet_server.health.rules import (
    OFFLINE_AFTER_INTERVALS,
    STALE_AFTER_INTERVALS,
    Hysteresis,
    State,
    is_open,
    judge,
)
from fleet_server.health.store import HealthStore, migrations

log = logging.getLogger(__name__)

# one office: its terminals counted by state, and by agent version
Tally = tuple[collections.Counter[str], collections.Counter[str]]

__all__ = ["HealthLimits", "HealthService", "OfficeInfo", "PeripheralReport", "TerminalHealth", "migrations"]

DEFAULT_HB_INTERVAL_S = 30.0
# A terminal's claimed heartbeat interval is capped by its profile's; this one without a profile
# (the profile schema's own maximum): a status claiming 1e12 s must not keep a silent terminal online.
MAX_HB_INTERVAL_S = 600.0
MIN_HB_INTERVAL_S = 1.0
MAX_PERIPHERALS = 32
MAX_READINGS = 32
DISK_NEARLY_FULL_PCT = 90.0
OUTBOX_BACKLOG_OLD_S = 1800.0
OFFICE_MOSTLY_OFFLINE = 0.5
SEVERITY = {
    "terminal_offline": "warning",
    "office_offline": "critical",
    "disk_nearly_full": "warning",
    "outbox_backlog_old": "warning",
    "peripheral_failed": "warning",
    "peripheral_warn": "info",
}
# What a peripheral's state means to the centre (states as the agent reports them).
PERIPHERAL_OK = frozenset({"ok", "unknown"})
PERIPHERAL_WARN = frozenset({"warn", "stale"})


def _iso(ts: float) -> str:
    return utc_iso(ts)


def _parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(slots=True)
class TerminalHealth:
    terminal: str
    office: str
    state: State = State.MISSING
    reason: str = "never connected since enrolment"
    limits: HealthLimits = field(default_factory=lambda: HealthLimits())
    since: float = 0.0
    last_seen: float | None = None
    reported: str | None = None
    reported_reason: str = ""
    hb_interval_s: float = DEFAULT_HB_INTERVAL_S
    version: str | None = None
    outbox_depth: int = 0
    outbox_oldest_age_s: float = 0.0
    disk_pct: float = 0.0
    profile: str | None = None  # the profile the agent says it judges by
    peripherals: dict[str, PeripheralReport] = field(default_factory=dict)
    host: PeripheralReport | None = None

    @property
    def heartbeat_interval_s(self) -> float:
        """The interval it is judged by: what it claims, capped by its device profile."""
        return min(self.hb_interval_s, self.limits.max_hb_interval_s)

    def public(self) -> dict[str, Any]:
        return {
            "terminal": self.terminal,
            "office": self.office,
            "state": self.state.value,
            "reason": self.reason,
            "since": _iso(self.since) if self.since else None,
            "last_seen": _iso(self.last_seen) if self.last_seen else None,
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "agent_version": self.version,
            "outbox": {"depth": self.outbox_depth, "oldest_age_s": self.outbox_oldest_age_s},
            "disk_pct": self.disk_pct,
            "profile_reported": self.profile,
            "peripherals": {k: v.public() for k, v in self.peripherals.items()},
            "host": self.host.public() if self.host else None,
        }


@dataclass(frozen=True, slots=True)
class PeripheralReport:
    """One peripheral as the terminal judged it by its device profile."""

    state: str
    check: str | None = None  # the check that set the state ("fault" for a fault)
    reading: dict[str, float] = field(default_factory=dict)
    limit: float | None = None  # the threshold `check` crossed
    since: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.state not in PERIPHERAL_OK and self.state not in PERIPHERAL_WARN

    @property
    def warned(self) -> bool:
        return self.state in PERIPHERAL_WARN

    def explain(self) -> str:
        """Why, in plain words: the reading and the threshold it crossed, or the fault."""
        if self.error and (self.check == "fault" or self.check is None):
            why = self.error
        elif self.check is not None and self.check in self.reading:
            why = f"{self.check} is {self.reading[self.check]:g}"
            if self.limit is not None:
                why += f" ({self.state} threshold {self.limit:g})"
        elif self.state == "stale":
            why = "no fresh reading (is the kiosk app reporting?)"
        else:
            why = self.state
        return why + (f", since {self.since}" if self.since else "")

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "check": self.check,
            "reading": dict(self.reading),
            "limit": self.limit,
            "since": self.since,
            "error": self.error,
        }

    @classmethod
    def parse(cls, raw: Any) -> PeripheralReport:
        """Read one entry of a status document's `peripherals` (an old agent sends a bare state)."""
        if isinstance(raw, str):
            return cls(raw[:16])
        if not isinstance(raw, dict):
            raise TypeError(f"peripheral entry is {type(raw).__name__}, not an object")
        reading = {
            str(k)[:64]: float(v) for k, v in list((raw.get("reading") or {}).items())[:MAX_READINGS] if _number(v)
        }
        limit: Any = raw.get("limit")
        return cls(
            str(raw.get("state", "unknown"))[:16],
            str(raw["check"])[:64] if raw.get("check") is not None else None,
            reading,
            float(limit) if _number(limit) else None,
            str(raw["since"])[:40] if raw.get("since") else None,
            str(raw["error"])[:200] if raw.get("error") else None,
        )


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, slots=True)
class HealthLimits:
    """What a terminal model's profile says about judging it (defaults when it has none)."""

    stale_after: float = STALE_AFTER_INTERVALS
    offline_after: float = OFFLINE_AFTER_INTERVALS
    disk_fail_pct: float = DISK_NEARLY_FULL_PCT
    peripherals: frozenset[str] | None = None  # None (or a model listing none): judge what is reported
    max_hb_interval_s: float = MAX_HB_INTERVAL_S  # the profile's heartbeat interval


@dataclass(frozen=True, slots=True)
class OfficeInfo:
    id: str
    hours: dict[str, str]
    timezone: str


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.terminals = Gauge(
            "fleet_terminals", "Terminals by office and health state", ["office", "state"], registry=registry
        )
        self.alerts_active = Gauge("fleet_alerts_active", "Alerts firing now", ["kind", "severity"], registry=registry)
        self.alerts_raised = Counter("fleet_alerts_raised_total", "Alerts raised", ["kind"], registry=registry)
        self.outbox_age = Gauge(
            "fleet_office_outbox_oldest_age_seconds",
            "Oldest unsent event over the office's terminals",
            ["office"],
            registry=registry,
        )
        self.disk = Gauge(
            "fleet_office_disk_used_ratio_max",
            "Fullest terminal disk in the office (0-1)",
            ["office"],
            registry=registry,
        )
        self.peripherals = Gauge(
            "fleet_peripherals_failed",
            "Terminals whose peripheral reports a fault",
            ["office", "peripheral"],
            registry=registry,
        )


class HealthService:
    def __init__(
        self,
        db_path: str,
        terminals: Callable[[], dict[str, str]],
        offices: Callable[[], list[OfficeInfo]],
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
        alert_for_s: float = 120.0,
        alert_clear_s: float = 60.0,
        limits: Callable[[], dict[str, HealthLimits]] | None = None,
    ) -> None:
        self._db_path = db_path
        self._terminals_source = terminals
        # terminal id → the limits of its model (from its device profile), read with the registry
        self._limits_source = limits or (lambda: {})
        self._offices_source = offices
        self.metrics = HealthMetrics(registry)
        self._clock = clock
        self.alert_for_s = alert_for_s
        self.alert_clear_s = alert_clear_s
        self._lock = threading.Lock()
        # Held by a sweep from its first state change until its transitions are committed and its
        # gauges set, and by terminal() while it reads: a reader never sees a new state whose
        # transition is not recorded yet (taken before `_lock`, never inside it).
        self._sweep_lock = threading.Lock()
        self._health: dict[str, TerminalHealth] = {}
        self._offices: dict[str, OfficeInfo] = {}
        self._alerts: dict[tuple[str, str], Hysteresis] = {}
        self._alert_rows: dict[tuple[str, str], int] = {}
        self._conn = connect(db_path)
        self._store = HealthStore(self._conn)
        self._load()

    def _load(self) -> None:
        self.refresh_registry()
        for terminal, state, reason, last_seen, doc in self._store.status_rows():
            h = self._health.get(terminal)
            if h is not None:
                self._apply(h, state, reason, _parse_iso(last_seen), doc)
        for aid, kind, subject in self._store.firing_alerts():
            hy = Hysteresis(self.alert_for_s, self.alert_clear_s, firing=True)
            self._alerts[(kind, subject)] = hy
            self._alert_rows[(kind, subject)] = aid
        for terminal, state, at in self._store.last_transitions():
            h = self._health.get(terminal)
            if h is not None:
                h.state, h.since = State(state), _parse_iso(at)

    def refresh_registry(self) -> None:
        """Pick up enrolled / revoked terminals and office hours."""
        terminals = self._terminals_source()
        limits = self._limits_source()
        offices = {o.id: o for o in self._offices_source()}
        now = self._clock()
        with self._lock:
            self._offices = offices
            for tid, office in terminals.items():
                if tid not in self._health:
                    self._health[tid] = TerminalHealth(tid, office, since=now)
                else:
                    self._health[tid].office = office
                self._health[tid].limits = limits.get(tid) or HealthLimits()
            for tid in list(self._health):
                if tid not in terminals:
                    del self._health[tid]

    # -- input -----------------------------------------------------------------------------------

    def on_status(self, rows: list[tuple[str, str, str, str, str, str]]) -> None:
        """Ingest hook: birth, heartbeat, graceful offline or Last Will of some terminals."""
        with self._lock:
            for terminal, state, reason, _, at, doc in rows:
                h = self._health.get(terminal)
                if h is not None:
                    self._apply(h, state, reason, _parse_iso(at), doc)

    @staticmethod
    def _apply(h: TerminalHealth, state: str, reason: str, at: float, doc_json: str) -> None:
        h.reported, h.reported_reason, h.last_seen = state, reason, at
        try:
            doc = json.loads(doc_json)
        except ValueError:
            return
        if not isinstance(doc, dict) or state != "online":
            return
        try:
            claimed = doc.get("hb_interval_s", h.hb_interval_s)
            if _number(claimed):  # the profile's cap applies when judging (TerminalHealth.heartbeat_interval_s)
                h.hb_interval_s = max(MIN_HB_INTERVAL_S, float(claimed))
            h.version = str(doc["version"])[:64] if "version" in doc else h.version
            outbox = doc.get("outbox") or {}
            h.outbox_depth = int(outbox.get("depth", 0))
            h.outbox_oldest_age_s = float(outbox.get("oldest_age_s", 0.0))
            h.disk_pct = float(doc.get("disk_pct", 0.0))
            h.profile = str(doc["profile"])[:64] if doc.get("profile") else None
            h.peripherals = {
                str(k)[:32]: PeripheralReport.parse(v)
                for k, v in list((doc.get("peripherals") or {}).items())[:MAX_PERIPHERALS]
            }
            h.host = PeripheralReport.parse(doc["host"]) if doc.get("host") else None
        except (TypeError, ValueError, AttributeError):
            log.info("terminal %s sent a status document with odd fields; kept what was readable", h.terminal)

    # -- the sweep -------------------------------------------------------------------------------

    def sweep(self) -> list[tuple[str, str, str, str]]:
        """Recompute states, record transitions, fire and resolve alerts, update gauges."""
        with self._sweep_lock:
            return self._sweep()

    def _sweep(self) -> list[tuple[str, str, str, str]]:
        now = self._clock()
        at = _iso(now)
        transitions: list[tuple[str, str, str, str]] = []
        with self._lock:
            healths = list(self._health.values())
            for h in healths:
                v = judge(
                    h.last_seen,
                    h.reported,
                    h.reported_reason,
                    h.heartbeat_interval_s,
                    now,
                    h.limits.stale_after,
                    h.limits.offline_after,
                )
                if v.state != h.state:
                    transitions.append((h.terminal, h.state.value, v.state.value, v.reason))
                    h.state, h.since = v.state, now
                h.reason = v.reason
            conditions = self._conditions(healths, now)
            offices = dict(self._offices)
        fired, resolved = [], []
        for key, (cond, office, message) in conditions.items():
            hy = self._alerts.setdefault(key, Hysteresis(self.alert_for_s, self.alert_clear_s))
            outcome = hy.update(cond, now)
            if outcome == "fire":
                fired.append((key, office, message))
            elif outcome == "resolve":
                resolved.append(key)
        for key, hy in list(self._alerts.items()):
            if key not in conditions:  # the subject is gone (revoked terminal): resolve at once
                if hy.firing:
                    resolved.append(key)
                del self._alerts[key]
        self._persist(at, transitions, fired, resolved)
        self._export(healths, offices)
        return transitions

    def _conditions(self, healths: list[TerminalHealth], now: float) -> dict[tuple[str, str], tuple[bool, str, str]]:
        """Alert conditions worth looking at: every true one, plus every one with alert state.

        A false condition with no pending or firing alert needs no bookkeeping (nor a message);
        skipping those keeps a sweep over 10,000 healthy terminals cheap: a terminal with no alert
        state costs a few comparisons, and keys and messages are made only for what is true.
        """
        moment = datetime.fromtimestamp(now, UTC)
        known = self._alerts
        # terminals with any alert state (subjects are "t" or "t:peripheral"; office ids may
        # land here too, which only sends that terminal-named id down the full path)
        tracked = {subject.split(":", 1)[0] for _, subject in known}
        out: dict[tuple[str, str], tuple[bool, str, str]] = {}
        open_now: dict[str, bool] = {}
        by_office: dict[str, list[TerminalHealth]] = {}
        offline, missing = State.OFFLINE, State.MISSING
        for h in healths:
            o = h.office
            members = by_office.get(o)
            if members is None:
                members = by_office[o] = []
                office = self._offices.get(o)
                open_now[o] = office is None or is_open(office.hours, office.timezone, moment)
            members.append(h)
            t, state = h.terminal, h.state
            full = t in tracked
            cond = state is offline and open_now[o]
            if cond or (full and ("terminal_offline", t) in known):
                out[("terminal_offline", t)] = (cond, o, f"terminal {t} is offline during opening hours: {h.reason}")
            live = state is not missing
            cond = live and h.disk_pct >= h.limits.disk_fail_pct
            if cond or (full and ("disk_nearly_full", t) in known):
                out[("disk_nearly_full", t)] = (cond, o, f"terminal {t} disk is {h.disk_pct:.0f}% full")
            cond = h.outbox_oldest_age_s >= OUTBOX_BACKLOG_OLD_S
            if cond or (full and ("outbox_backlog_old", t) in known):
                out[("outbox_backlog_old", t)] = (
                    cond,
                    o,
                    f"terminal {t} has events waiting for {h.outbox_oldest_age_s / 60:.0f} min",
                )
            judged_names = h.limits.peripherals  # None: judge what is reported
            reports = [
                (name, p)
                for name, p in h.peripherals.items()
                # not part of this model: nothing to page anyone about
                if judged_names is None or name in judged_names
            ]
            if h.host is not None:
                reports.append(("host", h.host))
            for name, p in reports:
                failed, warned = live and p.failed, live and p.warned
                if not (failed or warned or full):
                    continue
                subject = f"{t}:{name}"
                key = ("peripheral_failed", subject)
                if failed or key in known:
                    out[key] = (failed, o, f"{name} on terminal {t} failed: {p.explain()}")
                key = ("peripheral_warn", subject)
                if warned or key in known:
                    out[key] = (warned, o, f"{name} on terminal {t} needs attention: {p.explain()}")
        for office_id, members in by_office.items():
            down = sum(1 for h in members if h.state is offline)
            key = ("office_offline", office_id)
            cond = len(members) >= 2 and down / len(members) > OFFICE_MOSTLY_OFFLINE
            if cond or key in known:
                out[key] = (cond, office_id, f"{down} of {len(members)} terminals of office {office_id} are offline")
        return out

    def _persist(
        self,
        at: str,
        transitions: list[tuple[str, str, str, str]],
        fired: list[tuple[tuple[str, str], str, str]],
        resolved: list[tuple[str, str]],
    ) -> None:
        if not (transitions or fired or resolved):
            return
        resolved_ids = [aid for key in resolved if (aid := self._alert_rows.pop(key, None)) is not None]
        ids = self._store.record(
            at,
            transitions,
            [(kind, subject, office, SEVERITY[kind], message) for (kind, subject), office, message in fired],
            resolved_ids,
        )
        for ((kind, subject), _, _), aid in zip(fired, ids, strict=True):
            self._alert_rows[(kind, subject)] = aid
        for (kind, _subject), _, message in fired:
            self.metrics.alerts_raised.labels(kind).inc()
            log.warning("alert %s: %s", kind, message)
        if len(transitions) > 20:  # a broker restart moves thousands at once: one line, not thousands
            moves: dict[tuple[str, str], int] = {}
            for _, a, b, _ in transitions:
                moves[(a, b)] = moves.get((a, b), 0) + 1
            log.info(
                "%d terminals changed state: %s",
                len(transitions),
                ", ".join(f"{n} {a}→{b}" for (a, b), n in sorted(moves.items())),
            )
        else:
            for t, a, b, r in transitions:
                log.info("terminal %s: %s → %s (%s)", t, a, b, r)

    def _export(self, healths: list[TerminalHealth], offices: dict[str, OfficeInfo]) -> None:
        # tallied by State member (hashing an enum's .value costs a descriptor call each), named once
        by_state: dict[tuple[str, State], int] = {}
        age: dict[str, float] = {o: 0.0 for o in offices}
        disk: dict[str, float] = {o: 0.0 for o in offices}
        periph: dict[tuple[str, str], int] = {}
        for h in healths:
            o = h.office
            key = (o, h.state)
            by_state[key] = by_state.get(key, 0) + 1
            if h.outbox_oldest_age_s > age.get(o, 0.0):
                age[o] = h.outbox_oldest_age_s
            if h.disk_pct / 100.0 > disk.get(o, 0.0):
                disk[o] = h.disk_pct / 100.0
            for name, p in h.peripherals.items():
                pkey = (o, name)
                periph[pkey] = periph.get(pkey, 0) + p.failed
        counts: dict[tuple[str, str], int] = {(o, s.value): 0 for o in offices for s in State}
        for (office, state), n in by_state.items():
            counts[(office, state.value)] = n
        for (office, state_name), n in counts.items():
            self.metrics.terminals.labels(office, state_name).set(n)
        for office, v in age.items():
            self.metrics.outbox_age.labels(office).set(v)
        for office, v in disk.items():
            self.metrics.disk.labels(office).set(v)
        for (office, name), n in periph.items():
            self.metrics.peripherals.labels(office, name).set(n)
        active: dict[tuple[str, str], int] = {(k, s): 0 for k, s in SEVERITY.items()}
        for (kind, _), hy in self._alerts.items():
            if hy.firing:
                active[(kind, SEVERITY[kind])] += 1
        for (kind, sev), n in active.items():
            self.metrics.alerts_active.labels(kind, sev).set(n)

    # -- queries ---------------------------------------------------------------------------------

    def terminals(self, offices: list[str] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                h.public()
                for h in sorted(self._health.values(), key=lambda h: h.terminal)
                if offices is None or h.office in offices
            ]

    def terminal(self, terminal_id: str) -> dict[str, Any] | None:
        """One terminal's health with its transitions, newest first; the state and the transitions
        agree (a sweep that changed the state has recorded the change by then)."""
        with self._sweep_lock:
            with self._lock:
                h = self._health.get(terminal_id)
                doc = h.public() if h else None
            if doc is None:
                return None
            with connect(self._db_path, readonly=True) as conn:
                doc["transitions"] = HealthStore(conn).transitions(terminal_id)
        return doc

    def office_tallies(
        self, offices: list[str] | None = None
    ) -> dict[str, tuple[collections.Counter[str], collections.Counter[str]]]:
        """Per office, its terminals counted by state and by agent version ("?" unknown), from one
        snapshot (so the two always agree): what an overview needs without a record per terminal."""
        out: dict[str, Tally] = {}
        with self._lock:
            for h in self._health.values():
                if offices is not None and h.office not in offices:
                    continue
                tally = out.get(h.office)
                if tally is None:
                    tally = out[h.office] = (collections.Counter(), collections.Counter())
                tally[0][h.state.value] += 1
                tally[1][h.version or "?"] += 1
        return out

    def offices(self, offices: list[str] | None = None) -> list[dict[str, Any]]:
        summary: dict[str, dict[str, Any]] = {}
        with self._lock:
            for h in self._health.values():
                if offices is not None and h.office not in offices:
                    continue
                s = summary.setdefault(h.office, {"office": h.office, "terminals": 0, **{st.value: 0 for st in State}})
                s["terminals"] += 1
                s[h.state.value] += 1
        return sorted(summary.values(), key=lambda s: s["office"])

    def alerts(
        self, active_only: bool = True, offices: list[str] | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Newest first; a manager's offices are filtered in SQL, before the limit."""
        with connect(self._db_path, readonly=True) as conn:
            return HealthStore(conn).alerts(active_only, offices, limit)

    def close(self) -> None:
        self._conn.close()
