"""fleetctl against a real server over HTTP."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, stop, wait_for
from fleet_server.app import create_app
from fleet_server.cli import EXIT_AUTH, EXIT_UNREACHABLE, EXIT_USAGE, app


@pytest.fixture
def server(tmp_path: Path) -> Any:
    st = DevStack(tmp_path / "s")
    port = free_port()
    http = uvicorn.Server(
        uvicorn.Config(
            create_app(st.settings, st.server), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield st, f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(5)
    st.close()


def run(url: str, token: str, *args: str) -> Any:
    return CliRunner().invoke(app, ["--url", url, "--token", token, *args])


def test_enrol_list_and_revoke_through_the_cli(server: Any) -> None:
    st, url = server
    r = run(url, st.admin_token, "enrol", "t-cli-1", "--office", "fengtai")
    assert r.exit_code == 0, r.output
    assert "mqtt password" in r.output and "shown once" in r.output
    r = run(url, st.admin_token, "terminals", "--office", "fengtai")
    assert r.exit_code == 0 and "t-cli-1" in r.output and "missing" in r.output
    r = run(url, st.admin_token, "onboard", "shunyi", "--count", "3")
    assert r.exit_code == 0 and "shunyi-03" in r.output
    assert "丰台管理部" in run(url, st.admin_token, "offices").output
    assert run(url, st.admin_token, "revoke", "t-cli-1").exit_code == 0
    assert "admin (admin)" in run(url, st.admin_token, "whoami").output
    r = run(url, st.admin_token, "usage", "--office", "haidian", "--from", "2026-11-01", "--to", "2026-11-07")
    assert r.exit_code == 0, r.output
    assert "no sessions in this period" in r.output
    r = run(url, st.admin_token, "usage", "--from", "2026-13-01")
    assert r.exit_code == EXIT_USAGE and "date_from" in r.output


def test_cli_errors_are_plain_words_with_exit_codes(server: Any, tmp_path: Path) -> None:
    st, url = server
    r = run(url, "wrong-token", "terminals")
    assert r.exit_code == EXIT_AUTH and "did not accept the token" in r.output
    r = run(url, st.admin_token, "enrol", "t-x", "--office", "atlantis")
    assert r.exit_code == EXIT_USAGE and "atlantis" in r.output
    r = run(f"http://127.0.0.1:{free_port()}", st.admin_token, "terminals")
    assert r.exit_code == EXIT_UNREACHABLE and "cannot reach" in r.output
    # a client that keeps guessing is told to wait, in plain words
    for _ in range(st.server.auth.throttle.free_failures):
        run(url, "wrong-token", "terminals")
    r = run(url, "wrong-token", "whoami")
    assert r.exit_code == EXIT_AUTH and "too many failed logins" in r.output and "retry in" in r.output


def set_password(url: str, token: str, *args: str, input: str) -> Any:
    """`fleetctl user password ARGS` with `input` as what is typed (or sent on stdin)."""
    return CliRunner().invoke(app, ["--url", url, "--token", token, "user", "password", *args], input=input)


def console_login(url: str, name: str, password: str) -> httpx.Client | None:
    """Log into the console over HTTP as a browser does (login form, its CSRF token, the post).

    The client holding the session cookie, or None when the login was refused."""
    client = httpx.Client(base_url=url, timeout=30.0)
    form = client.get("/login")
    assert form.status_code == 200, form.text[:300]
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf, "the login form carries no CSRF token"
    r = client.post("/login", data={"name": name, "password": password, "csrf": csrf.group(1), "next": "/usage"})
    if r.status_code != 303:
        client.close()
        return None
    return client


def signed_in(client: httpx.Client) -> bool:
    """Whether the client's console session still opens the usage page (else: sent to the login)."""
    r = client.get("/usage")
    assert r.status_code in (200, 303), r.status_code
    return r.status_code == 200


@pytest.fixture
def server_process(tmp_path: Path) -> Any:
    """`fleet-server run` as its own process (no broker: users and passwords need none)."""
    st = DevStack(tmp_path / "p")
    port = free_port()
    proc = st.server_process(http_port=port)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return (
                httpx.get(url + "/api/v1/me", headers={"Authorization": f"Bearer {st.admin_token}"}).status_code == 200
            )
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, what="fleet-server run answering")
        yield st, url
    finally:
        stop(proc)
        st.close()


def make_manager(url: str, admin_token: str, name: str) -> str:
    """A haidian manager made over the API; returns their bearer token."""
    made = httpx.post(
        url + "/api/v1/users",
        json={"name": name, "role": "manager", "offices": ["haidian"]},
        headers={"Authorization": f"Bearer {admin_token}"},
    )
    assert made.status_code == 201, made.text
    return str(made.json()["token"])


def test_user_password_sets_the_console_login_and_ends_the_old_sessions(server_process: Any) -> None:
    st, url = server_process
    manager_token = make_manager(url, st.admin_token, "li.wei")

    first, second = "first-console-pw-1", "second-console-pw-2"
    r = set_password(url, st.admin_token, "li.wei", "--stdin", input=first + "\n")
    assert r.exit_code == 0, r.output
    assert "console password of li.wei set" in r.output and first not in r.output
    old = console_login(url, "li.wei", first)
    assert old is not None and signed_in(old)

    # asked twice without echo: the new password never shows, and the old session ends with it
    r = set_password(url, st.admin_token, "li.wei", input=f"{second}\n{second}\n")
    assert r.exit_code == 0, r.output
    assert second not in r.output
    assert not signed_in(old)
    old.close()
    assert console_login(url, "li.wei", first) is None
    new = console_login(url, "li.wei", second)
    assert new is not None and signed_in(new)
    new.close()
    # bearer tokens keep working
    assert "li.wei (manager)" in run(url, manager_token, "whoami").output


def test_user_password_errors_are_plain_words(server_process: Any) -> None:
    st, url = server_process

    manager_token = make_manager(url, st.admin_token, "zhao.min")
    r = set_password(url, st.admin_token, "zhao.min", "--stdin", input="short\n")
    assert r.exit_code == EXIT_USAGE and "too weak" in r.output and "12 characters" in r.output
    r = set_password(url, st.admin_token, "zhao.min", input="long-enough-pw-1\nlong-enough-pw-2\n")
    assert r.exit_code == EXIT_USAGE and "not the same" in r.output and "nothing was changed" in r.output
    r = set_password(url, st.admin_token, "nobody", "--stdin", input="long-enough-pw-1\n")
    assert r.exit_code == EXIT_USAGE and "there is no user 'nobody'" in r.output
    r = set_password(url, st.admin_token, "Bob!", "--stdin", input="long-enough-pw-1\n")
    assert r.exit_code == EXIT_USAGE and "is not a user name" in r.output
    r = set_password(url, manager_token, "zhao.min", "--stdin", input="long-enough-pw-1\n")
    assert r.exit_code == EXIT_AUTH and "only an admin may set console passwords" in r.output
    r = set_password(url, st.admin_token, "zhao.min", "--stdin", input="")
    assert r.exit_code == EXIT_USAGE and "no password on standard input" in r.output
    # nothing above set a password: the user still cannot log into the console
    assert console_login(url, "zhao.min", "long-enough-pw-1") is None
    # the password is never an argument
    helptext = CliRunner().invoke(app, ["user", "password", "--help"]).output
    assert "--stdin" in helptext and "--password" not in helptext
