"""fleetctl rollout … against a real server over HTTP, with scripted terminals behind it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port
from fleet_server.app import create_app
from fleet_server.auth.models import Role
from fleet_server.cli import EXIT_AUTH, EXIT_SERVER, EXIT_USAGE, app
from tests.test_rollouts import ScriptedTerminals, fails, fleet, good, server  # noqa: F401 (fixture)


@pytest.fixture
def http(fleet: Callable[..., tuple[DevStack, ScriptedTerminals]]) -> Iterator[tuple[DevStack, ScriptedTerminals, str]]:  # noqa: F811
    stack, scripted = fleet({"t-k-1": "dongcheng", "t-k-2": "haidian", "t-k-3": "xicheng"})
    port = free_port()
    web = uvicorn.Server(
        uvicorn.Config(
            create_app(stack.settings, server(stack)), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield stack, scripted, f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(5)


def _with_groups() -> None:
    """`fleetctl` registers its command groups in main(); do the same once here."""
    from fleet_server import cli

    if not any(g.name == "rollout" for g in cli.app.registered_groups):
        cli._register_subcommands()


def run(url: str, token: str, *args: str) -> Any:
    _with_groups()
    return CliRunner().invoke(app, ["--url", url, "--token", token, "rollout", *args])


def test_plan_file(http: tuple[DevStack, ScriptedTerminals, str], tmp_path: Path) -> None:
    stack, _, url = http
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "release: agent/agent-2.0.0.whl\n"
        "targets: {offices: [dongcheng, xicheng]}\n"
        "waves:\n  - {name: canary, size: {count: 1}, pilot_only: true}\n  - {name: rest}\n",
        encoding="utf-8",
    )
    r = run(url, stack.admin_token, "preview", "--plan", str(plan))
    assert r.exit_code == 0, r.output
    assert "wave 1 canary — 1 terminals" in r.output and "wave 2 rest — 1 terminals" in r.output
    assert "t-k-2" not in r.output  # haidian is not targeted
    plan.write_text("- not a mapping\n", encoding="utf-8")
    r = run(url, stack.admin_token, "preview", "--plan", str(plan))
    assert r.exit_code == EXIT_USAGE and "a plan is a mapping" in " ".join(r.output.split())


def test_preview_create_watch_status_and_controls(http: tuple[DevStack, ScriptedTerminals, str]) -> None:
    stack, scripted, url = http
    tok = stack.admin_token
    r = run(url, tok, "preview", "--release", "agent/agent-2.0.0.whl", "--wave", "1@pilot", "--wave", "rest", "--now")
    assert r.exit_code == 0, r.output
    assert "wave 1" in r.output and "wave 2" in r.output and "3 terminals" in r.output
    r = run(url, tok, "preview", "--release", "agent/agent-2.0.0.whl", "--wave", "9")
    assert r.exit_code == EXIT_USAGE and "wave 1: asks for 9" in r.output
    r = run(
        url, tok, "create", "--id", "cli-one", "--release", "agent/agent-2.0.0.whl",
        "--wave", "1@pilot", "--wave", "rest", "--now", "--watch",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert ("completed" in r.output and "东城管理部" in r.output) or "海淀管理部" in r.output
    r = run(url, tok, "status", "cli-one", "--terminals")
    assert r.exit_code == 0 and "1/1 committed" in r.output and "2/2 committed" in r.output and "t-k-3" in r.output
    assert "cli-one" in run(url, tok, "list").output
    # a manager may read but not act
    mgr = server(stack).auth.create_user("mgr", Role.MANAGER, offices=["dongcheng"])
    assert run(url, mgr, "status", "cli-one").exit_code == 0
    r = run(url, mgr, "pause", "cli-one")
    assert r.exit_code == EXIT_AUTH and "needs admin" in r.output
    # a failing rollout: --watch stops at the halt, says why, exits non-zero
    scripted.default = fails("failed", "disk_full", "")
    r = run(url, tok, "create", "--id", "cli-bad", "--release", "agent/agent-1.0.0-r21.whl", "--now", "--watch")
    assert r.exit_code == EXIT_SERVER, r.output
    assert "halted" in r.output and "not enough disk space" in r.output
    r = run(url, tok, "abort", "cli-bad", "--note", "disk")
    assert r.exit_code == 0 and "aborted by admin: disk" in r.output
    # roll the first rollout's terminals back to a named release, and follow it
    scripted.default = good
    r = run(url, tok, "rollback", "cli-one", "--to", "agent/agent-1.0.0-r21.whl", "--note", "back", "--watch")
    assert r.exit_code == 0, r.output
    assert "completed" in r.output
    assert server(stack).rollouts.get("cli-one")["state"] == "rolled_back"


def test_create_with_an_install_period(http: tuple[DevStack, ScriptedTerminals, str]) -> None:
    stack, _, url = http
    tok = stack.admin_token
    base = ["create", "--release", "agent/agent-2.0.0.whl", "--now"]
    # an end before the start: the server's refusal names the field
    for command in (base, ["preview", *base[1:]]):
        r = run(
            url, tok, *command, "--window-start", "2099-01-03T06:00+08:00", "--window-end", "2099-01-03T02:00+08:00"
        )
        assert r.exit_code == EXIT_USAGE, r.output
        assert "window_end" in r.output and "must end after it starts" in " ".join(r.output.split())
    # not a time, or one without its zone: said before anything is sent
    r = run(url, tok, *base, "--window-start", "tomorrow")
    assert r.exit_code == EXIT_USAGE and "--window-start 'tomorrow': not a time" in " ".join(r.output.split())
    r = run(url, tok, *base, "--window-end", "2099-01-03T06:00")
    assert r.exit_code == EXIT_USAGE and "give the time zone too" in " ".join(r.output.split())
    assert server(stack).rollouts.list_rollouts() == []
    r = run(
        url, tok, *base, "--id", "cli-period",
        "--window-start", "2099-01-01T02:00+08:00", "--window-end", "2099-01-03T06:00+08:00",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = server(stack).rollouts.get("cli-period")
    assert (doc["window_start"], doc["window_end"]) == ("2099-01-01T02:00:00+08:00", "2099-01-03T06:00:00+08:00")
    r = run(url, tok, "status", "cli-period")
    assert r.exit_code == 0 and "install period: 2099-01-01T02:00:00+08:00 – 2099-01-03T06:00:00+08:00" in r.output
