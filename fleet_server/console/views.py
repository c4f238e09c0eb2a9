"""What each console page shows, gathered from the same service calls the JSON API makes.

No SQL of its own except reads no service offers yet (one office's terminals, a terminal's update
reports and its rejects), kept in `fleet_server.console.queries`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from fleet_server.auth.models import Role, User
from fleet_server.console import queries
from fleet_server.console.charts import WeekPoint, heatmap_svg, trend_svg
from fleet_server.health.service import PeripheralReport
from fleet_server.registry.store import RegistryStore
from fleet_server.usage import charts as usage_charts
from fleet_server.usage.schemas import BusyHours, ItemRow, ItemTable, OfficeComparison, PeriodComparison
from fleet_server.usage.service import UsageService

if TYPE_CHECKING:
    from fleet_server.app import FleetServer

log = logging.getLogger(__name__)

STATES = ("online", "stale", "offline", "missing")
TREND_WEEKS = 8
RECENT_RUNS = 5


@dataclass
class OfficeLine:
    id: str
    name: str
    name_en: str
    district: str
    pilot: bool
    counts: dict[str, int]
    terminals: int
    alerts: int
    versions: list[tuple[str, int]]


def overview(fleet: FleetServer, user: User) -> dict[str, Any]:
    """Every visible office with its terminals by state, open alerts and agent versions in use."""
    allowed = user.office_filter()
    # one snapshot of every terminal's health gives both the counts by state (what
    # /api/v1/health/offices counts) and the versions in use, so the two always agree
    tallies = fleet.health.office_tallies(allowed)
    states: dict[str, Counter[str]] = {office: t[0] for office, t in tallies.items()}
    versions: dict[str, Counter[str]] = {office: t[1] for office, t in tallies.items()}
    alerts = fleet.health.alerts(True, allowed, 200)
    alerts_by_office = Counter(a["office"] for a in alerts)
    lines = []
    for o in fleet.registry.offices():
        if allowed is not None and o.id not in allowed:
            continue
        counts = states.get(o.id, Counter())
        lines.append(
            OfficeLine(
                o.id,
                o.name,
                o.name_en,
                o.district,
                o.pilot,
                {s: counts.get(s, 0) for s in STATES},
                sum(counts.values()),
                alerts_by_office.get(o.id, 0),
                sorted(versions.get(o.id, Counter()).items(), key=lambda kv: (-kv[1], kv[0])),
            )
        )
    totals = {s: sum(line.counts[s] for line in lines) for s in STATES}
    all_versions: Counter[str] = Counter()
    for v in versions.values():
        all_versions.update(v)
    return {
        "pilots": [line for line in lines if line.pilot],
        "later": [line for line in lines if not line.pilot],
        "totals": totals,
        "terminals": sum(totals.values()),
        "alerts": alerts[:50],
        "alert_count": len(alerts),
        "versions": sorted(all_versions.items(), key=lambda kv: (-kv[1], kv[0])),
    }


def office_page(fleet: FleetServer, user: User, office_id: str) -> dict[str, Any] | None:
    """One office: its terminals (state, reason, heartbeat, version, peripherals, backlog), alerts,
    onboarding and playbook runs (admins), opening hours and maintenance window."""
    office = fleet.registry.office(office_id)
    if office is None:
        return None
    with fleet.reader() as conn:
        enrolled = RegistryStore(conn).terminals(office_id)
    health = {h["terminal"]: h for h in fleet.health.terminals([office_id])}
    rows = []
    counts: Counter[str] = Counter()
    for t in enrolled:
        h = health.get(t.id)
        counts[(h or {}).get("state", "missing")] += 1
        rows.append({"terminal": t, "health": h, "peripherals": _peripherals(h)})
    alerts = fleet.health.alerts(False, [office_id], 30)
    runs: list[Any] = []
    onboarding: list[dict[str, Any]] = []
    if user.role == Role.ADMIN:
        runs = [fleet.playbooks.get_run(r.id) for r in fleet.playbooks.runs(RECENT_RUNS, None, office_id)]
        onboarding = fleet.auth.audit_log(10, None, "office.onboard", office_id)
    return {
        "office": office,
        "rows": rows,
        "counts": {s: counts.get(s, 0) for s in STATES},
        "alerts": alerts,
        "runs": runs,
        "onboarding": onboarding,
    }


def _peripherals(h: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each peripheral that is not plainly ok, with the reading that tripped it, in words."""
    out = []
    for pid, p in sorted(((h or {}).get("peripherals") or {}).items()):
        try:
            report = PeripheralReport(**p)
        except TypeError:
            continue
        out.append({"id": pid, "state": report.state, "why": report.explain()})
    return out


def terminal_page(fleet: FleetServer, terminal_id: str, *, rollouts: bool = False) -> dict[str, Any] | None:
    """One terminal: health with transitions, the update timeline per rollout, recent rejects.

    The timeline is the rollout service's (each server-side state with its time and reason) when
    the server runs one; otherwise the terminal's own stored `update.status` reports."""
    t = fleet.registry.terminal(terminal_id)
    if t is None:
        return None
    doc = fleet.health.terminal(terminal_id)
    with fleet.reader() as conn:
        rejects = queries.terminal_rejects(conn, terminal_id)
        updates = [] if rollouts else queries.update_reports(conn, terminal_id)
    timeline: dict[str, list[dict[str, Any]]] = {}
    if rollouts:
        doc_updates = fleet.rollouts.terminal_updates(terminal_id)
        versions = {r["rollout"]: r for r in doc_updates["rollouts"]}
        for h in doc_updates["timeline"]:
            r = versions.get(h["rollout"], {})
            timeline.setdefault(h["rollout"], []).append(
                {
                    "at": h["at"],
                    "kind": "",
                    "version": r.get("version", ""),
                    "state": h["to_state"],
                    "reason": h["reason"],
                    "detail": str(h.get("detail") or "")[:160],
                }
            )
    for u in updates:
        timeline.setdefault(u["rollout"], []).append(u)
    transitions: list[dict[str, Any]] = (doc or {}).get("transitions", [])
    return {
        "terminal": t,
        "health": doc,
        "peripherals": _peripherals(doc),
        "transitions": transitions,
        "timeline": timeline,
        "rejects": rejects,
    }


# -- usage --------------------------------------------------------------------------------------------


@dataclass
class ItemRank:
    """A service item over the chosen offices (counts summed; durations only for one office)."""

    service_code: str
    name: str
    name_en: str
    started: int = 0
    completed: int = 0
    abandoned: int = 0
    face_login_sessions: int = 0
    median_duration_s: float | None = None
    p90_duration_s: float | None = None

    @property
    def completion_rate(self) -> float | None:
        ended = self.completed + self.abandoned
        return self.completed / ended if ended else None

    @property
    def face_login_share(self) -> float | None:
        return self.face_login_sessions / self.started if self.started else None


ITEM_COLUMNS = (
    "service_code",
    "name",
    "name_en",
    "started",
    "completed",
    "abandoned",
    "completion_rate",
    "face_login_share",
    "median_duration_s",
    "p90_duration_s",
)
OFFICE_COLUMNS = (
    "office_id",
    "name",
    "pilot",
    "started",
    "completed",
    "abandoned",
    "completion_rate",
    "abandon_rate",
    "face_login_share",
    "median_duration_s",
    "p90_duration_s",
    "sessions_per_terminal_day",
)


@dataclass
class UsageQuery:
    office: str | None
    date_from: date
    date_to: date
    base_from: date
    base_to: date
    errors: dict[str, str] = field(default_factory=dict)


def rank_items(rows: list[ItemRow], one_office: bool) -> list[ItemRank]:
    """Items ranked by sessions started; for one office the table's rows as they are."""
    merged: dict[str, ItemRank] = {}
    for r in rows:
        m = merged.setdefault(r.service_code, ItemRank(r.service_code, r.name, r.name_en))
        m.started += r.started
        m.completed += r.completed
        m.abandoned += r.abandoned
        m.face_login_sessions += r.face_login_sessions
        if one_office:
            m.median_duration_s, m.p90_duration_s = r.median_duration_s, r.p90_duration_s
    return sorted(merged.values(), key=lambda m: (-m.started, m.service_code))


class UsageFigures:
    """The usage service's answers, kept until it next rebuilds an office-day.

    Rollups change only when the usage service rebuilds them (every 30 s while events arrive), and
    it counts each rebuild in `fleet_usage_rebuilt_buckets_total`: an answer is reused while that
    count is unchanged, so a page never shows figures older than the rollups themselves. Bounded;
    the answers are frozen models, safe to share between requests."""

    MAX_ENTRIES = 512

    def __init__(self, usage: UsageService, registry: CollectorRegistry) -> None:
        self.usage = usage
        self.registry = registry
        self._seen: float | None = None
        self._answers: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def _version(self) -> float:
        return self.registry.get_sample_value("fleet_usage_rebuilt_buckets_total") or 0.0

    def _call(self, name: str, *args: Any) -> Any:
        key = (name, *(tuple(a) if isinstance(a, list) else a for a in args))
        version = self._version()
        with self._lock:
            if version != self._seen:
                self._answers.clear()
                self._seen = version
            if key in self._answers:
                return self._answers[key]
        answer = getattr(self.usage, name)(*args)
        with self._lock:
            if version == self._seen:
                if len(self._answers) >= self.MAX_ENTRIES:
                    self._answers.pop(next(iter(self._answers)))
                self._answers[key] = answer
        return answer

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()

    def compare_offices(self, offices: list[str] | None, first: date, last: date) -> OfficeComparison:
        result: OfficeComparison = self._call("compare_offices", offices, first, last)
        return result

    def item_table(self, offices: list[str] | None, first: date, last: date) -> ItemTable:
        result: ItemTable = self._call("item_table", offices, first, last)
        return result

    def busy_hours(self, offices: list[str] | None, first: date, last: date) -> BusyHours:
        result: BusyHours = self._call("busy_hours", offices, first, last)
        return result

    def compare_periods(
        self, offices: list[str] | None, base_from: date, base_to: date, first: date, last: date
    ) -> PeriodComparison:
        result: PeriodComparison = self._call("compare_periods", offices, base_from, base_to, first, last)
        return result


def usage_page(usage: UsageFigures, user: User, q: UsageQuery, lang: str) -> dict[str, Any]:
    """The usage figures of the chosen offices and range, each from the service the API uses."""
    offices = user.office_filter([q.office] if q.office else None)
    comparison: OfficeComparison = usage.compare_offices(offices, q.date_from, q.date_to)
    table = usage.item_table(offices, q.date_from, q.date_to)
    items = rank_items(table.rows, q.office is not None)
    busy = usage.busy_hours(offices, q.date_from, q.date_to)
    periods: PeriodComparison = usage.compare_periods(offices, q.base_from, q.base_to, q.date_from, q.date_to)
    weeks = []
    end = q.date_to
    for _ in range(TREND_WEEKS):
        start = end - timedelta(days=6)
        total = usage.compare_offices(offices, start, end).total
        weeks.append(WeekPoint(start.strftime("%m-%d"), total.started, total.completion_rate))
        end = start - timedelta(days=1)
    weeks.reverse()
    zh = lang == "zh"
    office_names = [o.name if zh else o.name_en for o in comparison.offices]
    label = ", ".join(office_names) if len(office_names) <= 3 else f"{len(office_names)}"
    charts = {
        "items": usage_charts.items_svg(table, ("业务事项 · " if zh else "Service items · ") + label)
        if q.office
        else None,
        "offices": usage_charts.offices_svg(
            comparison, "completion_rate", "网点对比 · 办结率" if zh else "Offices compared · completion rate"
        )
        if not q.office
        else None,
        "heatmap": heatmap_svg(busy, "繁忙时段 周×时" if zh else "Busy hours, weekday × hour", lang),
        "trend": trend_svg(
            weeks,
            "按周趋势" if zh else "Trend by week",
            "每周业务量" if zh else "sessions per week",
            "办结率" if zh else "completion rate",
        ),
    }
    return {
        "comparison": comparison,
        "items": items,
        "busy": busy,
        "periods": periods,
        "weeks": weeks,
        "charts": charts,
        "one_office": q.office is not None,
    }


def item_csv_rows(items: list[ItemRank]) -> list[list[Any]]:
    """The ranked item table as the page shows it, one list per row (header first)."""
    out: list[list[Any]] = [["rank", *ITEM_COLUMNS]]
    for i, m in enumerate(items, 1):
        out.append([i, *(_cell(getattr(m, c)) for c in ITEM_COLUMNS)])
    return out


def office_csv_rows(comparison: OfficeComparison) -> list[list[Any]]:
    """The office comparison table as the page shows it (header first)."""
    out: list[list[Any]] = [list(OFFICE_COLUMNS)]
    for o in comparison.offices:
        out.append([_cell(getattr(o, c)) for c in OFFICE_COLUMNS])
    return out


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return round(v, 4)
    return v
