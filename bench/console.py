"""Console benchmark: every console page fetched as a logged-in user from a fleet server with
10,000 registered terminals across the 18 offices and a few weeks of usage events, next to the
JSON API calls each page is built from, in the same run over the same real HTTP.

    python bench/console.py --quick

The terminals are registered straight into the registry table and their heartbeats handed to the
health service's ingest hook (no 10,000 agents on 2 cores); the usage events are written into the
events table as the ingest stores them, then rolled up by the real usage service. Everything the
pages and the API read is the server's own code on that data.

Last line: one JSON object with `terminals`, each page's median ms, the API medians,
`slowest_page_ms_median` (target <= 300) and `slowest_page_vs_api_ratio` (the slowest page's median
over the median of the API calls it is built from, summed per round; target <= 2).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet_dev.bench import emit, machine
from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from fleet_server.app import create_app
from fleet_server.auth.models import Role
from fleet_server.broker.mosquitto import hash_password
from fleet_server.clock import utc_iso
from fleet_server.db import connect
from fleet_server.ingest.store import IngestStore

PASSWORD = "bench-console-password"
BEIJING_OFFSET = timedelta(hours=8)
ITEMS = ["TQ01", "TQ02", "TQ03", "DK01", "DK02", "CX01", "CX02", "CX03", "DY01", "ZH01"]
TREND_WEEKS = 8  # the usage page's weekly trend (fleet_server.console.views.TREND_WEEKS)


def register(st: DevStack, n: int) -> dict[str, str]:
    """n terminals spread over every office, straight into the registry table."""
    assert st.server is not None
    offices = [o.id for o in st.server.registry.offices()]
    tids = {f"t{i:05d}": offices[i % len(offices)] for i in range(n)}
    h = hash_password("unused-in-this-bench")
    with st.server.lock:
        conn = st.server._conn
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO terminals (id, office_id, profile, tags, password_hash, enabled, created_at)"
            " VALUES (?,?,?,?,?,1,?)",
            [(t, o, "generic", "[]", h, "2026-01-01T00:00:00Z") for t, o in tids.items()],
        )
        conn.execute("COMMIT")
    st.server.ingest.refresh_terminals()
    st.server.health.refresh_registry()
    return tids


def heartbeats(st: DevStack, tids: dict[str, str], rng: random.Random) -> None:
    """One status document per terminal through the health service's ingest hook; 3% stay silent."""
    assert st.server is not None
    now = utc_iso(time.time())
    rows = []
    for t in tids:
        if rng.random() < 0.03:
            continue
        printer = {"state": "warn", "check": "paper_left_pct", "reading": {"paper_left_pct": 4.0}, "limit": 5.0}
        doc = {
            "version": rng.choice(["0.1.0", "0.1.0", "0.1.0", "0.2.0"]),
            "outbox": {"depth": rng.randint(0, 3), "oldest_age_s": 1.0},
            "disk_pct": rng.uniform(20, 70),
            "peripherals": {"receipt_printer": printer if rng.random() < 0.02 else {"state": "ok"}},
        }
        rows.append((t, "online", "heartbeat", "", now, json.dumps(doc)))
    st.server.health.on_status(rows)
    st.server.health.sweep()


def usage_events(st: DevStack, tids: dict[str, str], weeks: int, per_day: int, rng: random.Random) -> int:
    """`per_day` sessions per terminal per weekday over `weeks` weeks, as the ingest stores them."""
    assert st.server is not None
    today = (datetime.now(UTC) + BEIJING_OFFSET).date()
    days = [today - timedelta(days=k) for k in range(1, weeks * 7 + 1)]
    days = [d for d in days if d.weekday() < 5]
    received = utc_iso(time.time())
    n = 0
    with connect(st.settings.db_path) as conn:
        for day in days:
            rows = []
            for t, office in tids.items():
                for s in range(per_day):
                    hour = rng.choice([9, 9, 10, 10, 11, 13, 14, 14, 15, 16])
                    start = (
                        datetime(day.year, day.month, day.day, hour, rng.randint(0, 59), tzinfo=UTC) - BEIJING_OFFSET
                    )
                    code = rng.choice(ITEMS)
                    face = code != "DY01"
                    session = f"{t}-{day}-{s}"
                    seq = n + 1
                    rows.append(
                        (t, "e1", seq, uuid.uuid4().hex, "service.started", utc_iso(start), received, office,
                         json.dumps({"session": session, "service_code": code, "face_login": face}))
                    )  # fmt: skip
                    done = rng.random() > 0.12
                    end = start + timedelta(seconds=rng.uniform(40, 400))
                    body = {"session": session, "service_code": code, "face_login": face}
                    if done:
                        body["duration_s"] = round((end - start).total_seconds(), 1)
                    rows.append(
                        (t, "e1", seq + 1, uuid.uuid4().hex, "service.completed" if done else "service.abandoned",
                         utc_iso(end), received, office, json.dumps(body))
                    )  # fmt: skip
                    n += 2
            IngestStore(conn).write(rows, (), (), ())  # as the ingest stores them (stream numbers too)
    st.server.usage.mark_all()
    while st.server.usage.recompute(limit=10_000):
        pass
    return n


def login(url: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token, "no CSRF token on the login page"
    r = client.post("/login", data={"name": name, "password": PASSWORD, "csrf": token.group(1), "next": "/"})
    assert r.status_code in (200, 303), r.status_code
    assert "fleet_session" in client.cookies, "login did not set a session"
    return client


def timed(call: Callable[[], httpx.Response]) -> float:
    t0 = time.perf_counter()
    r = call()
    elapsed = (time.perf_counter() - t0) * 1000
    assert r.status_code == 200, (r.request.url, r.status_code, r.text[:300])
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and sessions")
    p.add_argument("--terminals", type=int, default=10_000)
    args = p.parse_args()
    rounds = 7 if args.quick else 21
    weeks, per_day = (3, 2) if args.quick else (4, 6)
    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        st = DevStack(Path(tmp))
        assert st.server is not None
        fleet = st.server
        t0 = time.monotonic()
        tids = register(st, args.terminals)
        heartbeats(st, tids, rng)
        print(f"registered {len(tids)} terminals in {time.monotonic() - t0:.1f} s", flush=True)
        t0 = time.monotonic()
        events = usage_events(st, tids, weeks, per_day, rng)
        print(
            f"{events} usage events over {weeks} weeks stored and rolled up in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
        fleet.auth.bootstrap_password("admin", PASSWORD)
        manager_token = fleet.auth.create_user("wang", Role.MANAGER, ["haidian"])
        fleet.auth.set_password("admin", "wang", PASSWORD)

        port = free_port()
        app = create_app(st.settings, fleet)  # the broker link is not started: pages and API only
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, name="bench-http", daemon=True).start()
        wait_for(lambda: server.started, 15, what="HTTP server")
        url = f"http://127.0.0.1:{port}"
        admin = login(url, "admin")
        manager = login(url, "wang")
        api = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {st.admin_token}"})
        api_manager = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {manager_token}"})

        first, last = fleet.usage.default_range()
        base_to = last - timedelta(weeks=4)
        base_from = base_to - timedelta(days=6)
        rng_q = {"date_from": str(first), "date_to": str(last)}
        one = sorted(t for t, o in tids.items() if o == "haidian")[0]

        def usage_api(client: httpx.Client, office: str | None) -> list[Callable[[], httpx.Response]]:
            q: dict[str, Any] = dict(rng_q, **({"office": office} if office else {}))
            calls: list[Callable[[], httpx.Response]] = [
                lambda: client.get("/api/v1/usage/offices", params=q),
                lambda: client.get("/api/v1/usage/items", params=q),
                lambda: client.get("/api/v1/usage/busy-hours", params=q),
                lambda: client.get(
                    "/api/v1/usage/periods", params=dict(q, base_from=str(base_from), base_to=str(base_to))
                ),
            ]
            end = last
            for _ in range(TREND_WEEKS):
                week = dict(q, date_from=str(end - timedelta(days=6)), date_to=str(end))
                calls.append(lambda week=week: client.get("/api/v1/usage/offices", params=week))
                end = end - timedelta(days=7)
            return calls

        def cold(fetch: Callable[[], httpx.Response]) -> httpx.Response:
            figures = app.state.console.usage_figures
            if figures is not None:
                figures.clear()
            return fetch()

        # page -> (its fetch, the API calls it is built from)
        pages: dict[str, tuple[Callable[[], httpx.Response], list[Callable[[], httpx.Response]]]] = {
            "overview": (
                lambda: admin.get("/"),
                [
                    lambda: api.get("/api/v1/offices"),
                    lambda: api.get("/api/v1/health/offices"),
                    lambda: api.get("/api/v1/health/alerts"),
                ],
            ),
            "office": (
                lambda: admin.get("/offices/haidian"),
                [
                    lambda: api.get("/api/v1/terminals", params={"office": "haidian"}),
                    lambda: api.get("/api/v1/playbooks/runs", params={"target": "haidian", "limit": 5}),
                ],
            ),
            "terminal": (
                lambda: admin.get(f"/terminals/{one}"),
                [
                    lambda: api.get(f"/api/v1/health/terminals/{one}"),
                    lambda: api.get(f"/api/v1/terminals/{one}/updates"),
                ],
            ),
            "usage_all_offices": (lambda: admin.get("/usage", params=rng_q), usage_api(api, None)),
            # the same page right after the usage service rebuilt something: nothing reused
            "usage_all_offices_cold": (lambda: cold(lambda: admin.get("/usage", params=rng_q)), usage_api(api, None)),
            "usage_manager_office": (
                lambda: manager.get("/usage", params=dict(rng_q, office="haidian")),
                usage_api(api_manager, "haidian"),
            ),
            "usage_csv": (
                lambda: admin.get("/usage/items.csv", params=rng_q),
                [lambda: api.get("/api/v1/usage/items", params=rng_q)],
            ),
            "audit": (lambda: admin.get("/audit"), [lambda: api.get("/api/v1/audit", params={"limit": 200})]),
        }
        if getattr(fleet, "rollouts", None) is not None:
            pages["rollouts"] = (lambda: admin.get("/rollouts"), [lambda: api.get("/api/v1/rollouts")])
            pages["maintenance_calendar"] = (
                lambda: admin.get("/rollouts/calendar"),
                [lambda: api.get("/api/v1/offices"), lambda: api.get("/api/v1/rollouts")],
            )

        page_ms: dict[str, list[float]] = {k: [] for k in pages}
        api_ms: dict[str, list[float]] = {k: [] for k in pages}
        for fetch, calls in pages.values():  # warm-up: templates compiled, caches filled
            fetch()
            for c in calls:
                c()
        for i in range(rounds):
            order = list(pages.items())
            if i % 2:
                order.reverse()
            for name, (fetch, calls) in order:
                # page and its API calls back to back, in alternating order, so both see the same moment
                if i % 2:
                    api_ms[name].append(sum(timed(c) for c in calls))
                    page_ms[name].append(timed(fetch))
                else:
                    page_ms[name].append(timed(fetch))
                    api_ms[name].append(sum(timed(c) for c in calls))
        server.should_exit = True
        for c in (admin, manager, api, api_manager):
            c.close()
        time.sleep(0.3)
        st.close()

    medians = {k: round(statistics.median(v), 1) for k, v in page_ms.items()}
    api_medians = {k: round(statistics.median(v), 1) for k, v in api_ms.items()}
    slowest = max(medians, key=lambda k: medians[k])
    print(f"{'page':24} {'page ms':>9} {'its API ms':>11} {'ratio':>6}")
    for k in pages:
        print(f"{k:24} {medians[k]:9.1f} {api_medians[k]:11.1f} {medians[k] / max(api_medians[k], 0.01):6.2f}")
    emit(
        {
            "bench": "console",
            "terminals": args.terminals,
            "usage_events": events,
            "rounds": rounds,
            "page_ms_median": medians,
            "api_ms_median": api_medians,
            **{f"{k}_ms_median": v for k, v in medians.items()},
            "slowest_page": slowest,
            "slowest_page_ms_median": medians[slowest],
            "slowest_page_api_ms_median": api_medians[slowest],
            "slowest_page_vs_api_ratio": round(medians[slowest] / max(api_medians[slowest], 0.01), 2),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
