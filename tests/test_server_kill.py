"""The fleet server as its own process (`fleet-server run`), killed with SIGKILL while terminals send:
after a restart every event the agents posted is stored once, none lost, none twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fleet_dev.devstack import DevStack, service_events
from fleet_dev.proc import free_port, wait_for

PER_TERMINAL_BEFORE = 1_500
PER_TERMINAL_WHILE_DOWN = 300


def _healthz_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as res:
            return bool(res.status == 200 and b'"ok":true' in res.read())
    except OSError:
        return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def server_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        _kill(p)


def test_server_killed_with_sigkill_mid_traffic_loses_and_doubles_nothing(
    make_stack: Callable[..., DevStack], server_procs: list[subprocess.Popen[bytes]]
) -> None:
    st = make_stack(2, start=False)
    st.start_broker()
    port = free_port()
    server = st.server_process(http_port=port)
    server_procs.append(server)
    wait_for(lambda: _healthz_ok(port), 60, what="fleet-server run connected to the broker")

    agents: list[Any] = [st.agent(tid, batch_events=20, send_window=4, receipt_timeout_s=1.0) for tid in st.passwords]
    st.tracked_agents.extend(agents)  # type: ignore[attr-defined]
    for a in agents:
        a.start()
    wait_for(lambda: all(a.link.connected for a in agents), 15, what="agents connected")
    for a in agents:
        a.post_events(list(service_events(PER_TERMINAL_BEFORE, f"{a.settings.terminal_id}-a")))
    posted = len(agents) * PER_TERMINAL_BEFORE

    wait_for(lambda: st.stored() >= 300, 60, what="the server storing events")
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(10)
    at_kill = st.stored()
    assert at_kill < posted, "everything was stored before the kill; the test proves nothing"

    # citizens keep being served while the server is gone
    for a in agents:
        a.post_events(list(service_events(PER_TERMINAL_WHILE_DOWN, f"{a.settings.terminal_id}-b")))
    posted += len(agents) * PER_TERMINAL_WHILE_DOWN

    server = st.server_process(http_port=port)
    server_procs.append(server)
    wait_for(lambda: st.stored() == posted, 120, what=f"all {posted} posted events stored after the restart")
    wait_for(lambda: all(a.outbox.depth == 0 for a in agents), 60, what="outboxes emptied by receipts")

    per = PER_TERMINAL_BEFORE + PER_TERMINAL_WHILE_DOWN
    with sqlite3.connect(st.settings.db_path) as conn:
        for tid in st.passwords:
            seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE terminal=? ORDER BY seq", (tid,))]
            assert seqs == list(range(1, per + 1)), f"{tid}: stored seqs are not exactly 1..{per}"
        sessions = [r[0] for r in conn.execute("SELECT json_extract(body, '$.session') FROM events")]
        ids = [r[0] for r in conn.execute("SELECT id FROM events")]
    assert len(sessions) == len(set(sessions)) == posted
    assert len(ids) == len(set(ids)) == posted
    # what the server process wrote stays private to its user
    for f in st.settings.db_path.parent.glob("fleet.db*"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f"{f.name} is {oct(f.stat().st_mode)}"
