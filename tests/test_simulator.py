"""The simulated fleet: realistic traffic through the real agent, counted exactly at the server."""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from fleet_dev.proc import free_port, wait_for
from fleet_dev.sim import SimClock, SimulatedFleet, TrafficModel, load_catalogue
from fleet_dev.sim.kiosk import GUARD_LOGGER, TOKENLESS_WARNING, local_api_app, one_tokenless_warning
from fleet_dev.sim.traffic import BEIJING
from tests.test_cli import console_login, signed_in


def test_catalogue_has_forty_items_with_unique_codes_and_the_popular_ones() -> None:
    cat = load_catalogue()
    codes = [i.code for i in cat.items]
    assert len(codes) == 40 == len(set(codes))
    names = {i.name for i in cat.items}
    assert {"购房提取", "租房提取", "公积金贷款申请", "调整月还款额", "缴存明细查询", "贷款明细查询"} <= names


def test_traffic_follows_opening_hours_and_item_popularity() -> None:
    model = TrafficModel(load_catalogue(), random.Random(1))
    monday = datetime(2026, 11, 23, 10, 0, tzinfo=BEIJING)
    assert model.rate_per_hour(monday.replace(hour=3)) == 0
    assert model.rate_per_hour(monday.replace(hour=9)) > model.rate_per_hour(monday.replace(hour=12)) > 0
    assert model.rate_per_hour(monday.replace(day=29)) == 0  # Sunday
    codes = Counter(model.session("t-1", monday)[0].body["service_code"] for _ in range(4000))
    assert codes["TQ02"] > codes["TQ07"] * 5  # rent withdrawal far more common than illness withdrawal
    sessions = [model.session("t-1", monday) for _ in range(2000)]
    ends = Counter(s[-1].type for s in sessions)
    assert 0.05 < ends["service.abandoned"] / len(sessions) < 0.3
    for s in sessions:
        assert s[0].type == "service.started" and s[-1].at >= s[0].at
        assert s[-1].body["session"] == s[0].body["session"]


def test_simulated_fleet_traffic_is_stored_exactly(make_stack: Any) -> None:
    st = make_stack(6)
    agents = [st.agent(tid) for tid in st.passwords]
    st.tracked_agents.extend(agents)
    for a in agents:
        a.start()
    start = datetime(2026, 11, 23, 9, 0, tzinfo=BEIJING)
    fleet = SimulatedFleet(agents, SimClock(start, 600.0, time.time()), peak_sessions_per_hour=60)
    now = time.time()
    for i in range(40):  # 40 steps of 0.1 s at 600x: 40 simulated minutes of a busy morning
        fleet.step(now + i * 0.1, 0.1)
    posted = fleet.counters.events_posted
    assert posted > 100
    wait_for(lambda: st.stored() == posted, 30, what=f"{posted} simulated events stored")
    with sqlite3.connect(st.settings.db_path) as conn:
        by_type = dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type"))
    assert by_type == {t: n for t, n in fleet.counters.by_type.items()}


def test_demo_command_runs_the_whole_system_and_stops_cleanly(tmp_path: Path) -> None:
    """As the README starts it; the banner's console login works, one no-token line for the fleet."""
    env = {k: v for k, v in os.environ.items() if k != "FLEET_ADMIN_PASSWORD"}  # a password made for the run
    port = free_port()
    args = ["--duration", "6", "--speed", "900", "--state-dir", str(tmp_path / "demo"), "--http-port", str(port)]
    with (tmp_path / "stderr.log").open("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet_dev.demo", *args, "--terminals-per-office", "1"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            banner = ""
            for line in proc.stdout:
                banner += line
                if "Ctrl-C stops everything" in line:
                    break
            login = re.search(r"console\s+(http://\S+)/\s+log in as user (\S+), password (\S+)", banner)
            assert login, banner
            url, name, password = login.groups()
            assert url == f"http://127.0.0.1:{port}" and "made for this run" in banner
            session = console_login(url, name, password)
            assert session is not None, "the banner's console login was refused"
            assert signed_in(session)
            session.close()
            assert console_login(url, name, password + "x") is None
            rest, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        stderr = errors.read()
    assert proc.returncode == 0, stderr[-2000:]
    stdout = banner + rest
    assert "kiosk-fleet demo is running" in stdout
    assert "online 6/6" in stdout
    lines = [ln for ln in stdout.splitlines() if "stored" in ln and "sim]" in ln]
    assert lines and int(lines[-1].split("stored")[1].split()[0]) > 0
    # the simulated fleet's local APIs run without a token: said once for all six, not six times
    warnings = [ln for ln in stderr.splitlines() if "WITHOUT a token" in ln]
    assert len(warnings) == 1 and "6 simulated terminals" in warnings[0], stderr[-2000:]


def test_demo_refuses_a_weak_admin_password_in_plain_words(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fleet_dev.demo", "--state-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLEET_ADMIN_PASSWORD": "short"},
    )
    assert proc.returncode == 2
    assert "FLEET_ADMIN_PASSWORD is not usable: a password needs at least 12 characters" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "demo").exists()


def test_a_real_agent_without_a_token_still_warns_on_its_own(make_stack: Any, caplog: Any) -> None:
    """Only the simulated fleet summarises: an agent's local API built outside it warns as before."""
    st = make_stack(1, start=False)
    agent = st.agent(next(iter(st.passwords)))
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        with one_tokenless_warning():
            other = threading.Thread(target=local_api_app, args=(agent,))  # another thread: not summarised
            other.start()
            other.join(30)
        local_api_app(agent)  # outside the block: not summarised
    guard = [r for r in caplog.records if r.name == GUARD_LOGGER and TOKENLESS_WARNING in r.getMessage()]
    assert len(guard) == 2


PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"


def test_simulated_kiosk_apps_report_peripheral_readings_that_reach_the_server(make_stack: Any) -> None:
    st = make_stack(0, start=False, server_options={"health_sweep_s": 0.2})
    st.enrol("t-lobby", "haidian", profile="lobby-floor-32")
    st.start_broker()
    st.start_server()
    assert st.server.link.connected.wait(10)
    agent = st.agent("t-lobby", heartbeat_interval_s=0.5, profile_file=str(PROFILES_DIR / "lobby-floor-32.yaml"))
    st.tracked_agents.append(agent)
    agent.start()
    start = datetime(2026, 11, 23, 9, 0, tzinfo=BEIJING)
    fleet = SimulatedFleet([agent], SimClock(start, 600.0, time.time()), peak_sessions_per_hour=120)
    try:
        now = time.time()
        for i in range(40):
            fleet.step(now + i * 0.1, 0.1)
        # one routine report per peripheral the kiosk app drives (the agent probes the camera itself)
        assert fleet.counters.readings_posted >= 6 and fleet.counters.readings_refused == 0
        completed = fleet.counters.by_type.get("service.completed", 0)
        assert completed > 0

        def printer() -> dict[str, Any]:
            doc = st.server.health.terminal("t-lobby")
            return dict(doc["peripherals"].get("receipt_printer") or {}) if doc else {}

        # every completed service printed a receipt: the roll the server sees is shorter by that much
        wait_for(lambda: printer().get("reading", {}).get("paper_left_pct", 100) < 100, 20, what="paper reading")
        assert printer()["state"] in ("ok", "warn")
        others = ("id_reader", "a4_printer", "qr_scanner", "assistance", "screen")

        def others_states() -> set[str]:
            seen = (st.server.health.terminal("t-lobby") or {}).get("peripherals") or {}
            return {str((seen.get(p) or {}).get("state")) for p in others}

        # the other peripherals' readings may come a heartbeat later than the printer's
        wait_for(lambda: others_states() == {"ok"}, 20, what="the other peripherals ok")
        wait_for(lambda: st.stored() == fleet.counters.events_posted, 30, what="events stored")
    finally:
        fleet.stop()


def test_simulator_sends_the_agents_api_token(make_stack: Any, tmp_path: Path) -> None:
    token = tmp_path / "api-token"
    token.write_text("k" * 64 + "\n", encoding="ascii")
    token.chmod(0o600)
    st = make_stack(1)
    agent = st.agent("t-000", api_token_file=str(token))
    st.tracked_agents.append(agent)
    agent.start()
    start = datetime(2026, 11, 23, 9, 0, tzinfo=BEIJING)
    fleet = SimulatedFleet([agent], SimClock(start, 600.0, time.time()), peak_sessions_per_hour=120)
    try:
        url = next(iter(fleet.kiosks.values())).api.url
        anonymous = httpx.post(f"{url}/v1/events", json={"type": "service.started", "body": {}}, timeout=5)
        assert anonymous.status_code == 401  # the API wants the token: the simulator must send it
        now = time.time()
        for i in range(20):
            fleet.step(now + i * 0.1, 0.1)
        assert fleet.counters.events_posted > 0 and fleet.counters.refused == 0
        wait_for(lambda: st.stored() == fleet.counters.events_posted, 30, what="events stored")
    finally:
        fleet.stop()
