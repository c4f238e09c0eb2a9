"""fleetctl against a real server over HTTP."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port
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
