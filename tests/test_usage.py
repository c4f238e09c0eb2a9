"""Usage statistics: rollups equal figures computed independently from the raw events table.

Independent here means plain Python over `SELECT ... FROM events`, with its own median and p90
(the definitions are in fleet_server.usage.figures: median = middle value or mean of the two
middle values; p90 = nearest rank, sorted[ceil(0.9 n) - 1]).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sqlite3
import statistics
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from zoneinfo import ZoneInfo

import pytest
import sqlite_utils
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from fleet_dev.proc import wait_for
from fleet_dev.sim import SimClock, SimulatedFleet, TrafficModel, load_catalogue
from fleet_dev.sim.traffic import BEIJING
from fleet_server.app import FleetServer, create_app
from fleet_server.auth.models import Role
from fleet_server.config import SEED_DIR, ServerSettings
from fleet_server.db import connect, migrate
from fleet_server.ingest.store import IngestStore
from fleet_server.registry.service import RegistryService
from fleet_server.usage import figures
from fleet_server.usage.routes import build_usage_router
from fleet_server.usage.service import UsageService
from fleet_server.usage.store import UsageStore
from fleet_server.usage.store import migrations as usage_migrations

SERVICE_TYPES = ("service.started", "service.completed", "service.abandoned")
MONDAY = date(2026, 11, 23)


# -- helpers ----------------------------------------------------------------------------------------


class EventWriter:
    """Writes rows into the events table exactly as the ingest stores them."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.store = IngestStore(conn)
        self.seq = 0

    def add(
        self,
        office: str,
        etype: str,
        ts: str,
        code: str,
        *,
        face: bool = False,
        duration: float | None = None,
        terminal: str = "t-1",
        received: str = "2026-11-27T00:00:00.000Z",
    ) -> tuple[Any, ...]:
        self.seq += 1
        body: dict[str, Any] = {"session": f"s{self.seq}", "service_code": code, "face_login": face}
        if duration is not None:
            body["duration_s"] = duration
        row = (terminal, "e1", self.seq, uuid.uuid4().hex, etype, ts, received, office, json.dumps(body))
        self.store.write([row], (), (), ())
        return row


def _usage_db(path: Path) -> sqlite3.Connection:
    migrate(path, usage_migrations)
    conn = connect(path)
    RegistryService(conn).seed_offices(SEED_DIR / "offices.yaml")
    return conn


def _p90(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1] if ordered else None


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def usage_db(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, UsageService, CollectorRegistry]]:
    conn = _usage_db(tmp_path / "fleet.db")
    registry = CollectorRegistry()
    usage = UsageService(tmp_path / "fleet.db", registry)
    yield conn, usage, registry
    assert usage.errors == 0, "a usage rebuild failed (see the log)"
    usage.close()
    conn.close()


def _by_key(rows: list[Any], *keys: str) -> dict[tuple[Any, ...], Any]:
    return {tuple(getattr(r, k) for k in keys): r for r in rows}


# -- (a) hand-built events ----------------------------------------------------------------------------


def test_rollups_equal_hand_computed_figures_in_office_local_hours(usage_db: Any) -> None:
    conn, usage, registry = usage_db
    w = EventWriter(conn)
    # haidian is Asia/Shanghai (UTC+8): 01:xxZ is 09:xx local on Monday 23 November.
    late_first = [w.add("haidian", "service.abandoned", "2026-11-23T02:01:00.000Z", "TQ02", face=True, duration=40)]
    rows = [
        w.add("haidian", "service.started", "2026-11-23T01:05:00.000Z", "TQ02", face=True),
        w.add("haidian", "service.started", "2026-11-23T01:10:00.000Z", "TQ02", face=True),
        w.add("haidian", "service.started", "2026-11-23T01:20:00.000Z", "TQ02", face=False),
        w.add("haidian", "service.started", "2026-11-23T01:50:00.000Z", "TQ02", face=True),
        w.add("haidian", "service.completed", "2026-11-23T01:08:00.000Z", "TQ02", face=True, duration=100),
        w.add("haidian", "service.completed", "2026-11-23T01:59:00.000Z", "TQ02", face=True, duration=300),
        w.add("haidian", "service.completed", "2026-11-23T01:15:00.000Z", "TQ02", face=False, duration=200),
        w.add("haidian", "service.started", "2026-11-23T02:00:00.000Z", "TQ02", face=True),
        # the last millisecond of Monday and the first of Tuesday, local time
        w.add("haidian", "service.started", "2026-11-23T15:59:59.999Z", "CX01"),
        w.add("haidian", "service.started", "2026-11-23T16:00:00.000Z", "CX01"),
        w.add("dongcheng", "service.started", "2026-11-23T01:05:00.000Z", "TQ02", face=True),
        w.add("haidian", "telemetry.sample", "2026-11-23T01:05:00.000Z", "TQ02"),
    ]
    for i, d in enumerate((70, 10, 40, 100, 20, 90, 30, 60, 50, 80)):  # 10 values, unsorted
        rows.append(w.add("haidian", "service.completed", f"2026-11-23T06:{i:02d}:00.000Z", "CX03", duration=d))
    # out of order: the later event is marked and rebuilt first, the earlier ones arrive afterwards
    usage.mark_dirty(late_first)
    assert usage.recompute() == 1
    usage.mark_dirty(rows)
    assert usage.recompute() == 3  # haidian Mon, haidian Tue, dongcheng Mon
    assert usage.recompute() == 0
    assert usage.mark_all() == 3  # rebuilding what is rolled up already must not count it twice
    assert usage.recompute() == 3

    items = _by_key(usage.item_table(["haidian"], MONDAY, MONDAY).rows, "service_code")
    tq02 = items[("TQ02",)]
    assert (tq02.started, tq02.completed, tq02.abandoned, tq02.face_login_sessions) == (5, 3, 1, 4)
    assert (tq02.median_duration_s, tq02.p90_duration_s) == (200.0, 300.0)
    assert (tq02.completion_rate, tq02.abandon_rate, tq02.face_login_share) == (0.75, 0.25, 0.8)
    assert tq02.name == "租房提取"
    cx03 = items[("CX03",)]
    assert (cx03.completed, cx03.median_duration_s, cx03.p90_duration_s) == (10, 55.0, 90.0)
    assert items[("CX01",)].started == 1  # only Monday's; Tuesday's belongs to the next day

    hours = _by_key(
        usage.hour_table(["haidian"], MONDAY, MONDAY + timedelta(days=1)).rows, "day", "hour", "service_code"
    )
    assert set(hours) == {
        (MONDAY, 9, "TQ02"),
        (MONDAY, 10, "TQ02"),
        (MONDAY, 14, "CX03"),
        (MONDAY, 23, "CX01"),
        (MONDAY + timedelta(days=1), 0, "CX01"),
    }
    h9, h10 = hours[(MONDAY, 9, "TQ02")], hours[(MONDAY, 10, "TQ02")]
    assert (h9.started, h9.completed, h9.abandoned, h9.face_login_sessions) == (4, 3, 0, 3)
    assert (h9.median_duration_s, h9.p90_duration_s) == (200.0, 300.0)
    assert (h10.started, h10.abandoned, h10.median_duration_s, h10.completion_rate) == (1, 1, None, 0.0)

    # a late event for an already rolled-up hour changes it; nothing else is counted again
    late = w.add("haidian", "service.completed", "2026-11-23T01:30:00.000Z", "TQ02", duration=400)
    usage.mark_dirty([late])
    assert usage.recompute() == 1
    tq02 = _by_key(usage.item_table(["haidian"], MONDAY, MONDAY).rows, "service_code")[("TQ02",)]
    assert (tq02.started, tq02.completed, tq02.abandoned) == (5, 4, 1)
    assert (tq02.median_duration_s, tq02.p90_duration_s) == (250.0, 400.0)

    assert _sample(registry, "fleet_usage_sessions_total", office="haidian", outcome="started") == 7
    assert _sample(registry, "fleet_usage_sessions_total", office="haidian", outcome="completed") == 14
    assert _sample(registry, "fleet_usage_sessions_total", office="dongcheng", outcome="started") == 1
    assert _sample(registry, "fleet_usage_dirty_buckets") == 0
    assert _sample(registry, "fleet_usage_rebuilt_buckets_total") == 8


def test_mark_made_during_a_rebuild_survives_it(usage_db: Any) -> None:
    conn, usage, _ = usage_db
    w = EventWriter(conn)
    usage.mark_dirty([w.add("haidian", "service.started", "2026-11-23T01:05:00.000Z", "TQ02")])
    with closing(connect(usage._db_path)) as other:
        store = UsageStore(other)
        ((office, day, version),) = store.dirty_batch(10)
        # an event stored and marked after the rebuild read its version, before it swapped in
        usage.mark_dirty([w.add("haidian", "service.started", "2026-11-23T01:06:00.000Z", "TQ02")])
        assert store.replace_day(office, day, version, [], [], 0) is False
        assert store.dirty_count() == 1
    assert usage.recompute() == 1
    assert usage.item_table(["haidian"], MONDAY, MONDAY).rows[0].started == 2


def test_tick_catches_up_events_that_were_never_marked(usage_db: Any) -> None:
    conn, usage, _ = usage_db
    w = EventWriter(conn)
    for i in range(3):  # e.g. the server died between the ingest COMMIT and the hook
        w.add("miyun", "service.started", f"2026-11-24T0{i}:00:00.000Z", "DK01")
    assert usage.tick() == 1
    assert usage.item_table(["miyun"], MONDAY, MONDAY + timedelta(days=1)).rows[0].started == 3


def test_restart_catches_up_only_events_received_near_or_after_the_watermark(usage_db: Any) -> None:
    conn, usage, _ = usage_db
    w = EventWriter(conn)
    w.add("miyun", "service.started", "2026-11-09T02:00:00.000Z", "DK01", received="2026-11-10T00:00:00.000Z")
    usage.mark_dirty(
        [w.add("miyun", "service.started", "2026-11-19T02:00:00.000Z", "DK01", received="2026-11-20T00:00:00.000Z")]
    )
    # stored, then the server died before its hook ran
    w.add("miyun", "service.started", "2026-11-18T02:00:00.000Z", "DK01", received="2026-11-20T00:05:00.000Z")
    restarted = UsageService(usage._db_path, CollectorRegistry())
    try:
        assert restarted.catch_up() == 2  # Nov 18 and (again) Nov 19, not the old Nov 9
        assert restarted.tick() == 2
        days = restarted.compare_offices(["miyun"], date(2026, 11, 1), date(2026, 11, 30)).offices[0]
        assert days.started == 2
    finally:
        restarted.close()


def test_figure_definitions() -> None:
    assert figures.median([1.0, 2.0, 3.0, 4.0]) == 2.5 and figures.median([5.0]) == 5.0
    assert figures.p90([float(v) for v in range(1, 11)]) == 9.0
    assert figures.p90([float(v) for v in range(1, 12)]) == 10.0  # ceil(9.9) = 10th of 11
    assert figures.median([]) is None and figures.p90([]) is None and figures.ratio(1, 0) is None


def _runs(rng: random.Random, kind: str, count: int) -> list[array[float]]:
    out = []
    for i in range(count):
        size = rng.choice([0, 1, 2, 7, 30, 240])
        if kind == "tenths":  # what terminals send: 0.1 s steps, many equal values across days
            values = [round(rng.uniform(40, 400), 1) for _ in range(size)]
        elif kind == "few_values":
            values = [float(rng.randint(1, 3)) for _ in range(size)]
        elif kind == "skewed":  # a long tail and a lump at the 24 h limit
            values = [86400.0 if rng.random() < 0.12 else rng.expovariate(0.01) for _ in range(size)]
        else:  # "disjoint": each run in its own range, so a run's sample share is all or nothing
            values = [i * 10 + rng.random() for _ in range(size)]
        out.append(array("d", sorted(values)))
    return out


@pytest.mark.parametrize("kind", ["tenths", "few_values", "skewed", "disjoint"])
def test_range_median_and_p90_select_exactly_what_a_full_merge_gives(kind: str) -> None:
    rng = random.Random(kind)
    for count in (1, 2, 40, 900, 3000):
        runs = _runs(rng, kind, count)
        merged = sorted(v for r in runs for v in r)
        assert figures.merged_median_p90(runs) == (figures.median(merged), figures.p90(merged)), (kind, count)
        n = len(merged)
        if n <= figures.SMALL_MERGE:
            continue
        spans = [(0, 0), (n // 3, n // 3 + 5), (n - 2, n - 1)]
        # margin 0: every guess is too narrow at first, so the widening is what finds the ranks
        for margin in (None, 0):
            got = figures.select_ranks(runs, spans, margin=margin)
            assert got == [merged[a : b + 1] for a, b in spans], (kind, count, margin)
    with pytest.raises(IndexError, match="outside"):
        figures.select_ranks([array("d", [1.0]), array("d", [2.0])], [(0, 2)])


def test_packed_durations_keep_every_double_exactly() -> None:
    values = sorted([0.0, 0.1, 1 / 3, 95.5, 86400.0, 5e-324, 12345.678901234567])
    assert list(figures.unpack_durations(figures.pack_durations(values))) == values
    assert figures.pack_durations([1.0]) == b"\x00\x00\x00\x00\x00\x00\xf0\x3f"  # little-endian on any host
    assert len(figures.unpack_durations(figures.pack_durations([]))) == 0


def test_migration_packs_the_json_durations_of_existing_day_rollups(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    migrate(path)
    with closing(connect(path)) as conn:  # a database made before 0002: durations as JSON text
        usage_migrations.apply(sqlite_utils.Database(conn), stop_before="0002_usage_durations_binary")
        RegistryService(conn).seed_offices(SEED_DIR / "offices.yaml")
        conn.execute(
            "INSERT INTO usage_day VALUES ('haidian','2026-11-23','TQ02',0,4,3,1,2,600.0,200.0,300.0,?)",
            (json.dumps([100.0, 200.0, 300.0]),),
        )
        conn.execute(
            "INSERT INTO usage_day VALUES ('haidian','2026-11-24','TQ02',1,2,2,0,0,95.5,47.75,55.5,?)",
            (json.dumps([40.0, 55.5]),),
        )
    migrate(path, usage_migrations)
    with closing(connect(path)) as conn:
        (blob,) = conn.execute("SELECT durations FROM usage_day WHERE day='2026-11-23'").fetchone()
        assert isinstance(blob, bytes) and list(figures.unpack_durations(blob)) == [100.0, 200.0, 300.0]
    usage = UsageService(path, CollectorRegistry())
    try:
        (row,) = usage.item_table(["haidian"], MONDAY, MONDAY + timedelta(days=1)).rows
        assert (row.started, row.completed, row.median_duration_s, row.p90_duration_s) == (6, 5, 100.0, 300.0)
    finally:
        usage.close()


# -- (b) the real pipeline: agents -> broker -> ingest -> rollups -------------------------------------


def _independent(db_path: Path) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]], dict[Any, int]]:
    """Hourly and whole-range figures and outcome counts, straight from the events table."""
    with sqlite3.connect(db_path) as conn:
        zones = {o: ZoneInfo(tz) for o, tz in conn.execute("SELECT id, timezone FROM offices")}
        events = list(conn.execute("SELECT office_id, type, ts, body FROM events WHERE type IN (?,?,?)", SERVICE_TYPES))
    hourly: dict[Any, dict[str, Any]] = defaultdict(lambda: defaultdict(int) | {"d": []})
    total: dict[Any, dict[str, Any]] = defaultdict(lambda: defaultdict(int) | {"d": []})
    outcomes: dict[Any, int] = defaultdict(int)
    for office, etype, ts, body in events:
        doc = json.loads(body)
        local = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).astimezone(zones[office])
        kind = etype.split(".")[1]
        outcomes[(office, kind)] += 1
        for acc in (
            hourly[(office, local.date(), local.hour, doc["service_code"])],
            total[(office, doc["service_code"])],
        ):
            acc[kind] += 1
            acc["face"] += int(kind == "started" and doc["face_login"])
            if kind == "completed":
                acc["d"].append(doc["duration_s"])
    return hourly, total, outcomes


def _assert_same(row: Any, expected: dict[str, Any], where: Any) -> None:
    got = (
        row.started,
        row.completed,
        row.abandoned,
        row.face_login_sessions,
        row.median_duration_s,
        row.p90_duration_s,
    )
    durations = expected["d"]
    want = (
        expected["started"],
        expected["completed"],
        expected["abandoned"],
        expected["face"],
        statistics.median(durations) if durations else None,
        _p90(durations),
    )
    assert got == pytest.approx(want), f"{where}: rollup {got} != raw {want}"


def _session_events(
    model: TrafficModel, tid: str, starts: list[datetime]
) -> list[tuple[str, dict[str, Any], datetime]]:
    return [(ev.type, ev.body, ev.at.astimezone(UTC)) for s in starts for ev in model.session(tid, s)]


def test_rollups_from_simulated_traffic_with_late_and_resent_events_equal_raw_figures(make_stack: Any) -> None:
    st = make_stack(7)  # t-000 and t-006 are both at dongcheng
    # the server's own usage service (wired to the ingest hook and its scheduler)
    usage = st.server.usage
    registry = st.server.metrics_registry
    try:
        # t-006 is offline all morning: its citizens were served, the events wait in its outbox
        offline = st.agent("t-006")
        st.tracked_agents.append(offline)
        model = TrafficModel(load_catalogue(), random.Random(11))
        monday_9 = datetime.combine(MONDAY, datetime.min.time(), BEIJING).replace(hour=9)
        starts = [monday_9 - timedelta(minutes=55) + timedelta(minutes=4 * k) for k in range(25)] + [
            monday_9 - timedelta(hours=18) + timedelta(minutes=7 * k) for k in range(8)
        ]
        late_events = _session_events(model, "t-006", starts)
        offline.post_events(late_events)

        agents = [st.agent(tid) for tid in ("t-000", "t-001", "t-002")]
        st.tracked_agents.extend(agents)
        for a in agents:
            a.start()
        fleet = SimulatedFleet(agents, SimClock(monday_9, 600.0, time.time()), peak_sessions_per_hour=120)
        now = time.time()
        for i in range(40):  # 40 simulated minutes of a busy Monday morning
            fleet.step(now + i * 0.1, 0.1)
        on_time = fleet.counters.events_posted
        assert fleet.counters.by_type.get("service.started", 0) > 20
        wait_for(lambda: st.stored() == on_time, 30, what=f"{on_time} on-time events stored")
        usage.recompute(limit=1000)
        before = _by_key(usage.item_table(["dongcheng"], MONDAY, MONDAY).rows, "service_code")

        # receipts lost: the terminal re-sends what the server already stored, which dedupes it
        publish = st.server.ingest.publish
        st.server.ingest.publish = lambda topic, payload: None
        extra = _session_events(model, "t-000", [monday_9 + timedelta(hours=2, minutes=k) for k in range(10)])
        agents[0].post_events(extra)
        wait_for(lambda: st.stored() == on_time + len(extra), 30, what="re-sent batch stored")
        st.settle()  # the usage hook marks the batch's office-days after COMMIT
        wait_for(
            lambda: _sample(st.server.metrics_registry, "fleet_ingest_duplicates_total") > 0,
            30,
            what="the terminal to re-send stored events",
        )
        st.server.ingest.publish = publish

        offline.start()  # back online: hours-old events arrive after their buckets were rolled up
        total = on_time + len(extra) + len(late_events)
        wait_for(lambda: st.stored() == total, 30, what=f"{total} events incl. late ones stored")
        st.settle()  # the rows are visible at COMMIT; the usage hook marks their office-days after it
        usage.recompute(limit=1000)

        hourly, whole, outcomes = _independent(st.settings.db_path)
        first, last = MONDAY - timedelta(days=1), MONDAY
        got_hours = _by_key(usage.hour_table(None, first, last).rows, "office_id", "day", "hour", "service_code")
        assert set(got_hours) == set(hourly)
        for key, expected in hourly.items():
            _assert_same(got_hours[key], expected, key)
        got_items = _by_key(usage.item_table(None, first, last).rows, "office_id", "service_code")
        assert set(got_items) == set(whole)
        for key, expected in whole.items():
            _assert_same(got_items[key], expected, key)
        # the late events really landed in buckets that had been rolled up already
        after = _by_key(usage.item_table(["dongcheng"], MONDAY, MONDAY).rows, "service_code")
        assert sum(r.started for r in after.values()) > sum(r.started for r in before.values()) > 0
        assert any(day == first for (_, day, _, _) in got_hours), "no late event from the day before"
        # the counter counts stored events once, duplicates and late arrivals included correctly
        st.settle()  # the rows are visible at COMMIT; the counter is the after-commit hook's
        counted = {
            (office, kind): _sample(registry, "fleet_usage_sessions_total", office=office, outcome=kind)
            for (office, kind) in outcomes
        }
        assert counted == {k: float(n) for k, n in outcomes.items()}
        busy = usage.busy_hours(None, first, last)
        assert busy.started == sum(n for (_, kind), n in outcomes.items() if kind == "started")
        assert usage.errors == 0
    finally:
        pass


# -- (c, d, e) HTTP: roles, CSV, charts, bad input -----------------------------------------------------

ADMIN_TOKEN = "usage-admin-token-" + "x" * 20


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, FleetServer, UsageService]]:
    settings = ServerSettings(environment="development", db_path=tmp_path / "fleet.db", admin_token=ADMIN_TOKEN)
    server = FleetServer(settings, CollectorRegistry())
    usage = server.usage
    conn = connect(settings.db_path)
    w = EventWriter(conn)
    rng = random.Random(5)
    rows = []
    for office in ("haidian", "dongcheng", "miyun"):
        for i in range(60):
            code = rng.choice(["TQ01", "TQ02", "CX01", "DY01"])
            ts = datetime(2026, 11, 23 + i % 3, 1 + i % 7, i % 60, tzinfo=UTC)
            stamp = figures.format_ts(ts)
            face = code != "DY01"
            rows.append(w.add(office, "service.started", stamp, code, face=face, terminal=f"{office}-{i % 2}"))
            kind = "service.abandoned" if i % 5 == 0 else "service.completed"
            rows.append(
                w.add(
                    office,
                    kind,
                    figures.format_ts(ts + timedelta(minutes=2)),
                    code,
                    face=face,
                    duration=float(60 + rng.randint(0, 300)),
                    terminal=f"{office}-{i % 2}",
                )
            )
    conn.close()
    usage.mark_dirty(rows)
    usage.recompute()
    # the lifespan would start the ingest and broker link; these tests need only HTTP
    app = create_app(settings, server)
    app.include_router(build_usage_router())
    yield TestClient(app), server, usage
    usage.close()
    server.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


RANGE = {"date_from": "2026-11-23", "date_to": "2026-11-25"}


def test_manager_sees_only_their_offices_and_nobody_sees_anything_without_a_token(api: Any) -> None:
    client, server, _ = api
    manager = server.auth.create_user("m", Role.MANAGER, ["haidian"])
    auditor = server.auth.create_user("a", Role.AUDITOR)

    assert client.get("/api/v1/usage/items", params=RANGE).status_code == 401
    assert client.get("/api/v1/usage/items", params=RANGE, headers=_auth("wrong")).status_code == 401
    assert client.get("/api/v1/usage/items", params=RANGE, headers=_auth(auditor)).status_code == 403

    mine = client.get("/api/v1/usage/items", params=RANGE, headers=_auth(manager))
    assert mine.status_code == 200
    assert mine.json()["offices"] == ["haidian"]
    assert {r["office_id"] for r in mine.json()["rows"]} == {"haidian"}
    compared = client.get("/api/v1/usage/offices", params=RANGE, headers=_auth(manager)).json()
    assert [o["office_id"] for o in compared["offices"]] == ["haidian"]

    other = client.get("/api/v1/usage/items", params={**RANGE, "office": "dongcheng"}, headers=_auth(manager))
    assert other.status_code == 403 and "dongcheng" in other.json()["detail"]
    both = client.get(
        "/api/v1/usage/export.csv", params={**RANGE, "office": ["haidian", "dongcheng"]}, headers=_auth(manager)
    )
    assert both.status_code == 403
    chart = client.get("/api/v1/usage/charts/items.svg", params={**RANGE, "office": "miyun"}, headers=_auth(manager))
    assert chart.status_code == 403

    everything = client.get("/api/v1/usage/offices", params=RANGE, headers=_auth(ADMIN_TOKEN)).json()
    assert len(everything["offices"]) == 18
    busy = {o["office_id"]: o for o in everything["offices"]}
    assert busy["haidian"]["started"] == 60 and busy["fengtai"]["started"] == 0
    assert busy["haidian"]["terminal_days"] == 6  # two terminals on each of three days
    assert busy["haidian"]["sessions_per_terminal_day"] == 10.0


def test_csv_export_parses_and_matches_the_rollups(api: Any) -> None:
    client, _, usage = api
    resp = client.get(
        "/api/v1/usage/export.csv", params={**RANGE, "office": ["haidian", "miyun"]}, headers=_auth(ADMIN_TOKEN)
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/csv")
    assert resp.headers["content-disposition"] == 'attachment; filename="usage-total-2026-11-23-2026-11-25.csv"'
    assert resp.content.startswith(b"\xef\xbb\xbf")  # BOM: Excel then reads UTF-8
    rows = list(csv.DictReader(io.StringIO(resp.content.decode("utf-8-sig"))))
    table = usage.item_table(["haidian", "miyun"], date(2026, 11, 23), date(2026, 11, 25))
    assert len(rows) == len(table.rows) > 4
    for got, want in zip(rows, table.rows, strict=True):
        assert (got["office_id"], got["service_code"], got["item_name"]) == (
            want.office_id,
            want.service_code,
            want.name,
        )
        assert (int(got["started"]), int(got["completed"]), int(got["abandoned"])) == (
            want.started,
            want.completed,
            want.abandoned,
        )
        assert float(got["median_duration_s"]) == pytest.approx(want.median_duration_s)
        assert float(got["p90_duration_s"]) == pytest.approx(want.p90_duration_s)
        assert float(got["completion_rate"]) == pytest.approx(want.completion_rate, abs=1e-4)
    assert {r["office_name"] for r in rows} == {"海淀管理部", "密云管理部"}

    hourly = client.get(
        "/api/v1/usage/export.csv",
        params={**RANGE, "granularity": "hour", "office": "miyun"},
        headers=_auth(ADMIN_TOKEN),
    )
    hour_rows = list(csv.DictReader(io.StringIO(hourly.content.decode("utf-8-sig"))))
    assert sum(int(r["started"]) for r in hour_rows) == 60
    assert {int(r["hour"]) for r in hour_rows} == set(range(9, 16))  # 01..07Z is 09..15 in Beijing


def test_charts_are_svg_with_the_office_figures(api: Any) -> None:
    client, _, _ = api
    for name, extra in (("busy-hours", {}), ("items", {"office": "haidian"}), ("offices", {"metric": "abandon_rate"})):
        resp = client.get(f"/api/v1/usage/charts/{name}.svg", params={**RANGE, **extra}, headers=_auth(ADMIN_TOKEN))
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("image/svg+xml")
        root = ElementTree.fromstring(resp.content)  # well-formed XML, Chinese names escaped properly
        assert root.tag.endswith("svg")
    items = client.get(
        "/api/v1/usage/charts/items.svg", params={**RANGE, "office": "haidian"}, headers=_auth(ADMIN_TOKEN)
    ).text
    assert "租房提取" in items and "海淀管理部" in items


def test_bad_input_gets_422_or_404_with_a_clear_message(api: Any) -> None:
    client, _, _ = api
    admin = _auth(ADMIN_TOKEN)
    get = client.get
    unknown = get("/api/v1/usage/items", params={**RANGE, "office": "atlantis"}, headers=admin)
    assert unknown.status_code == 404 and "atlantis" in unknown.json()["detail"]
    bad_date = get("/api/v1/usage/items", params={"date_from": "23/11/2026"}, headers=admin)
    assert bad_date.status_code == 422 and "date_from" in str(bad_date.json()["detail"])
    backwards = get("/api/v1/usage/items", params={"date_from": "2026-11-25", "date_to": "2026-11-01"}, headers=admin)
    assert backwards.status_code == 422 and "after" in backwards.json()["detail"]
    too_long = get("/api/v1/usage/offices", params={"date_from": "2024-01-01", "date_to": "2026-01-01"}, headers=admin)
    assert too_long.status_code == 422 and "366" in too_long.json()["detail"]
    hourly = get("/api/v1/usage/hourly", params={"date_from": "2026-01-01", "date_to": "2026-11-01"}, headers=admin)
    assert hourly.status_code == 422 and "31" in hourly.json()["detail"]
    assert get("/api/v1/usage/export.csv", params={"granularity": "week"}, headers=admin).status_code == 422
    assert get("/api/v1/usage/charts/offices.svg", params={"metric": "x"}, headers=admin).status_code == 422
    assert get("/api/v1/usage/periods", params=RANGE, headers=admin).status_code == 422  # base_* missing
    assert get("/api/v1/usage/charts/pie.svg", headers=admin).status_code == 404


def test_period_comparison_against_the_pilot(api: Any) -> None:
    client, _, _ = api
    resp = client.get(
        "/api/v1/usage/periods",
        headers=_auth(ADMIN_TOKEN),
        params={
            "office": "haidian",
            "base_from": "2026-11-23",
            "base_to": "2026-11-23",
            "date_from": "2026-11-24",
            "date_to": "2026-11-25",
        },
    )
    assert resp.status_code == 200, resp.text
    (haidian,) = resp.json()["offices"]
    assert haidian["base"]["started"] == 20 and haidian["current"]["started"] == 40
    assert haidian["started_change"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x","点")', "+1+2", "-2+3", "@SUM(A1)", "\tcmd", "\r=1"])
def test_csv_export_neutralises_cells_a_spreadsheet_would_run_as_formulas(api: Any, name: str) -> None:
    client, _, _ = api
    office = {"id": "haidian", "name": name, "name_en": name, "district": "海淀区", "pilot": True}
    assert client.post("/api/v1/offices", json=office, headers=_auth(ADMIN_TOKEN)).status_code == 201
    for granularity in ("total", "day", "hour"):
        resp = client.get(
            "/api/v1/usage/export.csv",
            params={**RANGE, "office": "haidian", "granularity": granularity},
            headers=_auth(ADMIN_TOKEN),
        )
        rows = list(csv.DictReader(io.StringIO(resp.content.decode("utf-8-sig"), newline="")))
        assert rows, granularity
        assert {r["office_name"] for r in rows} == {"'" + name}, granularity
        # numbers stay numbers
        assert all(int(r["started"]) >= 0 for r in rows)
