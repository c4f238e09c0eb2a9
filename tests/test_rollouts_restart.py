"""A rollout survives its server being killed: `fleet-server run` as its own process, SIGKILLed
mid-wave, started again over the same database, and the rollout ends committed with the same
commands (level-triggered: the new process re-sends what was not answered, nothing else)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_dev import releases as rel
from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from tests.release_util import serve
from tests.test_rollouts import ADMIN, ScriptedTerminals, fleet, plan, server  # noqa: F401

TERMINALS = {"t-kill-1": "dongcheng", "t-kill-2": "haidian", "t-kill-3": "xicheng", "t-kill-4": "fengtai"}


def _healthz_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as res:
            return bool(res.status == 200 and b'"ok":true' in res.read())
    except OSError:
        return False


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for p in running:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def _rollout(db: Path, rid: str) -> tuple[str, int, dict[str, tuple[str, str]]]:
    """(state, current wave, terminal -> (state, command id)) read straight from the database."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        state, wave = conn.execute("SELECT state, current_wave FROM rollouts WHERE id=?", (rid,)).fetchone()
        rows = conn.execute("SELECT terminal, state, cmd FROM rollout_terminals WHERE rollout=?", (rid,)).fetchall()
    return state, wave, {t: (s, c) for t, s, c in rows}


def test_rollout_continues_after_sigkill_of_the_server(
    fleet: Callable[..., tuple[DevStack, ScriptedTerminals]],  # noqa: F811
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    stack, scripted = fleet(TERMINALS)
    fs = server(stack)
    fs.rollouts.use_releases(fs.releases)  # the real release service: the server process has the same
    http, thread, url = serve(stack)
    rc = rel.client(url, stack.admin_token)
    try:
        ks = rel.make_keystore(tmp_path / "keystore")
        rel.install_online_key(ks, stack.settings)
        rel.set_up_server(rc, ks)
        published = rel.publish_agent(rc, ks, rel.write_agent_dist(tmp_path / "d1", "1.0.0"), tmp_path / "w")
    finally:
        rc.http.close()
        http.should_exit = True
        thread.join(5)
    db = stack.settings.db_path
    scripted.hold.update(TERMINALS)
    fs.rollouts.create(plan(id="survivor", release=published.path, waves=[{"size": {"count": 1}}, {}]), ADMIN)
    canary = next(iter(t["terminal"] for t in fs.rollouts.terminals("survivor", wave=1)))
    scripted.hold.discard(canary)
    wait_for(lambda: _rollout(db, "survivor")[1] == 2, 40, what="wave 2 started")
    stack.stop_server()

    port = free_port()
    proc = stack.server_process(http_port=port)
    procs.append(proc)
    wait_for(lambda: _healthz_ok(port), 60, what="fleet-server run connected")
    wave2 = [t for t in TERMINALS if t != canary]
    # wave 2's commands go out from the server process; one terminal answers, then the kill
    wait_for(lambda: all(scripted.received.get(t) for t in wave2), 60, what="wave 2 sent by the server process")
    scripted.hold.discard(wave2[0])
    wait_for(lambda: _rollout(db, "survivor")[2][wave2[0]][0] == "committed", 60, what="one of wave 2 committed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    state, wave, before = _rollout(db, "survivor")
    assert state == "running" and wave == 2
    assert [before[t][0] for t in wave2[1:]] == ["pending", "pending"]

    scripted.hold.clear()
    proc = stack.server_process(http_port=port)
    procs.append(proc)
    wait_for(lambda: _rollout(db, "survivor")[0] == "completed", 90, what="rollout completed after the kill")
    state, wave, after = _rollout(db, "survivor")
    assert {s for s, _ in after.values()} == {"committed"}
    # the same commands all along: the restarted engine continued, it did not start over
    assert {t: c for t, (_, c) in after.items()} == {t: c for t, (_, c) in before.items()}
    assert all(len(scripted.answered[t]) == 1 for t in TERMINALS)
