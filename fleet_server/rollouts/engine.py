"""The rollout control loop: level-triggered, one tick about once a second.

Desired state lives in the rollout tables. Each tick
1. reads the `update.status` events stored since its high-water mark (by rowid; the ingest stores
   each exactly once) and applies every report newer than the last one applied for the terminal's
   current command, so duplicates and reordering change nothing;
2. times out states that lasted too long (server-side `timed_out`) and retries transient failures
   with back-off, up to the plan's limit;
3. (re-)sends `DesiredRelease` to each terminal of an active wave that has not reported on its
   current command, with back-off, and at once when the terminal comes back online — never before
   the start of the plan's install period (`window_start`); its end (`window_end`) goes out as the
   command's deadline (the earlier of it and the plan's deadline);
4. judges the current wave's gate: too many failures halt the rollout (the reason in words); every
   terminal finished, the committed ones healthy through the soak, passes it (advance, or wait for
   an admin's approval);
and writes all of it in one transaction. Everything is read and written in batches: a tick costs a
few statements whatever the number of terminals.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet_server.rollouts.metrics import RolloutMetrics
from fleet_server.rollouts.planner import OfficeRef, TerminalInfo, matches
from fleet_server.rollouts.releases import fits
from fleet_server.rollouts.schemas import (
    DEFAULT_TIMEOUTS,
    FAILED,
    FINAL,
    LIVE,
    NOT_COUNTED,
    TRANSIENT_REASONS,
    RolloutPlan,
)
from fleet_server.rollouts.store import (
    T_ATTEMPTS,
    T_CMD,
    T_DETAIL,
    T_LAST_SENT,
    T_NEXT_SEND,
    T_OFFICE,
    T_REASON,
    T_REPORT,
    T_RETRY_AT,
    T_ROLLOUT,
    T_SENDS,
    T_STATE,
    T_STATE_SINCE,
    T_TERMINAL,
    T_WAVE,
    RolloutStore,
)
from fleet_wire import topics
from fleet_wire.envelope import format_ts
from fleet_wire.release import REASONS, UPDATE_STATES, DesiredRelease, MaintenanceWindow
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

REPORTS_PER_TICK = 50_000  # events looked at per tick; the rest waits for the next one


@dataclass(frozen=True, slots=True)
class TerminalCondition:
    """What the health service says about one terminal, as far as a rollout cares."""

    healthy: bool
    why: str = ""  # when not healthy: "offline", "camera failing", …
    online_since: float | None = None  # when it last came (back) online
    state: str = "online"  # the health service's state: online, stale, offline, missing
    disk_pct: float | None = None


@dataclass(frozen=True, slots=True)
class EngineSettings:
    resend_initial_s: float = 5.0
    resend_max_s: float = 300.0
    retry_initial_s: float = 30.0
    retry_max_s: float = 1800.0


@dataclass(slots=True)
class TickStats:
    reports: int = 0
    applied: int = 0
    sent: int = 0
    timed_out: int = 0
    retried: int = 0
    joined: int = 0
    terminals: int = 0
    halted: list[str] = field(default_factory=list)
    seconds: float = 0.0


def describe_reason(reason: str, detail: str = "") -> str:
    text = REASONS.get(reason, reason.replace("_", " "))
    return f"{text} ({reason}{': ' + detail if detail else ''})"


def _window(office: OfficeRef | None) -> MaintenanceWindow | None:
    if office is None:
        return None
    start, _, end = office.maintenance.partition("-")
    return MaintenanceWindow(tz=office.timezone, start=start.strip(), end=end.strip())


def effective_deadline(plan: RolloutPlan) -> datetime | None:
    """What the command carries as its deadline: the end of the plan's install period acts as one,
    and the earlier of the two applies."""
    ends = [d for d in (plan.deadline, plan.window_end) if d is not None]
    return min(ends) if ends else None


def not_started(plan: RolloutPlan, now: float) -> bool:
    """Whether the plan's install period is still to come: nothing is sent before its start."""
    return plan.window_start is not None and now < plan.window_start.timestamp()


def _ts(at: float) -> str:
    return format_ts(datetime.fromtimestamp(at, UTC))


class _Payloads:
    """The command of one rollout for one office, encoded once; each terminal's differs only in
    its id (a 32-hex placeholder is replaced), so ten thousand sends cost one model validation."""

    PLACEHOLDER = "f" * 32

    def __init__(self, rollout: dict[str, Any], plan: RolloutPlan, offices: Mapping[str, OfficeRef]) -> None:
        self.rollout, self.plan, self.offices = rollout, plan, offices
        self._cache: dict[str, tuple[bytes, bytes]] = {}

    def payload(self, office: str, cmd: str, now: float) -> bytes:
        parts = self._cache.get(office)
        if parts is None:
            r, plan = self.rollout, self.plan
            window = None if plan.window == "now" else _window(self.offices.get(office))
            msg = DesiredRelease(
                id=self.PLACEHOLDER,
                rollout=r["id"],
                kind=r["kind"],
                target=r["release"],
                version=r["version"],
                counter=r["counter"],
                window=window,
                deadline=format_ts(until) if (until := effective_deadline(plan)) is not None else None,
                gate_s=plan.gate_s,
                issued=_ts(now),
            )
            head, _, tail = msg.to_payload().partition(self.PLACEHOLDER.encode())
            parts = self._cache[office] = (head, tail)
        return parts[0] + cmd.encode() + parts[1]


class _Lazy(Mapping[str, TerminalCondition]):
    """The health snapshot, fetched on first use: a tick that only waits never builds it."""

    def __init__(self, source: Callable[[], Mapping[str, TerminalCondition]]) -> None:
        self._source = source
        self._data: Mapping[str, TerminalCondition] | None = None

    def _get(self) -> Mapping[str, TerminalCondition]:
        if self._data is None:
            self._data = self._source()
        return self._data

    def __getitem__(self, key: str) -> TerminalCondition:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class RolloutEngine:
    def __init__(
        self,
        store: RolloutStore,
        lock: threading.RLock,
        publish: Callable[[str, bytes], None],
        *,
        terminals: Callable[[], list[TerminalInfo]],
        offices: Callable[[], dict[str, OfficeRef]],
        health: Callable[[], Mapping[str, TerminalCondition]],
        metrics: RolloutMetrics,
        settings: EngineSettings | None = None,
        clock: Callable[[], float] = time.time,
        on_halt_rollback: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.lock = lock
        self.publish = publish
        self._terminals = terminals
        self._offices = offices
        self._health = health
        self.metrics = metrics
        self.settings = settings or EngineSettings()
        self.clock = clock
        self.on_halt_rollback = on_halt_rollback
        self.registry_dirty = True  # look for terminals enrolled since: at start and after each change
        self.last = TickStats()

    def registry_changed(self) -> None:
        self.registry_dirty = True

    # -- the tick ------------------------------------------------------------------------------------

    def tick(self) -> TickStats:
        started = time.perf_counter()
        stats = TickStats()
        outbox: list[tuple[str, bytes]] = []
        rollbacks: list[tuple[str, str]] = []
        with self.lock:
            now = self.clock()
            st = self.store
            c = st.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                self._tick(now, stats, outbox, rollbacks)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        # after the commit: a crash before these leaves last_sent set, and the back-off re-sends
        for topic, payload in outbox:
            try:
                self.publish(topic, payload)
            except Exception:
                log.warning("could not hand a desired-release command to the broker for %s; re-sent later", topic)
        stats.sent = len(outbox)
        for rid, reason in rollbacks:
            if self.on_halt_rollback is not None:
                try:
                    self.on_halt_rollback(rid, reason)
                except Exception:
                    log.exception("automatic rollback of %s failed", rid)
        stats.seconds = time.perf_counter() - started
        self.metrics.tick_seconds.observe(stats.seconds)
        self.last = stats
        return stats

    def _tick(
        self, now: float, stats: TickStats, outbox: list[tuple[str, bytes]], rollbacks: list[tuple[str, str]]
    ) -> None:
        st = self.store
        live = st.rollouts(LIVE)
        if self.registry_dirty:
            self.registry_dirty = False
            stats.joined = self._join_newcomers(now, live)
            if stats.joined:
                live = st.rollouts(LIVE)
        by_id = {r["id"]: r for r in live}
        plans = {rid: RolloutPlan.model_validate(r["plan"]) for rid, r in by_id.items()}
        rows = {(r[T_ROLLOUT], r[T_TERMINAL]): r for r in st.terminal_rows(list(by_id))}
        stats.terminals = len(rows)
        changed: dict[tuple[str, str], list[Any]] = {}
        history: list[tuple[str, str, float, str, str, str, str, str, int, str]] = []

        # 1. reports
        cursor = st.cursor()
        if cursor and cursor > st.last_event_rowid():
            # the event table was emptied below the mark (rowids start again): read it from the start;
            # applying a report twice changes nothing
            log.warning("event table shrank below the rollout engine's mark %d; reading it again", cursor)
            cursor = 0
        upto, reports = st.reports_after(cursor, REPORTS_PER_TICK)
        stats.reports = len(reports)
        if reports:
            self._apply_reports(now, reports, rows, plans, changed, history, stats)
        st.set_cursor(upto)

        waves = st.waves(list(by_id))
        offices = self._offices() if by_id else {}
        health = _Lazy(self._health)  # asked once per tick, and only when a decision needs it
        wave_changes: list[dict[str, Any]] = []
        members: dict[tuple[str, int], list[list[Any]]] = {}
        for row in rows.values():
            members.setdefault((row[T_ROLLOUT], row[T_WAVE]), []).append(row)

        for rid, r in by_id.items():
            plan = plans[rid]
            running = r["state"] == "running"
            timeouts = {**DEFAULT_TIMEOUTS, **plan.timeouts}
            timeouts["on_trial"] = timeouts["on_trial"] + plan.gate_s
            payloads = _Payloads(r, plan, offices)
            topic_of = topics.topic
            early = not_started(plan, now)
            for w in range(1, r["current_wave"] + 1):
                for row in members.get((rid, w), ()):
                    state = row[T_STATE]
                    key = (rid, row[T_TERMINAL])
                    # 2a. a failed terminal due for its automatic retry gets a new command
                    if running and row[T_RETRY_AT] is not None and now >= row[T_RETRY_AT] and state in FAILED:
                        self._restart(row, now, history, "retry", f"automatic retry {row[T_ATTEMPTS] + 1}")
                        row[T_ATTEMPTS] += 1
                        changed[key] = row
                        stats.retried += 1
                        state = row[T_STATE]
                    # 2b. a state that lasted too long
                    if state not in FINAL and (state != "pending" or row[T_SENDS] > 0):
                        since = row[T_STATE_SINCE]
                        limit = timeouts.get(state)
                        if since is not None and limit is not None and now - since > limit:
                            self._time_out(row, now, limit, plan, history)
                            changed[key] = row
                            stats.timed_out += 1
                            self.metrics.failures.labels(reason="timed_out").inc()
                            continue
                    # 3. (re-)send until the terminal reports on its current command
                    if running and not early and state == "pending" and row[T_REPORT] == 0:
                        due = row[T_SENDS] == 0 or now >= (row[T_NEXT_SEND] or 0)
                        if not due:
                            # back online since the last send: at once, not after the back-off
                            cond = health.get(row[T_TERMINAL])
                            due = (
                                cond is not None
                                and cond.online_since is not None
                                and row[T_LAST_SENT] is not None
                                and cond.online_since > row[T_LAST_SENT]
                            )
                        if due:
                            outbox.append(
                                (
                                    topic_of(row[T_TERMINAL], Channel.CMD),
                                    payloads.payload(row[T_OFFICE], row[T_CMD], now),
                                )
                            )
                            row[T_SENDS] += 1
                            if row[T_SENDS] == 1:
                                row[T_STATE_SINCE] = now
                            row[T_LAST_SENT] = now
                            s = self.settings
                            row[T_NEXT_SEND] = now + min(s.resend_max_s, s.resend_initial_s * 2 ** (row[T_SENDS] - 1))
                            changed[key] = row
            # 4. the gate of the current wave
            if running:
                self._gate(now, r, plan, waves[rid], members, health, offices, wave_changes, stats, rollbacks)

        st.save_terminals(changed.values())
        st.add_history(history)
        st.update_waves(wave_changes)
        self._export(by_id, rows)

    # -- reports -------------------------------------------------------------------------------------

    def _apply_reports(
        self,
        now: float,
        reports: list[tuple[str, str]],
        rows: dict[tuple[str, str], list[Any]],
        plans: dict[str, RolloutPlan],
        changed: dict[tuple[str, str], list[Any]],
        history: list[tuple[str, str, float, str, str, str, str, str, int, str]],
        stats: TickStats,
    ) -> None:
        parsed: dict[tuple[str, str], list[dict[str, Any]]] = {}
        meta: dict[str, tuple[str, str | None, str, float]] = {}
        for terminal, body in reports:
            try:
                doc = json.loads(body)
                key = (str(doc["rollout"]), terminal)
                doc["report"] = int(doc["report"])
                if doc.get("state") not in UPDATE_STATES or not isinstance(doc.get("cmd"), str):
                    raise ValueError(f"state {doc.get('state')!r}")
            except (ValueError, KeyError, TypeError, AttributeError):
                # the ingest validated it; a row that still does not read must not stop the loop
                log.warning("update.status from %s is unreadable; ignored", terminal)
                continue
            parsed.setdefault(key, []).append(doc)
            meta[terminal] = (terminal, doc.get("metadata_expires"), str(doc.get("running", "")), now)
        missing = [k for k in parsed if k not in rows]
        extra = {(r[T_ROLLOUT], r[T_TERMINAL]): r for r in self.store.rows_for(missing)} if missing else {}
        for key, docs in parsed.items():
            row = rows.get(key) or extra.get(key)
            if row is None:
                continue  # a report on a rollout this terminal is not part of (or one long deleted)
            plan = plans.get(key[0])
            max_retries = plan.max_retries if plan is not None else 0
            for doc in sorted(docs, key=lambda d: int(d["report"])):
                if doc.get("cmd") != row[T_CMD] or int(doc["report"]) <= row[T_REPORT]:
                    continue  # an older command's, a duplicate, or overtaken by a newer report
                state, reason, detail = str(doc["state"]), str(doc.get("reason", "ok")), str(doc.get("detail", ""))
                row[T_REPORT] = int(doc["report"])
                if state != row[T_STATE] or reason != row[T_REASON]:
                    history.append(
                        (
                            key[0],
                            key[1],
                            now,
                            row[T_STATE],
                            state,
                            reason,
                            detail,
                            row[T_CMD],
                            row[T_REPORT],
                            "terminal",
                        )
                    )
                    if state != row[T_STATE]:
                        row[T_STATE_SINCE] = now
                    if state in FAILED:
                        self.metrics.failures.labels(reason=reason if reason in REASONS else "other").inc()
                row[T_STATE], row[T_REASON], row[T_DETAIL] = state, reason, detail[:500]
                row[T_RETRY_AT] = None
                if state in FAILED and reason in TRANSIENT_REASONS and row[T_ATTEMPTS] < max_retries:
                    row[T_RETRY_AT] = now + self._retry_backoff(row[T_ATTEMPTS])
                changed[key] = row
                stats.applied += 1
        if extra:
            self.store.save_terminals([r for k, r in extra.items() if k in changed])
            for k in extra:
                changed.pop(k, None)
        if meta:
            self.store.save_meta(list(meta.values()))

    def _retry_backoff(self, attempts: int) -> float:
        s = self.settings
        return float(min(s.retry_max_s, s.retry_initial_s * 2**attempts))

    @staticmethod
    def _restart(
        row: list[Any],
        now: float,
        history: list[tuple[str, str, float, str, str, str, str, str, int, str]],
        why: str,
        detail: str,
    ) -> None:
        history.append((row[T_ROLLOUT], row[T_TERMINAL], now, row[T_STATE], "pending", why, detail, "", 0, "server"))
        row[T_STATE], row[T_REASON], row[T_DETAIL] = "pending", "ok", ""
        row[T_CMD] = uuid.uuid4().hex
        row[T_REPORT] = 0
        row[T_SENDS] = 0
        row[T_LAST_SENT] = None
        row[T_NEXT_SEND] = None
        row[T_STATE_SINCE] = None
        row[T_RETRY_AT] = None

    def _time_out(
        self,
        row: list[Any],
        now: float,
        limit: float,
        plan: RolloutPlan,
        history: list[tuple[str, str, float, str, str, str, str, str, int, str]],
    ) -> None:
        prev = row[T_STATE]
        what = "no report after the command was sent" if prev == "pending" else f"still {prev}"
        detail = f"{what} for more than {limit:g} s"
        history.append(
            (
                row[T_ROLLOUT],
                row[T_TERMINAL],
                now,
                prev,
                "timed_out",
                "timed_out",
                detail,
                row[T_CMD],
                row[T_REPORT],
                "server",
            )
        )
        row[T_STATE], row[T_REASON], row[T_DETAIL] = "timed_out", "timed_out", detail
        row[T_STATE_SINCE] = now
        row[T_RETRY_AT] = now + self._retry_backoff(row[T_ATTEMPTS]) if row[T_ATTEMPTS] < plan.max_retries else None

    # -- the wave gate -------------------------------------------------------------------------------

    def _gate(
        self,
        now: float,
        r: dict[str, Any],
        plan: RolloutPlan,
        waves: list[dict[str, Any]],
        members: dict[tuple[str, int], list[list[Any]]],
        health: Mapping[str, TerminalCondition],
        offices: Mapping[str, OfficeRef],
        wave_changes: list[dict[str, Any]],
        stats: TickStats,
        rollbacks: list[tuple[str, str]],
    ) -> None:
        rid = r["id"]
        while True:
            idx = r["current_wave"]
            wave = waves[idx - 1]
            wplan = plan.waves[idx - 1]
            rows = members.get((rid, idx), [])
            size = len(rows)
            failed = [
                x for x in rows if x[T_STATE] in FAILED and x[T_RETRY_AT] is None and x[T_REASON] not in NOT_COUNTED
            ]
            finished = [x for x in rows if x[T_STATE] in FINAL and x[T_RETRY_AT] is None]
            n_failed = max(0, len(failed) - wave["forgiven"])
            limit = self._limit_exceeded(wplan, n_failed, len(finished), size)
            if limit is not None:
                reason = self._halt_reason(idx, wplan, failed, size, limit, offices)
                r["state"] = "halted"
                self.store.update_rollout(
                    rid, state="halted", reason=reason, reason_code="failures", updated_at=_ts(now)
                )
                wave["state"] = "halted"
                wave["note"] = reason
                wave_changes.append(wave)
                stats.halted.append(rid)
                log.warning("rollout %s halted: %s", rid, reason)
                if plan.on_halt == "rollback":
                    rollbacks.append((rid, reason))
                return
            if len(finished) < size:
                in_progress = size - len(finished)
                committed = sum(1 for x in rows if x[T_STATE] == "committed")
                note = f"{committed} of {size} committed, {in_progress} in progress" + (
                    f", {n_failed} failed" if n_failed else ""
                )
                if not_started(plan, now) and plan.window_start is not None:
                    note = f"install period starts {format_ts(plan.window_start)}, nothing is sent before: {note}"

                if wave["note"] != note or wave["soak_since"] is not None:
                    wave["note"], wave["soak_since"] = note, None
                    wave_changes.append(wave)
                return
            # every terminal finished within the failure limit: soak, healthy, then pass
            unhealthy = []
            for x in rows:
                if x[T_STATE] != "committed":
                    continue
                cond = health.get(x[T_TERMINAL])
                if cond is None or not cond.healthy:
                    unhealthy.append(f"{x[T_TERMINAL]} ({cond.why if cond else 'no health report'})")
            if unhealthy:
                note = (
                    "committed, waiting for healthy terminals: "
                    + ", ".join(unhealthy[:5])
                    + (f" and {len(unhealthy) - 5} more" if len(unhealthy) > 5 else "")
                )
                if wave["note"] != note or wave["soak_since"] is not None:
                    wave["note"], wave["soak_since"] = note, None
                    wave_changes.append(wave)
                return
            if wave["soak_since"] is None:
                wave["soak_since"] = now
                wave["note"] = f"soaking for {wplan.soak_s:g} s" if wplan.soak_s else "passed"
                wave_changes.append(wave)
            if now - wave["soak_since"] < wplan.soak_s:
                return
            wave["state"], wave["passed_at"] = "done", now
            wave["note"] = f"passed: {sum(1 for x in rows if x[T_STATE] == 'committed')} of {size} committed" + (
                f", {n_failed} failed within the limit" if n_failed else ""
            )
            wave_changes.append(wave)
            if idx >= len(waves):
                r["state"] = "completed"
                self.store.update_rollout(
                    rid, state="completed", reason="every wave passed", reason_code="completed", updated_at=_ts(now)
                )
                return
            if wplan.on_success == "wait_for_approval":
                r["state"] = "waiting_approval"
                reason = f"wave {idx} passed; waiting for an admin to approve wave {idx + 1}"
                self.store.update_rollout(
                    rid, state="waiting_approval", reason=reason, reason_code="wave_approval", updated_at=_ts(now)
                )
                return
            self.start_wave(r, waves, idx + 1, now, wave_changes)
            # the next wave's terminals are sent to on the next tick

    def start_wave(
        self, r: dict[str, Any], waves: list[dict[str, Any]], idx: int, now: float, wave_changes: list[dict[str, Any]]
    ) -> None:
        r["current_wave"] = idx
        nxt = waves[idx - 1]
        nxt["state"], nxt["started_at"], nxt["note"] = "running", now, "started"
        wave_changes.append(nxt)
        self.store.update_rollout(
            r["id"], current_wave=idx, state="running", reason="", reason_code="", updated_at=_ts(now)
        )

    @staticmethod
    def _limit_exceeded(wplan: Any, failed: int, finished: int, size: int) -> str | None:
        lim = wplan.failures
        if failed == 0:
            return None
        if lim.count is not None:
            return f"limit {lim.count}" if failed > lim.count else None
        pct = float(lim.percent or 0)
        if finished < lim.min_sample and finished < size:
            return None  # too few finished to judge by a rate yet
        if failed * 100 > pct * max(finished, 1):
            return f"limit {pct:g}% of the finished ones (at least {lim.min_sample} finished)"
        return None

    @staticmethod
    def _halt_reason(
        idx: int, wplan: Any, failed: list[list[Any]], size: int, limit: str, offices: Mapping[str, OfficeRef]
    ) -> str:
        groups: dict[tuple[str, str], list[list[Any]]] = {}
        for x in failed:
            groups.setdefault((x[T_REASON], x[T_DETAIL]), []).append(x)
        label = f"wave {idx}" + (f" ({wplan.name})" if wplan.name else "")
        parts = []
        for (reason, detail), xs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            names = sorted({offices[x[T_OFFICE]].name if x[T_OFFICE] in offices else x[T_OFFICE] for x in xs})
            where = " in " + ", ".join(names[:4]) + (f" and {len(names) - 4} more offices" if len(names) > 4 else "")
            parts.append(f"{len(xs)}{where}: {describe_reason(reason, detail)}")
        return f"{label}: {len(failed)} of {size} terminals failed, {limit} — " + "; ".join(parts[:4])

    # -- terminals enrolled later --------------------------------------------------------------------

    def _join_newcomers(self, now: float, live: list[dict[str, Any]]) -> int:
        """An enrolled terminal that a rollout targets but does not hold joins its last wave: of
        every live rollout and of the newest completed one of each kind (reopened for it)."""
        st = self.store
        completed = st.rollouts(["completed"], limit=10_000)
        newest: dict[str, dict[str, Any]] = {}
        for r in [*completed, *live]:
            if r["state"] in ("completed", "running", "paused", "waiting_approval", "halted"):
                cur = newest.get(r["kind"])
                if cur is None or (r["created_at"], r["id"]) > (cur["created_at"], cur["id"]):
                    newest[r["kind"]] = r
        candidates = [r for r in live if r["state"] != "awaiting_approval"]
        candidates += [r for r in completed if newest.get(r["kind"]) is r]
        if not candidates:
            if live:
                self._drop_revoked(now, live, {t.id for t in self._terminals() if t.enabled})
            return 0
        everyone = self._terminals()
        terminals = [t for t in everyone if t.enabled]
        self._drop_revoked(now, live, {t.id for t in terminals})
        have = st.members([r["id"] for r in candidates])
        joined = 0
        for r in candidates:
            plan = RolloutPlan.model_validate(r["plan"])
            last = len(plan.waves)
            rows = [
                (r["id"], t.id, last, t.office, uuid.uuid4().hex)
                for t in terminals
                if (r["id"], t.id) not in have and matches(plan.targets, t) and fits(r["profiles"], t.profile)
            ]
            if not rows:
                continue
            st.add_terminals(rows)
            joined += len(rows)
            log.info("%d terminal(s) enrolled later joined the last wave of rollout %s", len(rows), r["id"])
            if r["state"] == "completed":
                # the last wave runs again for the newcomers; it passes again when they commit
                st.update_rollout(
                    r["id"],
                    state="running",
                    current_wave=last,
                    reason=f"{len(rows)} terminal(s) enrolled later joined the last wave",
                    reason_code="joined",
                    updated_at=_ts(now),
                )
                wave = st.waves([r["id"]])[r["id"]][last - 1]
                wave.update(state="running", soak_since=None, passed_at=None, note="terminals enrolled later joined")
                st.update_waves([wave])
        return joined

    def _drop_revoked(self, now: float, live: list[dict[str, Any]], enabled: set[str]) -> None:
        """A revoked terminal's unfinished update ends as failed/revoked, counted as nobody's failure."""
        rows = [
            r
            for r in self.store.terminal_rows([x["id"] for x in live])
            if r[T_TERMINAL] not in enabled and r[T_STATE] not in FINAL
        ]
        if not rows:
            return
        history = []
        for r in rows:
            history.append(
                (r[T_ROLLOUT], r[T_TERMINAL], now, r[T_STATE], "failed", "revoked", "", r[T_CMD], r[T_REPORT], "server")
            )
            r[T_STATE], r[T_REASON], r[T_DETAIL] = "failed", "revoked", "the terminal was revoked"
            r[T_STATE_SINCE], r[T_RETRY_AT] = now, None
        self.store.save_terminals(rows)
        self.store.add_history(history)

    # -- metrics -------------------------------------------------------------------------------------

    def _export(self, by_id: dict[str, dict[str, Any]], rows: dict[tuple[str, str], list[Any]]) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for row in rows.values():
            k = (row[T_ROLLOUT], str(row[T_WAVE]), row[T_STATE])
            counts[k] = counts.get(k, 0) + 1
        self.metrics.set_terminals(counts)
        self.metrics.halted.set(sum(1 for r in by_id.values() if r["state"] == "halted"))
        states: dict[str, int] = {}
        for r in by_id.values():
            states[r["state"]] = states.get(r["state"], 0) + 1
        self.metrics.set_rollouts(states)
