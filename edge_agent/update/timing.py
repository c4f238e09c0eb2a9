"""When an install may happen: the office's maintenance window, the deadline, and open citizen
sessions. Pure logic, no I/O (the session tracker takes a clock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fleet_wire.release import MaintenanceWindow

SESSION_STARTED = "service.started"
SESSION_ENDED = frozenset({"service.completed", "service.abandoned"})
MAX_OPEN_SESSIONS = 1000  # a kiosk app that never closes its sessions must not grow the agent's memory


def in_window(now: datetime, window: MaintenanceWindow) -> bool:
    """Whether `now` (aware) falls inside the window, in the window's own zone; wraps past midnight.
    An unknown zone is judged in UTC rather than never installing."""
    try:
        zone: Any = ZoneInfo(window.tz)
    except (ZoneInfoNotFoundError, ValueError):
        zone = UTC
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    start = int(window.start[:2]) * 60 + int(window.start[3:])
    end = int(window.end[:2]) * 60 + int(window.end[3:])
    if start == end:
        return True  # a window of the whole day
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def install_wait_reason(
    now: datetime, window: MaintenanceWindow | None, deadline: datetime | None, sessions_open: int
) -> str | None:
    """None when an install may start now, else the update state to wait in."""
    if sessions_open:
        return "waiting_session"
    if window is None or in_window(now, window):
        return None
    if deadline is not None and now >= deadline:
        return None  # past its deadline: the next idle moment, window or not
    return "waiting_window"


class SessionTracker:
    """Citizen sessions open on the kiosk, from the events the kiosk app posts (session id in the
    body). A session the app forgot to close stops counting after `timeout_s`."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._open: dict[str, float] = {}
        self._lock = threading.Lock()
        self.last_activity: float | None = None

    def observe(self, event_type: str, body: Any) -> None:
        if event_type != SESSION_STARTED and event_type not in SESSION_ENDED:
            return
        session = body.get("session") if isinstance(body, dict) else None
        if not isinstance(session, str) or not session:
            return
        now = self._clock()
        with self._lock:
            self.last_activity = now
            if event_type == SESSION_STARTED:
                if len(self._open) >= MAX_OPEN_SESSIONS:
                    self._open.pop(min(self._open, key=self._open.__getitem__))
                self._open[session] = now
            else:
                self._open.pop(session, None)

    def open_sessions(self) -> list[str]:
        """Sessions still open (forgotten ones past the timeout are dropped)."""
        now = self._clock()
        with self._lock:
            for sid in [s for s, t in self._open.items() if now - t >= self.timeout_s]:
                del self._open[sid]
            return sorted(self._open)


def parse_deadline(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
