"""When an install may start (window in the office's zone, wrapping past midnight; deadline;
open sessions with a timeout) and what a config release may change. Pure logic."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.update import overlay
from edge_agent.update.timing import SessionTracker, in_window, install_wait_reason, parse_deadline
from fleet_wire.release import MaintenanceWindow

NIGHT = MaintenanceWindow(tz="Asia/Shanghai", start="22:00", end="02:00")
NOON = MaintenanceWindow(tz="Asia/Shanghai", start="12:00", end="13:30")


def utc(h: int, m: int = 0, day: int = 1) -> datetime:
    return datetime(2026, 12, day, h, m, tzinfo=UTC)


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        (utc(14, 0), True),  # 22:00 in Beijing
        (utc(13, 59), False),  # 21:59
        (utc(17, 59), True),  # 01:59, past midnight
        (utc(18, 0), False),  # 02:00: the end is outside
        (utc(4, 0), False),  # noon
    ],
)
def test_window_is_judged_in_the_offices_zone_and_wraps_past_midnight(when: datetime, inside: bool) -> None:
    assert in_window(when, NIGHT) is inside


def test_window_that_does_not_wrap() -> None:
    assert in_window(utc(4, 0), NOON) and in_window(utc(5, 29), NOON)
    assert not in_window(utc(5, 30), NOON) and not in_window(utc(3, 59), NOON)


def test_wait_reason_session_first_then_window_then_deadline() -> None:
    assert install_wait_reason(utc(4), NIGHT, None, 0) == "waiting_window"
    assert install_wait_reason(utc(14), NIGHT, None, 1) == "waiting_session"
    assert install_wait_reason(utc(14), NIGHT, None, 0) is None
    assert install_wait_reason(utc(4), None, None, 0) is None
    past = parse_deadline("2026-12-01T03:00:00Z")
    assert install_wait_reason(utc(4), NIGHT, past, 0) is None
    assert install_wait_reason(utc(4), NIGHT, past, 2) == "waiting_session"  # never during a session
    assert install_wait_reason(utc(2), NIGHT, past, 0) == "waiting_window"


def test_sessions_open_close_and_time_out() -> None:
    now = [0.0]
    tracker = SessionTracker(60.0, clock=lambda: now[0])
    tracker.observe("service.started", {"session": "a"})
    tracker.observe("service.started", {"session": "b"})
    tracker.observe("face.decision", {"session": "c"})
    assert tracker.open_sessions() == ["a", "b"]
    tracker.observe("service.completed", {"session": "a", "service_code": "TQ02"})
    tracker.observe("service.abandoned", {"session": "zz"})  # never opened: nothing happens
    assert tracker.open_sessions() == ["b"]
    now[0] = 61.0  # the app forgot to close b
    assert tracker.open_sessions() == []
    tracker.observe("service.started", {"no": "session"})
    assert tracker.open_sessions() == []


def test_config_overlay_allows_only_listed_keys(tmp_path: Path) -> None:
    overlay.write_trial(tmp_path, {"heartbeat_interval_s": 7})
    assert overlay.load(tmp_path, on_trial=True) == {"heartbeat_interval_s": 7.0}
    assert overlay.load(tmp_path, on_trial=False) == {}
    overlay.commit_trial(tmp_path)
    assert overlay.load(tmp_path, on_trial=False) == {"heartbeat_interval_s": 7.0}
    with pytest.raises(overlay.OverlayRefused, match="password"):
        overlay.write_trial(tmp_path, {"password": "x"})
    with pytest.raises(overlay.OverlayRefused):
        overlay.write_trial(tmp_path, {"heartbeat_interval_s": -1})
