"""The console in a real browser: Debian's Chromium driven by Playwright, against a fleet server
with a real broker, real agents and their stored events behind it, served over real HTTP.

One stack and one browser per test module; a fresh browser context (cookies, storage) per test.
Screenshots of every page go to tests/console/screenshots/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from fleet_dev.sim import TrafficModel, load_catalogue
from fleet_dev.sim.traffic import BEIJING
from fleet_server.app import create_app
from fleet_server.auth.models import Role

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
PASSWORD = "correct-horse-battery-9"
# terminal -> office: two pilot offices with real agents, one later office enrolled but never started
TERMINALS = {"hd-01": "haidian", "hd-02": "haidian", "dc-01": "dongcheng", "ft-01": "fengtai"}
RUNNING = ("hd-01", "hd-02", "dc-01")
HISTORY_DAYS = 20


@dataclass
class Console:
    """A running fleet server with its console, the people who log in, and the stack behind it."""

    url: str
    stack: DevStack
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)
    agents: list[Any] = field(default_factory=list)

    @property
    def fleet(self) -> Any:
        return self.stack.server

    def api(self, user: str, path: str, **params: Any) -> Any:
        """A JSON API call with the user's bearer token (what scripts and fleetctl do)."""
        r = httpx.get(self.url + path, params=params, headers={"Authorization": f"Bearer {self.tokens[user]}"})
        r.raise_for_status()
        return r.json()


def _fill_usage(st: DevStack, agents: list[Any]) -> int:
    """Weekday sessions of the last HISTORY_DAYS days, posted to each agent's outbox as a kiosk app
    would have (then drained to the server over MQTT); returns the number of events."""
    catalogue = load_catalogue()
    today = datetime.now(BEIJING).date()
    total = 0
    for agent in agents:
        tid = agent.settings.terminal_id
        model = TrafficModel(catalogue, random.Random(f"console-{tid}"))
        events: list[tuple[str, dict[str, Any], datetime]] = []
        for back in range(HISTORY_DAYS, 0, -1):
            day = today - timedelta(days=back)
            if day.weekday() >= 5:
                continue
            opening = datetime.combine(day, datetime.min.time(), BEIJING).replace(hour=8, minute=40)
            for k in range(12):
                start = opening + timedelta(minutes=37 * k + random.Random(f"{tid}{day}{k}").randint(0, 20))
                events += [(ev.type, ev.body, ev.at.astimezone(UTC)) for ev in model.session(tid, start)]
        agent.post_events(events)
        total += len(events)
    return total


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    st = DevStack(tmp_path_factory.mktemp("console"), server_options={"alert_for_s": 1.0, "alert_clear_s": 1.0})
    server = None
    agents: list[Any] = []
    try:
        for tid, office in TERMINALS.items():
            st.enrol(tid, office)
        assert st.server is not None
        fleet = st.server
        tokens = {"admin": st.admin_token}
        fleet.auth.bootstrap_password("admin", PASSWORD)
        for name, role, offices in (
            ("admin2", Role.ADMIN, None),
            ("wang", Role.MANAGER, ["haidian"]),
            ("li", Role.AUDITOR, None),
        ):
            tokens[name] = fleet.auth.create_user(name, role, offices)
            fleet.auth.set_password("admin", name, PASSWORD)
        st.start_broker()
        st.start_server()
        assert fleet.link.connected.wait(10), "server did not connect to the broker"
        agents = [st.agent(tid, heartbeat_interval_s=2.0) for tid in RUNNING]
        for a in agents:
            a.start()
        stored_before = st.stored()
        posted = _fill_usage(st, agents)
        wait_for(lambda: st.stored() >= stored_before + posted, 60, what=f"{posted} usage events stored")
        fleet.usage.recompute(limit=10_000)
        wait_for(lambda: fleet.health.offices(["haidian"])[0]["online"] == 2, 30, what="haidian terminals online")

        port = free_port()
        # low limits, so the lock-out test needs only a few tries
        settings = st.settings.model_copy(update={"login_free_failures": 3, "login_block_s": 60.0})
        app = create_app(settings, fleet)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, name="console-http", daemon=True)
        thread.start()
        wait_for(lambda: server is not None and server.started, 15, what="console HTTP server")
        yield Console(f"http://127.0.0.1:{port}", st, app, tokens, agents)
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(0.3)
        for a in agents:
            try:
                a.stop(graceful=False)
            except Exception:
                pass
        st.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run the suite through ./run.sh test (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, locale="zh-CN", accept_downloads=True)
    ctx.set_default_timeout(15_000)
    try:
        yield ctx
    finally:
        ctx.close()


def login(page: Any, console: Console, name: str, password: str = PASSWORD, next_path: str = "/") -> None:
    """Log in through the form, the way a person does."""
    page.goto(f"{console.url}/login?next={next_path}")
    page.fill("#name", name)
    page.fill("#password", password)
    page.click("button[type=submit]")


def shot(page: Any, name: str) -> Path:
    """Save a full-page screenshot for people to look at."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def number(text: str) -> float:
    """The number in a cell such as '1,234' or '87.5%'."""
    m = re.search(r"-?[\d,]+(\.\d+)?", text)
    assert m, f"no number in {text!r}"
    return float(m.group(0).replace(",", ""))


def local_days(back: int) -> tuple[date, date]:
    today = datetime.now(BEIJING).date()
    return today - timedelta(days=back), today
