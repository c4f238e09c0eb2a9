"""The agent tells systemd it is ready and pings the watchdog while its pump turns."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from edge_agent import systemd


def test_ready_and_watchdog_pings_reach_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.notify("READY=1")
    assert server.recv(100) == b"READY=1"
    alive = [True]
    stop = threading.Event()
    thread = systemd.start_watchdog(lambda: alive[0], stop)
    assert thread is not None
    assert server.recv(100) == b"WATCHDOG=1"
    alive[0] = False  # a stuck pump: the pings stop, so systemd would restart the agent
    while True:
        try:
            server.settimeout(0.5)
            server.recv(100)
        except TimeoutError:
            break
    stop.set()
    thread.join(2)
    server.close()


def test_no_notifications_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.start_watchdog(lambda: True, threading.Event()) is None
