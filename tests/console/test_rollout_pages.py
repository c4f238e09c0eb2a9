"""Rollouts through the console in Chromium: create with the wave preview, a second admin
approves, the first watches it finish; a bad release halts and the page says why; form errors
next to their fields; a manager reads but is refused every action by the server.

Behind the pages: the real server (rollout engine ticked by its scheduler), a real Mosquitto and
real agents whose outboxes carry the `update.status` reports; the terminals' updaters are the
rollout tests' scripted terminals (they answer each command through the agent's real outbox)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from fleet_server.app import create_app
from fleet_server.auth.models import Role, User
from fleet_server.rollouts.schemas import RolloutPlan
from tests.console.conftest import PASSWORD, Console, login, shot
from tests.test_rollouts import SERVER_OPTIONS, ScriptedTerminals, fails, good, online, releases, start_agent

# two pilot offices and a later one with agents; one pilot terminal that never comes online
RUNNING = {"dc-01": "dongcheng", "dc-02": "dongcheng", "hd-01": "haidian", "hd-02": "haidian", "xc-01": "xicheng"}
NEVER_ONLINE = {"mg-01": "mentougou"}
RELEASE = "agent/agent-2.0.0.whl"
WAIT_S = 60


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Console, ScriptedTerminals]]:
    st = DevStack(tmp_path_factory.mktemp("rollout-pages"), server_options=dict(SERVER_OPTIONS))
    st.tracked_agents = []  # type: ignore[attr-defined]
    scripted = None
    server = None
    try:
        for tid, office in {**RUNNING, **NEVER_ONLINE}.items():
            st.enrol(tid, office)
        assert st.server is not None
        fleet = st.server
        fleet.auth.bootstrap_password("admin", PASSWORD)
        tokens = {"admin": st.admin_token}
        for name, role, offices in (("admin2", Role.ADMIN, None), ("wang", Role.MANAGER, ["haidian"])):
            tokens[name] = fleet.auth.create_user(name, role, offices)
            fleet.auth.set_password("admin", name, PASSWORD)
        st.start_broker()
        st.start_server()
        assert fleet.link.connected.wait(10)
        fleet.rollouts.use_releases(releases())
        agents = {tid: start_agent(st, tid) for tid in RUNNING}
        scripted = ScriptedTerminals(st, agents)
        wait_for(lambda: all(online(st, t) for t in RUNNING), WAIT_S, what="terminals online")
        port = free_port()
        app = create_app(st.settings, fleet)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, name="console-http", daemon=True).start()
        wait_for(lambda: server is not None and server.started, 15, what="console HTTP server")
        yield Console(f"http://127.0.0.1:{port}", st, app, tokens, list(agents.values())), scripted
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(0.3)
        if scripted is not None:
            scripted.close()
        for a in getattr(st, "tracked_agents", []):
            try:
                a.stop(graceful=False)
            except Exception:
                pass
        st.close()


def _fill_plan(page: Any, *, offices: list[str] | None, waves: list[tuple[str, str, str, bool]]) -> None:
    """The create form: the release, the targets (None: the whole fleet), waves as
    (name, size kind, size, pilot only), installs at once with a 1 s health gate."""
    page.fill("#release", RELEASE)
    if offices is None:
        page.check("#targets_all")
    else:
        page.uncheck("#targets_all")
        for o in offices:
            page.check(f"input[name=target_office][value={o}]")
    for i in range(1, 5):
        if i <= len(waves):
            name, kind, size, pilot = waves[i - 1]
            page.fill(f"input[name=w{i}_name]", name)
            page.select_option(f"#w{i}_size_kind", kind)
            page.fill(f"#w{i}_size", size)
            page.set_checked(f"input[name=w{i}_pilot_only]", pilot)
            page.fill(f"input[name=w{i}_soak_s]", "1")
            page.select_option(f"select[name=w{i}_on_success]", "advance")
        else:
            page.select_option(f"#w{i}_size_kind", "unused")
    page.select_option("#window", "now")
    page.fill("#gate_s", "1")


def _reload_until(page: Any, text: str, what: str) -> None:
    def seen() -> bool:
        page.reload()
        return text in page.inner_text("body")

    wait_for(seen, WAIT_S, interval_s=0.5, what=what)


THREE_WAVES = [("canary", "count", "1", True), ("pilots", "rest", "", True), ("everyone", "rest", "", False)]


def test_admin_creates_a_rollout_a_second_admin_approves_it_and_it_completes(
    fleet: tuple[Console, ScriptedTerminals], browser: Any
) -> None:
    console, scripted = fleet
    scripted.default = good
    first = browser.new_context(viewport={"width": 1280, "height": 900})
    second = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = first.new_page()
        login(page, console, "admin")
        page.wait_for_url(console.url + "/")
        page.click("nav.main a[href='/rollouts']")
        page.get_by_test_id("new-rollout").click()
        page.wait_for_url(console.url + "/rollouts/new")
        # the whole fleet first: the preview flags the terminal that never came online
        _fill_plan(page, offices=None, waves=THREE_WAVES)
        page.click("#preview-button")
        flagged = page.locator("tr[data-terminal=mg-01]")
        assert "离线" in flagged.inner_text() or "未上线" in flagged.inner_text()
        # so only the offices whose terminals are there; the preview shows exactly who is hit
        _fill_plan(page, offices=["dongcheng", "haidian", "xicheng"], waves=THREE_WAVES)
        page.check("#approval_required")
        page.fill("#id", "agent-2-0-0")
        page.click("#preview-button")
        waves = [page.get_by_test_id(f"preview-wave-{i}").locator("tr[data-terminal]") for i in (1, 2, 3)]
        assert [w.count() for w in waves] == [1, 3, 1]
        expected = console.fleet.rollouts.preview(
            RolloutPlan.model_validate(
                {
                    "release": RELEASE,
                    "targets": {"offices": ["dongcheng", "haidian", "xicheng"]},
                    "waves": [
                        {"size": {"count": 1}, "pilot_only": True},
                        {"pilot_only": True},
                        {},
                    ],
                }
            )
        )
        for i, w in enumerate(expected["waves"]):
            shown = [waves[i].nth(k).get_attribute("data-terminal") for k in range(waves[i].count())]
            assert shown == [t["terminal"] for t in w["terminals"]]
        assert waves[2].first.get_attribute("data-terminal") == "xc-01"
        shot(page, "rollout-preview")
        page.click("#create-button")
        page.wait_for_url(console.url + "/rollouts/agent-2-0-0")
        assert "待批准" in page.inner_text("h1")
        # the creator cannot approve their own rollout: said next to the button, refused by the server
        page.click("#do-approve")
        assert "second admin" in page.locator("#err-approve").inner_text()
        assert console.fleet.rollouts.get("agent-2-0-0")["state"] == "awaiting_approval"

        other = second.new_page()
        login(other, console, "admin2", next_path="/rollouts/agent-2-0-0")
        other.wait_for_url(console.url + "/rollouts/agent-2-0-0")
        other.click("#do-approve")
        other.wait_for_url(console.url + "/rollouts/agent-2-0-0")
        assert console.fleet.rollouts.get("agent-2-0-0")["approved_by"] == "admin2"

        # the first admin watches it go through its waves to the end
        _reload_until(page, "已完成", "the rollout to complete")
        for i in (1, 2, 3):
            assert "已通过" in page.get_by_test_id(f"wave-{i}").inner_text()
        assert page.get_by_test_id("wave-2").locator("[data-gate=committed]").inner_text() == "3"
        shot(page, "rollout-done")
        page.goto(console.url + "/terminals/xc-01")
        assert "已生效" in page.get_by_test_id("timeline").inner_text()
        # the audit log has both admins' actions
        page.goto(console.url + "/audit?target=agent-2-0-0")
        actions = page.get_by_test_id("audit").inner_text()
        assert "rollout.create" in actions and "rollout.approve" in actions and "admin2" in actions
    finally:
        first.close()
        second.close()


def test_a_bad_release_halts_and_the_page_says_why(fleet: tuple[Console, ScriptedTerminals], context: Any) -> None:
    console, scripted = fleet
    scripted.default = fails("rejected", "bad_signature", "root key unknown")
    try:
        page = context.new_page()
        login(page, console, "admin", next_path="/rollouts/new")
        page.wait_for_url(console.url + "/rollouts/new")
        _fill_plan(page, offices=["dongcheng", "haidian", "xicheng"], waves=THREE_WAVES)
        page.fill("#id", "bad-signature")
        page.click("#preview-button")
        page.click("#create-button")
        page.wait_for_url(console.url + "/rollouts/bad-signature")
        _reload_until(page, "已中止", "the rollout to halt")
        reason = page.get_by_test_id("reason").inner_text()
        assert "wave 1" in reason and "not signed by the keys the terminal trusts" in reason
        assert page.get_by_test_id("wave-1").locator("[data-gate=failed]").inner_text() == "1"
        shot(page, "rollout-halted")
        assert "元数据不是由终端信任的密钥签名" in page.get_by_test_id("not-done").inner_text()
        page.goto(console.url + "/rollouts/trust")
        body = page.inner_text("body")
        assert "元数据不是由终端信任的密钥签名" in body and "bad_signature" in body and "bad-signature" in body
        shot(page, "rollout-trust")
        page.goto(console.url + "/rollouts/calendar")
        assert page.get_by_test_id("calendar").locator("tr[data-office]").count() >= 18
        shot(page, "rollout-calendar")
        # abort it: the halted rollout ends
        page.goto(console.url + "/rollouts/bad-signature")
        page.click("#do-abort")
        page.wait_for_url(console.url + "/rollouts/bad-signature")
        assert "已终止" in page.inner_text("h1")
    finally:
        scripted.default = good


def test_plan_errors_are_shown_next_to_their_fields(fleet: tuple[Console, ScriptedTerminals], context: Any) -> None:
    console, _ = fleet
    page = context.new_page()
    login(page, console, "admin", next_path="/rollouts/new")
    page.wait_for_url(console.url + "/rollouts/new")
    # no targets at all
    page.fill("#release", RELEASE)
    page.click("#preview-button")
    assert "全部终端" in page.locator("#err-targets").inner_text()
    # a wave that asks for more terminals than there are
    _fill_plan(page, offices=["haidian"], waves=[("canary", "count", "5", False), ("rest", "rest", "", False)])
    page.click("#preview-button")
    assert "asks for 5" in page.locator("#err-w1_size").inner_text()
    # sizes that do not add up to everyone targeted
    _fill_plan(page, offices=["dongcheng", "haidian"], waves=[("canary", "count", "1", False)])
    page.click("#preview-button")
    assert "in no wave" in page.locator("#err-waves").inner_text()
    # percentages over 100
    _fill_plan(page, offices=["haidian"], waves=[("a", "percent", "60", False), ("b", "percent", "60", False)])
    page.click("#preview-button")
    assert "more than 100%" in page.locator("#err-waves").inner_text()
    # a size that is no number, a deadline that is no time
    _fill_plan(page, offices=["haidian"], waves=[("a", "count", "two", False)])
    page.fill("#deadline", "tomorrow")
    page.click("#preview-button")
    assert page.locator("#err-w1_size").inner_text() == "请输入数字。"
    assert "2026-12-03T02:00" in page.locator("#err-deadline").inner_text()
    shot(page, "rollout-form-errors")
    # an install period that ends before it starts: said next to its end, the times kept as typed
    _fill_plan(page, offices=["haidian"], waves=[("a", "rest", "", False)])
    page.fill("#deadline", "")
    page.fill("#window_start", "2026-12-03T06:00")
    page.fill("#window_end", "2026-12-03T02:00")
    page.click("#preview-button")
    assert page.locator("#err-window_end").inner_text() == "安装时段的结束时间必须晚于开始时间。"
    assert page.locator("#err-window_start").count() == 0 and page.locator("#err-deadline").count() == 0
    assert page.input_value("#window_start") == "2026-12-03T06:00"
    assert page.locator("[data-testid=preview-summary]").count() == 0  # refused: no preview
    # an end equal to the start is no period either; and in English
    page.click("text=English")
    _fill_plan(page, offices=["haidian"], waves=[("a", "rest", "", False)])
    page.fill("#window_start", "2026-12-03T06:00")
    page.fill("#window_end", "2026-12-03T06:00")
    page.click("#preview-button")
    assert page.locator("#err-window_end").inner_text() == "The install period must end after it starts."
    shot(page, "rollout-form-period-error-en")
    page.click("text=中文")
    # the right way round it is planned, and shown on the rollout's page and the maintenance calendar
    _fill_plan(page, offices=["haidian"], waves=[("a", "rest", "", False)])
    page.fill("#id", "with-period")
    page.fill("#window_start", "2099-01-01T02:00")
    page.fill("#window_end", "2099-01-03T06:00")
    page.click("#preview-button")
    page.click("#create-button")
    page.wait_for_url(console.url + "/rollouts/with-period")
    assert page.get_by_test_id("install-period").inner_text().startswith("2099-01-01 02:00 – 2099-01-03 06:00")
    _reload_until(page, "nothing is sent before", "the wave to say it waits for the period")
    doc = console.fleet.rollouts.get("with-period")
    assert doc["window_start"] == "2099-01-01T02:00:00+08:00" and doc["window_end"] == "2099-01-03T06:00:00+08:00"
    page.goto(console.url + "/rollouts/calendar")
    row = page.get_by_test_id("install-periods").locator("tr[data-rollout=with-period]")
    assert "2099-01-01 02:00" in row.inner_text() and "2099-01-03 06:00" in row.inner_text()
    assert "未开始" in row.inner_text()
    shot(page, "rollout-calendar-period")
    console.fleet.rollouts.abort("with-period", User("admin", Role.ADMIN), "test done")
    # a form without its CSRF token
    r = page.request.post(console.url + "/rollouts/new", form={"release": RELEASE, "targets_all": "on"})
    assert r.status == 403


def test_a_manager_reads_rollouts_but_the_server_refuses_every_action(
    fleet: tuple[Console, ScriptedTerminals], context: Any
) -> None:
    console, _ = fleet
    # a rollout that waits for approval: any action a manager managed would show in its state
    plan = RolloutPlan.model_validate(
        {"id": "waits-for-approval", "release": RELEASE, "targets": {"offices": ["haidian"]}, "waves": [{}],
         "approval_required": True, "window": "now"}
    )  # fmt: skip
    console.fleet.rollouts.create(plan, User("admin", Role.ADMIN))
    page = context.new_page()
    login(page, console, "wang", next_path="/rollouts")
    page.wait_for_url(console.url + "/rollouts")
    assert page.get_by_test_id("new-rollout").count() == 0
    assert page.locator("tr[data-rollout=waits-for-approval]").count() == 1
    shot(page, "rollouts")
    page.goto(console.url + "/rollouts/waits-for-approval")
    assert page.get_by_test_id("actions").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value") or ""
    for action in ("approve", "pause", "resume", "abort", "retry", "rollback"):
        r = page.request.post(f"{console.url}/rollouts/waits-for-approval/{action}", form={"csrf": csrf})
        assert r.status == 403, action
    r = page.request.post(f"{console.url}/rollouts/new", form={"csrf": csrf, "release": RELEASE, "targets_all": "on"})
    assert r.status == 403
    assert page.request.get(console.url + "/rollouts/new").status == 403
    page.goto(console.url + "/rollouts/new")
    assert "您的角色无权打开此页面" in page.get_by_test_id("error").inner_text()
    shot(page, "refused")
    doc = console.fleet.rollouts.get("waits-for-approval")
    assert doc["state"] == "awaiting_approval" and doc["approved_by"] is None
    console.fleet.rollouts.abort("waits-for-approval", User("admin", Role.ADMIN))
