"""The console's pages in Chromium: login, sessions, CSRF, roles refused by the server, the
numbers next to the API's, CSV export, audit, form errors, both languages, zoom and tablet."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from fleet_dev.proc import wait_for
from fleet_dev.sim.traffic import BEIJING
from fleet_server.auth.throttle import LoginThrottle
from tests.console.conftest import PASSWORD, Console, local_days, login, number, shot


def _visible_text(page: Any) -> str:
    return str(page.inner_text("body"))


def test_a_page_opened_without_logging_in_redirects_to_login_and_back(console: Console, context: Any) -> None:
    page = context.new_page()
    page.goto(f"{console.url}/usage")
    assert "/login?next=/usage" in page.url
    assert page.locator("#name").is_visible()
    shot(page, "login")
    # nothing but the login page answers without a login, not even a part of a page
    for path in ("/", "/offices/haidian", "/terminals/hd-01", "/usage/items.csv", "/audit"):
        r = httpx.get(console.url + path, headers={"Accept": "text/html"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        assert "haidian" not in r.text and "海淀" not in r.text
    login(page, console, "wang", next_path="/usage")
    page.wait_for_url(f"{console.url}/usage")
    assert page.get_by_test_id("user").inner_text() == "wang"


def test_admin_sees_every_office_by_state_with_versions_and_alerts(console: Console, context: Any) -> None:
    page = context.new_page()
    login(page, console, "admin")
    page.wait_for_url(f"{console.url}/")
    haidian = page.locator("tr[data-office=haidian]")
    assert haidian.locator("td[data-state=online]").inner_text() == "2"
    fengtai = page.locator("tr[data-office=fengtai]")
    assert fengtai.locator("td[data-state=missing]").inner_text() == "1"
    text = _visible_text(page)
    assert "试点网点" in text and "后续网点" in text and "终端软件版本" in text
    # the same counts the API gives
    api = {o["id"]: o["health"] for o in console.api("admin", "/api/v1/offices")}
    assert number(page.get_by_test_id("total-online").inner_text()) == sum(
        (h or {}).get("online", 0) for h in api.values()
    )
    assert page.locator("meta[http-equiv=refresh]").count() == 1  # it refreshes by itself
    shot(page, "overview")

    page.click("tr[data-office=haidian] a")
    page.wait_for_url(f"{console.url}/offices/haidian")
    row = page.locator("tr[data-terminal=hd-01]")
    assert "在线" in row.inner_text()
    # the office's terminals as the API lists them, no more and no fewer
    shown = page.locator("tr[data-terminal]").evaluate_all("rows => rows.map(r => r.dataset.terminal)")
    assert sorted(shown) == sorted(t["id"] for t in console.api("admin", "/api/v1/terminals", office="haidian"))
    assert page.get_by_test_id("maintenance").inner_text() == "01:00-05:00"
    shot(page, "office")

    page.click("tr[data-terminal=hd-01] a")
    page.wait_for_url(f"{console.url}/terminals/hd-01")
    assert page.get_by_test_id("transitions").locator("tr").count() >= 2  # missing -> online at least
    assert "该终端没有被拒绝的消息" in _visible_text(page)
    shot(page, "terminal")

    # English on request, and it stays chosen
    page.click("text=English")
    assert "Health history" in _visible_text(page)
    page.goto(f"{console.url}/")
    assert "Pilot offices" in _visible_text(page)
    shot(page, "overview-en")


def test_manager_sees_their_office_usage_matching_the_api_and_exports_what_is_shown(
    console: Console, context: Any
) -> None:
    page = context.new_page()
    login(page, console, "wang")
    page.wait_for_url(f"{console.url}/")
    # only their office, everywhere
    assert page.locator("tr[data-office]").count() == 1
    first, last = local_days(27)
    page.goto(f"{console.url}/usage?office=haidian&date_from={first}&date_to={last}")
    options = page.locator("#office option").all_inner_texts()
    assert options == ["我的全部网点", "海淀管理部"]
    api = console.api("wang", "/api/v1/usage/items", office="haidian", date_from=str(first), date_to=str(last))
    expected = {r["service_code"]: r for r in api["rows"]}
    assert expected, "the simulated fortnight left no usage"
    rows = page.get_by_test_id("items").locator("tr[data-code]")
    shown = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        code = row.get_attribute("data-code")
        shown[code] = {
            c: int(number(row.locator(f"td[data-col={c}]").inner_text())) for c in ("started", "completed", "abandoned")
        }
    assert set(shown) == set(expected)
    for code, figures in shown.items():
        for col, value in figures.items():
            assert value == expected[code][col], (code, col)
    started = [f["started"] for f in shown.values()]
    assert started == sorted(started, reverse=True), "items are ranked by sessions"
    assert int(number(page.get_by_test_id("kpi-started").inner_text())) == sum(r["started"] for r in api["rows"])
    # the charts are there, drawn on the server
    for testid in ("heatmap", "trend", "items-chart"):
        assert page.get_by_test_id(testid).locator("svg").count() == 1
    assert page.get_by_test_id("heatmap").locator("rect").count() >= 7 * 24
    shot(page, "usage")

    with page.expect_download() as info:
        page.get_by_test_id("items-csv").click()
    text = Path(info.value.path()).read_text(encoding="utf-8-sig")
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["service_code"] for r in table] == list(shown)
    for r in table:
        assert int(r["started"]) == shown[r["service_code"]]["started"]
        assert int(r["abandoned"]) == shown[r["service_code"]]["abandoned"]

    # another office: refused by the server, not only left out of the list
    page.goto(f"{console.url}/usage?office=dongcheng")
    assert "您未被分配到该网点" in page.locator("#err-office").inner_text()
    for path in ("/offices/dongcheng", "/terminals/dc-01", "/audit", "/usage/items.csv?office=dongcheng"):
        r = page.request.get(console.url + path)
        assert r.status in (403, 422), (path, r.status)
        assert "东城管理部" not in r.text() and "在线" not in r.text(), path


def test_auditor_finds_the_admins_actions_in_the_audit_log(console: Console, context: Any) -> None:
    # an admin changes something through the API (as fleetctl would) and logs in to the console
    r = httpx.post(
        console.url + "/api/v1/terminals",
        json={"id": "ft-02", "office_id": "fengtai"},
        headers={"Authorization": f"Bearer {console.tokens['admin']}"},
    )
    assert r.status_code == 201
    page = context.new_page()
    login(page, console, "admin2")
    page.wait_for_url(f"{console.url}/")
    page.close()
    context.clear_cookies()  # another person at another desk

    page = context.new_page()
    login(page, console, "li")
    page.wait_for_url(f"{console.url}/audit")  # an auditor's home
    page.fill("#actor", "admin")
    page.fill("#action", "terminal.enrol")
    page.click("form.filters button")
    rows = page.get_by_test_id("audit").locator("tr[data-action]")
    assert rows.count() >= 1
    assert "ft-02" in rows.first.inner_text()
    assert console.tokens["admin"] not in page.content()
    shot(page, "audit")
    page.goto(f"{console.url}/audit?action=console.login&actor=admin2")
    assert page.get_by_test_id("audit").locator("tr[data-action]").count() >= 1
    page.goto(f"{console.url}/audit?target=ft-02&since=2000-01-01&until=2999-01-01")
    assert page.get_by_test_id("audit").locator("tr[data-action]").count() >= 1
    # an auditor reads the log and nothing else
    for path in ("/usage", "/offices/haidian"):
        assert page.request.get(console.url + path).status == 403


def test_form_errors_are_shown_next_to_the_field(console: Console, context: Any) -> None:
    page = context.new_page()
    page.goto(f"{console.url}/login")
    page.click("button[type=submit]")
    assert page.locator("#err-name").inner_text() == "请输入用户名。"
    assert page.locator("#err-password").inner_text() == "请输入密码。"
    login(page, console, "admin")
    page.wait_for_url(f"{console.url}/")
    page.goto(f"{console.url}/usage?date_from=2026-11-20&date_to=2026-11-10")
    assert page.locator("#err-date_to").inner_text() == "结束日期早于开始日期。"
    assert page.locator(".field.invalid #date_to").count() == 1
    page.goto(f"{console.url}/usage?date_from=someday")
    assert "YYYY-MM-DD" in page.locator("#err-date_from").inner_text()
    page.goto(f"{console.url}/audit?since=yesterday")
    assert "2026-12-01T08:00:00Z" in page.locator("#err-since").inner_text()
    shot(page, "audit-form-error")


def test_a_form_posted_without_its_csrf_token_is_refused(console: Console, context: Any) -> None:
    page = context.new_page()
    login(page, console, "admin")
    page.wait_for_url(f"{console.url}/")
    # the logout form without its token (the browser's own cookies go with it, as in a forged post)
    r = page.request.post(console.url + "/logout", form={"csrf": ""})
    assert r.status == 403 and "安全校验码" in r.text()
    r = page.request.post(console.url + "/logout", form={"csrf": "not-the-token"})
    assert r.status == 403
    page.reload()
    assert page.url == f"{console.url}/"  # still logged in: nothing happened
    # the login form without the token of its cookie
    r = httpx.post(console.url + "/login", data={"name": "admin", "password": PASSWORD, "csrf": "x"})
    assert r.status_code == 403 and "fleet_session" not in r.headers.get("set-cookie", "")
    # from another site: refused whatever the token
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    r = page.request.post(
        console.url + "/logout", form={"csrf": token or ""}, headers={"Origin": "http://evil.example"}
    )
    assert r.status == 403
    # with it, logout works and the session is gone
    page.click("text=退出登录")
    page.wait_for_url(f"{console.url}/login?bye=1")
    page.goto(f"{console.url}/usage")
    assert "/login" in page.url


def test_an_expired_session_returns_to_the_login_page(console: Console, context: Any) -> None:
    page = context.new_page()
    login(page, console, "wang")
    page.wait_for_url(f"{console.url}/")
    sessions = console.app.state.console.sessions
    real = sessions.clock
    try:
        sessions.clock = lambda: real() + sessions.idle_s + 1  # idle for longer than a session lasts
        page.goto(f"{console.url}/usage")
        assert "/login" in page.url and "expired=1" in page.url
        assert "登录已过期" in page.get_by_test_id("notice").inner_text()
        shot(page, "login-expired")
    finally:
        sessions.clock = real
    login(page, console, "wang", next_path="/usage")
    page.wait_for_url(f"{console.url}/usage")
    # a new password (set by an admin through the API) ends the sessions made with the old one
    r = httpx.post(
        console.url + "/api/v1/users/wang/password",
        json={"password": PASSWORD},
        headers={"Authorization": f"Bearer {console.tokens['admin']}"},
    )
    assert r.status_code == 204
    page.reload()
    assert "/login" in page.url and "expired=1" in page.url


def test_repeated_failed_logins_lock_the_login_for_a_while(console: Console, context: Any) -> None:
    state = console.app.state.console
    page = context.new_page()
    try:
        for _ in range(state.throttle.free_failures):
            login(page, console, "admin2", password="wrong-password-123")
            assert page.get_by_test_id("error").inner_text() == "用户名或密码错误。"
        login(page, console, "admin2", password="wrong-password-123")
        # now even the right password waits: the block holds whatever is tried
        login(page, console, "admin2")
        assert "登录失败次数过多" in page.get_by_test_id("error").inner_text()
        assert "/login" in page.url
        r = httpx.post(console.url + "/login", data={"name": "admin2", "password": PASSWORD})
        assert r.status_code in (403, 429)
        shot(page, "login-locked")
        # bearer tokens keep working for scripts
        assert console.api("admin", "/api/v1/me")["name"] == "admin"
    finally:
        # lift the block this test made, for the tests that log in after it from the same address
        state.throttle = LoginThrottle(
            time.time, free_failures=state.throttle.free_failures, base_block_s=state.throttle.base_block_s
        )


def test_pages_show_no_secret_and_read_at_200_percent_zoom_and_on_a_tablet(console: Console, browser: Any) -> None:
    secrets = [console.stack.admin_token, console.stack.server_password, *console.stack.passwords.values()]
    secrets += [t for t in console.tokens.values()]
    for name, viewport in (("zoom200", {"width": 640, "height": 450}), ("tablet", {"width": 768, "height": 1024})):
        ctx = browser.new_context(viewport=viewport, locale="zh-CN")
        try:
            page = ctx.new_page()
            login(page, console, "admin")
            page.wait_for_url(f"{console.url}/")
            for path in ("/", "/offices/haidian", "/terminals/hd-01", "/usage", "/audit"):
                page.goto(console.url + path)
                html = page.content()
                for secret in secrets:
                    assert secret not in html, f"a secret on {path}"
                assert "password_hash" not in html
                # the page itself never scrolls sideways; wide tables scroll inside their box
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 1, f"{path} is {overflow}px too wide at {viewport}"
            page.goto(f"{console.url}/usage?office=haidian")
            shot(page, f"usage-{name}")
            page.goto(f"{console.url}/")
            shot(page, f"overview-{name}")
        finally:
            ctx.close()


def test_usage_page_shows_new_events_once_the_rollups_are_rebuilt(console: Console, context: Any) -> None:
    page = context.new_page()
    login(page, console, "wang")
    page.wait_for_url(f"{console.url}/")
    first, last = local_days(6)
    query = f"/usage?office=haidian&date_from={first}&date_to={last}"
    page.goto(console.url + query)
    before = int(number(page.get_by_test_id("kpi-started").inner_text()))
    # three citizens at hd-01 today (at most a day ahead of the server's clock is accepted), through
    # its real outbox, the broker and the ingest
    agent = next(a for a in console.agents if a.settings.terminal_id == "hd-01")
    midnight = datetime.combine(last, datetime.min.time(), BEIJING)
    stored = console.stack.stored()
    events = []
    for k in range(3):
        body = {"session": f"late-{k}-{time.time()}", "service_code": "TQ02", "face_login": True}
        events.append(("service.started", body, (midnight + timedelta(minutes=k)).astimezone(UTC)))
    agent.post_events(events)
    wait_for(lambda: console.stack.stored() >= stored + 3, 30, what="the new events stored")
    console.fleet.usage.recompute(limit=1000)
    page.reload()
    after = int(number(page.get_by_test_id("kpi-started").inner_text()))
    assert after == before + 3
    api = console.api("wang", "/api/v1/usage/offices", office="haidian", date_from=str(first), date_to=str(last))
    assert api["total"]["started"] == after
