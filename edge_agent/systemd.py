"""systemd notifications (sd_notify protocol, standard library only): READY=1 and WATCHDOG=1.

The unit written by the provisioning playbook is Type=notify with WatchdogSec: systemd restarts
the agent when the pings stop, so they are sent only while the pump is really turning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as err:
        log.warning("systemd notification failed: %s", err)
        return False


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def start_watchdog(alive: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
    """Ping the watchdog while `alive()` holds; stop pinging (and let systemd restart us) when not."""
    interval = watchdog_interval_s()
    if interval is None:
        return None

    def run() -> None:
        while not stop.wait(interval):
            if alive():
                notify("WATCHDOG=1")
            else:
                log.error("agent is stuck; withholding the watchdog ping so systemd restarts it")

    thread = threading.Thread(target=run, name="sd-watchdog", daemon=True)
    thread.start()
    return thread
