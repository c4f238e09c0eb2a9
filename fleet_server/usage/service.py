"""Usage rules: mark office-days dirty as events are stored, rebuild them from raw events, answer queries.

Why rebuild instead of incrementing: an office-day's buckets are always recomputed from every
stored service event of that day and swapped in whole. Late (offline-queued), out-of-order and
re-sent events can therefore never be counted twice or missed: the ingest stores each
(terminal, epoch, seq) once, and a rebuild is a pure function of what is stored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet_server.db import connect
from fleet_server.usage import figures as fig
from fleet_server.usage.schemas import (
    BusyCell,
    BusyHour,
    BusyHours,
    Figures,
    HourRow,
    HourTable,
    ItemRow,
    ItemTable,
    OfficeComparison,
    OfficeFigures,
    PeriodComparison,
    PeriodFigures,
)
from fleet_server.usage.store import BucketRow, OfficeRow, UsageStore

log = logging.getLogger(__name__)

RECOMPUTE_INTERVAL_S = 30.0  # how stale a manager's figures may be; a rebuild of one day is ms
RECOMPUTE_BATCH_DAYS = 200  # office-days per tick, so a full rebuild never hogs the writer lock
MAX_RANGE_DAYS = 366
MAX_HOURLY_DAYS = 31  # hour buckets: 24 x 40 items x offices per day add up fast
# At start-up, events received this long before the last watermark are looked at again: covers a
# crash between the ingest COMMIT and its on_commit hook, and small clock steps.
CATCH_UP_MARGIN_S = 600.0
EXPORT_GRANULARITIES = ("total", "day", "hour")

EventRow = tuple[str, str, int, str, str, str, str, str, str]


class UsageError(Exception):
    """Root of usage errors."""


class UnknownOffice(UsageError):
    """A query named an office that does not exist (HTTP 404)."""

    def __init__(self, office_ids: Sequence[str], known: Sequence[str]) -> None:
        self.office_ids = list(office_ids)
        super().__init__(f"unknown office {', '.join(repr(o) for o in office_ids)}; known offices: {', '.join(known)}")


class BadQuery(UsageError):
    """A query's parameters are well-formed but make no sense (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class ItemName:
    name: str
    name_en: str


def load_item_names(path: Path | None = None) -> dict[str, ItemName]:
    """Service item names by code, from `path` or the catalogue shipped with the wire package."""
    if path is not None:
        text = path.read_text("utf-8")
    else:
        text = resources.files("fleet_wire").joinpath("catalog/service_items.yaml").read_text("utf-8")
    doc: Any = yaml.safe_load(text)
    return {i["code"]: ItemName(i["name"], i["name_en"]) for i in doc["items"]}


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sessions = Counter(
            "fleet_usage_sessions_total",
            "Service events stored, by office and outcome (each stored once)",
            ["office", "outcome"],
            registry=registry,
        )
        self.dirty = Gauge("fleet_usage_dirty_buckets", "Office-days waiting for a rollup rebuild", registry=registry)
        self.lag = Gauge(
            "fleet_usage_rollup_lag_seconds",
            "Age of the oldest office-day waiting for a rebuild (0 when none)",
            registry=registry,
        )
        self.rebuilt = Counter(
            "fleet_usage_rebuilt_buckets_total", "Office-days rebuilt from raw events", registry=registry
        )
        self.errors = Counter(
            "fleet_usage_rebuild_errors_total",
            "Office-day rebuilds that failed (retried on the next tick)",
            registry=registry,
        )


class UsageService:
    def __init__(
        self,
        db_path: Any,
        registry: CollectorRegistry,
        *,
        item_names: dict[str, ItemName] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db_path = db_path
        self.metrics = UsageMetrics(registry)
        self.items = item_names if item_names is not None else load_item_names()
        self._clock = clock
        self._hook_conn = _writer(db_path)
        self._work_conn = _writer(db_path)
        self._hook_lock = threading.Lock()
        self._work_lock = threading.Lock()
        self._tz: dict[str, tzinfo] = {}
        self._tz_lock = threading.Lock()
        self._caught_up = False
        self.errors = 0  # rebuilds that failed; tests assert it stays 0

    def close(self) -> None:
        """Close the service's connections."""
        with self._hook_lock, self._work_lock:
            self._hook_conn.close()
            self._work_conn.close()

    # -- marking -------------------------------------------------------------------------------------

    def mark_dirty(self, rows: list[EventRow]) -> None:
        """IngestService.on_commit hook: count the newly stored service events, mark their office-days."""
        pairs: set[tuple[str, str]] = set()
        counts: dict[tuple[str, str], int] = {}
        received_upto = ""
        with self._hook_lock:
            for row in rows:
                outcome = fig.SERVICE_TYPES.get(row[4])
                if outcome is None:
                    continue
                office, ts = row[7], row[5]
                received_upto = max(received_upto, row[6])
                tz = self._office_tz(office, self._hook_conn)
                try:
                    day = fig.local_day(ts, tz)
                except (ValueError, OverflowError):  # one unusable time must not leave the batch unmarked
                    log.warning("event %s seq %s has an unusable time %r; left out of usage", row[0], row[2], ts)
                    continue
                counts[(office, outcome)] = counts.get((office, outcome), 0) + 1
                pairs.add((office, day.isoformat()))
            if not pairs:
                return
            store = UsageStore(self._hook_conn)
            # the watermark says up to where catch_up() need not look again after a restart
            store.mark_dirty(sorted(pairs), self._now(), received_upto)
            self.metrics.dirty.set(store.dirty_count())
        # counted after the mark is durable: the counter follows what the rollups will contain
        for (office, outcome), n in counts.items():
            self.metrics.sessions.labels(office, outcome).inc(n)

    def mark_all(self) -> int:
        """Mark every office-day with events or rollups for a rebuild (e.g. after a timezone change)."""
        with self._work_lock:
            with self._tz_lock:
                self._tz.clear()
            return self._mark_received_since("", include_rolled_up=True)

    def catch_up(self) -> int:
        """Mark office-days of events received since the last watermark (start-up safety net)."""
        with self._work_lock:
            store = UsageStore(self._work_conn)
            watermark = store.get_state("watermark")
            since = ""
            if watermark:
                since = fig.format_ts(fig.parse_ts(watermark) - timedelta(seconds=CATCH_UP_MARGIN_S))
            return self._mark_received_since(since, include_rolled_up=False)

    def _mark_received_since(self, since: str, *, include_rolled_up: bool) -> int:
        store = UsageStore(self._work_conn)
        pairs: set[tuple[str, str]] = set()
        for office, hour_prefix in store.received_since(since):
            tz = self._office_tz(office, self._work_conn)
            # a UTC hour can straddle local midnight in zones with a half-hour offset
            pairs.add((office, fig.local_day(hour_prefix + ":00:00.000Z", tz).isoformat()))
            pairs.add((office, fig.local_day(hour_prefix + ":59:59.999Z", tz).isoformat()))
        if include_rolled_up:
            pairs.update(
                (r[0], r[1])
                for r in self._work_conn.execute(
                    "SELECT office_id, day FROM usage_office_day UNION SELECT office_id, day FROM usage_day"
                )
            )
        if pairs:
            store.mark_dirty(sorted(pairs), self._now())
        self.metrics.dirty.set(store.dirty_count())
        return len(pairs)

    # -- rebuilding ----------------------------------------------------------------------------------

    def recompute(self, limit: int = RECOMPUTE_BATCH_DAYS) -> int:
        """Rebuild up to `limit` dirty office-days from raw events; returns how many were rebuilt."""
        done = 0
        with self._work_lock:
            store = UsageStore(self._work_conn)
            # versions are read before the events: a mark made after this read survives the rebuild
            for office, day, version in store.dirty_batch(limit):
                try:
                    self._rebuild(store, office, date.fromisoformat(day), version)
                except Exception:
                    self.errors += 1
                    self.metrics.errors.inc()
                    log.exception("usage rebuild of %s %s failed; retried on the next tick", office, day)
                    try:
                        store.mark_dirty([(office, day)], self._now())  # to the back of the queue
                    except sqlite3.Error:
                        log.exception("could not re-mark %s %s", office, day)
                    continue
                done += 1
                self.metrics.rebuilt.inc()
            self._update_gauges(store)
        return done

    def tick(self) -> int:
        """Scheduler job: catch up once after start, then rebuild a batch of dirty office-days."""
        try:
            if not self._caught_up:
                self.catch_up()
                self._caught_up = True
            return self.recompute()
        except Exception:
            self.errors += 1
            self.metrics.errors.inc()
            log.exception("usage tick failed")
            return 0

    def schedule(self, scheduler: Any, interval_s: float = RECOMPUTE_INTERVAL_S) -> None:
        """Add the rollup job to an APScheduler scheduler."""
        scheduler.add_job(
            self.tick,
            "interval",
            seconds=interval_s,
            id="usage-rollups",
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )

    def _rebuild(self, store: UsageStore, office: str, day: date, version: int) -> None:
        tz = self._office_tz(office, self._work_conn)
        ts_from, ts_to = fig.day_bounds_utc(day, tz)
        by_hour: dict[tuple[str, int], fig.Tally] = {}
        by_day: dict[str, fig.Tally] = {}
        terminals: set[str] = set()
        for terminal, etype, ts, body in store.service_events(office, ts_from, ts_to):
            try:
                doc = json.loads(body)
                code = str(doc["service_code"])
                face = bool(doc.get("face_login", False))
                duration = doc.get("duration_s")
            except (ValueError, KeyError, TypeError):
                log.warning("skipping unreadable %s body of %s at %s", etype, terminal, ts)
                continue
            hour = fig.parse_ts(ts).astimezone(tz).hour
            outcome = fig.SERVICE_TYPES[etype]
            by_hour.setdefault((code, hour), fig.Tally()).add(outcome, face, duration)
            by_day.setdefault(code, fig.Tally()).add(outcome, face, duration)
            terminals.add(terminal)
        weekday = day.weekday()
        hours = [_bucket(code, hour, weekday, t) for (code, hour), t in sorted(by_hour.items())]
        days = [_bucket(code, None, weekday, t) for code, t in sorted(by_day.items())]
        store.replace_day(office, day.isoformat(), version, hours, days, len(terminals))

    def _update_gauges(self, store: UsageStore) -> None:
        self.metrics.dirty.set(store.dirty_count())
        row = self._work_conn.execute("SELECT min(marked_at) FROM usage_dirty").fetchone()
        oldest = row[0] if row else None
        self.metrics.lag.set(max(0.0, self._clock() - fig.parse_ts(oldest).timestamp()) if oldest else 0.0)

    def _office_tz(self, office: str, conn: sqlite3.Connection) -> tzinfo:
        tz = self._tz.get(office)
        if tz is not None:
            return tz
        with self._tz_lock:
            for o in UsageStore(conn).offices():
                self._tz[o.id] = _zone(o.id, o.timezone)
            return self._tz.setdefault(office, UTC)

    def _now(self) -> str:
        return fig.format_ts(datetime.fromtimestamp(self._clock(), UTC))

    # -- queries -------------------------------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[UsageStore]:
        with closing(connect(self._db_path, readonly=True)) as conn:
            yield UsageStore(conn)

    def offices(self) -> list[OfficeRow]:
        """Every office, pilot offices first."""
        with self._reader() as store:
            return store.offices()

    def default_range(self, days: int = 7) -> tuple[date, date]:
        """The last `days` days up to today (in the first office's timezone)."""
        offices = self.offices()
        tz = _zone(offices[0].id, offices[0].timezone) if offices else UTC
        today = datetime.fromtimestamp(self._clock(), tz).date()
        return today - timedelta(days=days - 1), today

    def item_table(self, offices: list[str] | None, date_from: date, date_to: date) -> ItemTable:
        """Per office x service item figures over a range of office-local days."""
        with self._reader() as store:
            chosen = self._check(offices, date_from, date_to, store)
            rows = store.day_rows(offices, date_from.isoformat(), date_to.isoformat())
        acc: dict[tuple[str, str], _Acc] = {}
        for r in rows:
            acc.setdefault((str(r[0]), str(r[2])), _Acc()).add_day_row(r)
        out = [
            ItemRow(office_id=o, service_code=c, **self._names(c), **a.figures().model_dump())
            for (o, c), a in acc.items()
        ]
        out.sort(key=lambda x: (x.office_id, -x.started, x.service_code))
        return ItemTable(date_from=date_from, date_to=date_to, offices=chosen, rows=out)

    def hour_table(self, offices: list[str] | None, date_from: date, date_to: date) -> HourTable:
        """Per office x day x hour x service item buckets, as stored."""
        with self._reader() as store:
            chosen = self._check(offices, date_from, date_to, store)
            if (date_to - date_from).days + 1 > MAX_HOURLY_DAYS:
                raise BadQuery(
                    f"hourly figures cover at most {MAX_HOURLY_DAYS} days; "
                    f"{date_from}..{date_to} is longer (ask for day figures instead)"
                )
            rows = store.hour_rows(offices, date_from.isoformat(), date_to.isoformat())
        out = [
            HourRow(
                office_id=str(r[0]),
                day=date.fromisoformat(str(r[1])),
                hour=int(r[2]),
                service_code=str(r[3]),
                **self._names(str(r[3])),
                **_stored_figures(r[5:9], r[10], r[11]).model_dump(),
            )
            for r in rows
        ]
        return HourTable(date_from=date_from, date_to=date_to, offices=chosen, rows=out)

    def busy_hours(self, offices: list[str] | None, date_from: date, date_to: date) -> BusyHours:
        """Share of started sessions by office-local weekday x hour and by hour of day."""
        with self._reader() as store:
            chosen = self._check(offices, date_from, date_to, store)
            cells = store.started_by_weekday_hour(offices, date_from.isoformat(), date_to.isoformat())
        total = sum(cells.values())
        by_hour = [sum(n for (_, h), n in cells.items() if h == hour) for hour in range(24)]
        return BusyHours(
            date_from=date_from,
            date_to=date_to,
            offices=chosen,
            started=total,
            cells=[BusyCell(weekday=w, hour=h, started=n, share=n / total) for (w, h), n in sorted(cells.items()) if n],
            by_hour=[BusyHour(hour=h, started=n, share=n / total if total else 0.0) for h, n in enumerate(by_hour)],
        )

    def compare_offices(self, offices: list[str] | None, date_from: date, date_to: date) -> OfficeComparison:
        """Per-office rates over a range: completion, abandon, durations, sessions per terminal-day."""
        with self._reader() as store:
            chosen = self._check(offices, date_from, date_to, store)
            rows = store.day_rows(chosen, date_from.isoformat(), date_to.isoformat())
            terminal_days = store.terminal_days(chosen, date_from.isoformat(), date_to.isoformat())
            meta = {o.id: o for o in store.offices()}
        per: dict[str, _Acc] = {o: _Acc() for o in chosen}
        total = _Acc()
        for r in rows:
            durations = fig.unpack_durations(r[11])
            per[str(r[0])].add_day_row(r, durations)
            total.add_day_row(r, durations)
        out = []
        for office in chosen:
            a, m, td = per[office], meta[office], terminal_days.get(office, 0)
            out.append(
                OfficeFigures(
                    office_id=office,
                    name=m.name,
                    name_en=m.name_en,
                    pilot=m.pilot,
                    terminal_days=td,
                    sessions_per_terminal_day=fig.ratio(a.started, td),
                    **a.figures().model_dump(),
                )
            )
        return OfficeComparison(date_from=date_from, date_to=date_to, offices=out, total=total.figures())

    def compare_periods(
        self, offices: list[str] | None, base_from: date, base_to: date, date_from: date, date_to: date
    ) -> PeriodComparison:
        """Each office's figures in a base period (e.g. the pilot) next to another period."""
        base = self.compare_offices(offices, base_from, base_to)
        current = self.compare_offices(offices, date_from, date_to)
        out = []
        for b, c in zip(base.offices, current.offices, strict=True):
            out.append(
                PeriodFigures(
                    office_id=b.office_id,
                    name=b.name,
                    base=b,
                    current=c,
                    started_change=(c.started / b.started - 1.0) if b.started else None,
                    completion_rate_change=_diff(c.completion_rate, b.completion_rate),
                    median_duration_change_s=_diff(c.median_duration_s, b.median_duration_s),
                )
            )
        return PeriodComparison(base_from=base_from, base_to=base_to, date_from=date_from, date_to=date_to, offices=out)

    def export_csv(self, offices: list[str] | None, date_from: date, date_to: date, granularity: str = "total") -> str:
        """CSV of the rollups; starts with a BOM so Excel reads the Chinese names as UTF-8."""
        if granularity not in EXPORT_GRANULARITIES:
            raise BadQuery(f"granularity {granularity!r} is not one of {', '.join(EXPORT_GRANULARITIES)}")
        names = {o.id: o.name for o in self.offices()}
        buf = io.StringIO()
        writer = SafeCsvWriter(buf)
        lead: list[str] = ["office_id", "office_name"]
        if granularity == "total":
            lead += ["date_from", "date_to"]
        else:
            lead += ["day"] + (["hour"] if granularity == "hour" else [])
        writer.writerow(lead + list(CSV_ITEM_COLUMNS) + list(CSV_FIGURE_COLUMNS))
        if granularity == "total":
            table = self.item_table(offices, date_from, date_to)
            for row in table.rows:
                writer.writerow(
                    [
                        row.office_id,
                        names.get(row.office_id, ""),
                        date_from.isoformat(),
                        date_to.isoformat(),
                        *_csv_values(row),
                    ]
                )
        elif granularity == "day":
            with self._reader() as store:
                self._check(offices, date_from, date_to, store)
                rows = store.day_rows(offices, date_from.isoformat(), date_to.isoformat())
            for r in rows:
                a = _Acc()
                a.add_day_row(r)
                item = ItemRow(
                    office_id=str(r[0]), service_code=str(r[2]), **self._names(str(r[2])), **a.figures().model_dump()
                )
                writer.writerow([item.office_id, names.get(item.office_id, ""), r[1], *_csv_values(item)])
        else:
            for h in self.hour_table(offices, date_from, date_to).rows:
                writer.writerow([h.office_id, names.get(h.office_id, ""), h.day.isoformat(), h.hour, *_csv_values(h)])
        return "\ufeff" + buf.getvalue()

    def _names(self, code: str) -> dict[str, str]:
        item = self.items.get(code)
        return {"name": item.name if item else code, "name_en": item.name_en if item else code}

    def _check(self, offices: list[str] | None, date_from: date, date_to: date, store: UsageStore) -> list[str]:
        """Validate a query; returns the offices it covers (every office for None)."""
        if date_from > date_to:
            raise BadQuery(f"date_from {date_from} is after date_to {date_to}")
        if (date_to - date_from).days + 1 > MAX_RANGE_DAYS:
            raise BadQuery(f"the range {date_from}..{date_to} is longer than {MAX_RANGE_DAYS} days")
        known = [o.id for o in store.offices()]
        if offices is None:
            return known
        unknown = [o for o in offices if o not in known]
        if unknown:
            raise UnknownOffice(unknown, known)
        return list(dict.fromkeys(offices))


# A cell starting like this is a formula to Excel and LibreOffice (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will show as text: a leading apostrophe when text starts like a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


class SafeCsvWriter:
    """csv.writer for files people open in Excel: every text cell through `csv_cell`, CRLF lines."""

    def __init__(self, out: io.StringIO) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n")

    def writerow(self, row: Sequence[Any]) -> None:
        self._writer.writerow([csv_cell(v) for v in row])


CSV_ITEM_COLUMNS = ("service_code", "item_name", "item_name_en")
CSV_FIGURE_COLUMNS = (
    "started",
    "completed",
    "abandoned",
    "face_login_sessions",
    "completion_rate",
    "abandon_rate",
    "face_login_share",
    "median_duration_s",
    "p90_duration_s",
)


def _csv_values(row: ItemRow | HourRow) -> list[Any]:
    values: list[Any] = [row.service_code, row.name, row.name_en]
    for col in CSV_FIGURE_COLUMNS:
        v = getattr(row, col)
        values.append("" if v is None else round(v, 4) if isinstance(v, float) else v)
    return values


class _Acc:
    """Sums day rows and keeps their sorted durations, so range medians are exact.

    The durations of each day row stay one sorted run; `figures` selects the median and p90
    ranks out of the runs (fleet_server.usage.figures.select_ranks) instead of merging them.
    """

    def __init__(self) -> None:
        self.started = self.completed = self.abandoned = self.face = 0
        self._durations: list[Sequence[float]] = []

    def add_day_row(self, r: tuple[Any, ...], durations: Sequence[float] | None = None) -> None:
        """Add one `UsageStore.day_rows` row; `durations` when already unpacked from it."""
        self.started += int(r[4])
        self.completed += int(r[5])
        self.abandoned += int(r[6])
        self.face += int(r[7])
        if durations is None:
            durations = fig.unpack_durations(r[11])
        if durations:
            self._durations.append(durations)

    def figures(self) -> Figures:
        med, p90 = fig.merged_median_p90(self._durations)
        return _figures(self.started, self.completed, self.abandoned, self.face, med, p90)


def _figures(started: int, completed: int, abandoned: int, face: int, med: float | None, p90: float | None) -> Figures:
    ended = completed + abandoned
    return Figures(
        started=started,
        completed=completed,
        abandoned=abandoned,
        face_login_sessions=face,
        completion_rate=fig.ratio(completed, ended),
        abandon_rate=fig.ratio(abandoned, ended),
        face_login_share=fig.ratio(face, started),
        median_duration_s=med,
        p90_duration_s=p90,
    )


def _stored_figures(counts: Sequence[Any], med: Any, p90: Any) -> Figures:
    c = [int(x) for x in counts]
    return _figures(c[0], c[1], c[2], c[3], None if med is None else float(med), None if p90 is None else float(p90))


def _bucket(code: str, hour: int | None, weekday: int, t: fig.Tally) -> BucketRow:
    durations = t.sorted_durations()
    return BucketRow(
        code,
        hour,
        weekday,
        t.started,
        t.completed,
        t.abandoned,
        t.face_login_sessions,
        sum(durations),
        fig.median(durations),
        fig.p90(durations),
        durations if hour is None else (),
    )


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _zone(office: str, name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("office %s has unknown timezone %r; using UTC for its usage buckets", office, name)
        return UTC


def _writer(db_path: Any) -> sqlite3.Connection:
    conn = connect(db_path)
    # Rollups are rebuilt from the events table, so a mark lost in a power cut is re-made by
    # catch_up(); no need to pay an fsync per ingest batch for it.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn
