"""When an agent release installs, end to end: never during a citizen's session (sessions from
the events the kiosk app posts, with a timeout for forgotten ones), only inside the maintenance
window, or after the deadline at the next idle moment; a newer command replaces a waiting one; a
malformed command is counted and changes nothing."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_dev.proc import wait_for
from fleet_wire.topics import Channel, topic
from tests.update_util import Rig, post_event, rig_fixture, window_now_closed, window_now_open

pytestmark = pytest.mark.timeout(900)

TERMINALS = {"g-session": "generic", "g-timeout": "generic", "g-window": "generic", "g-deadline": "generic"}
# how long a waiting terminal is watched for not installing (it ticks every 0.2 s)
WATCH_S = 4.0


rig = rig_fixture("update-gating", TERMINALS, release="3.0.0")


def _started(session: str) -> dict[str, Any]:
    return {"session": session, "service_code": "TQ02", "face_login": False}


def _completed(session: str) -> dict[str, Any]:
    return {"session": session, "service_code": "TQ02", "duration_s": 30.0, "face_login": False}


def _still_waiting(rig: Rig, tid: str, cmd: Any, state: str) -> None:
    time.sleep(WATCH_S)
    states = rig.states(tid, cmd)
    assert states[-1] == state, states
    assert "installing" not in states


def test_open_session_holds_the_install_until_it_ends(rig: Rig) -> None:
    t = rig.terminal("g-session")
    first = t.current()
    t.start()
    rig.wait_version("g-session", "1.0.0")
    # garbage on the cmd topic first: counted, the agent carries on
    rig.mqtt.publish(topic("g-session", Channel.CMD), b'{"type": "desired_release", "v": 1')
    rig.mqtt.publish(topic("g-session", Channel.CMD), b"\xff\xfe")
    wait_for(lambda: t.api_get("/v1/update")["bad_commands"] == 2, 30, what="malformed commands counted")
    post_event(t, "service.started", _started("citizen-1"), key="gs-start-1")
    assert t.api_get("/v1/update")["open_sessions"] == 1
    cmd = rig.desire("g-session", rig.release, version="3.0.0", window=window_now_open())
    rig.wait_state("g-session", cmd, "waiting_session")
    _still_waiting(rig, "g-session", cmd, "waiting_session")
    assert t.current() == first
    post_event(t, "service.completed", _completed("citizen-1"), key="gs-done-1")
    rig.wait_state("g-session", cmd, "committed")
    states = rig.states("g-session", cmd)
    assert states.count("waiting_session") == 1  # once per change of reason
    assert states.index("waiting_session") < states.index("installing")
    rig.wait_version("g-session", "3.0.0")


def test_a_session_the_app_forgot_to_close_stops_holding_after_its_timeout(rig: Rig) -> None:
    t = rig.terminal("g-timeout", update_session_timeout_s=6.0)
    t.start()
    rig.wait_version("g-timeout", "1.0.0")
    post_event(t, "service.started", _started("forgotten"), key="gt-start-1")
    cmd = rig.desire("g-timeout", rig.release, version="3.0.0")
    rig.wait_state("g-timeout", cmd, "waiting_session")
    rig.wait_state("g-timeout", cmd, "committed")
    rig.wait_version("g-timeout", "3.0.0")


def test_outside_the_window_it_waits_and_a_newer_command_replaces_the_waiting_one(rig: Rig) -> None:
    t = rig.terminal("g-window")
    first = t.current()
    t.start()
    rig.wait_version("g-window", "1.0.0")
    cmd = rig.desire("g-window", rig.release, version="3.0.0", window=window_now_closed())
    rig.wait_state("g-window", cmd, "waiting_window")
    _still_waiting(rig, "g-window", cmd, "waiting_window")
    assert rig.states("g-window", cmd)[:3] == ["notified", "downloading", "downloaded"]  # downloads any time
    assert t.current() == first and t.releases() == [first]
    newer = rig.desire("g-window", rig.release, version="3.0.0", rollout="r2")
    rig.wait_state("g-window", newer, "committed")
    old = rig.reports("g-window", cmd)[-1]
    assert (old["state"], old["reason"]) == ("failed", "superseded")
    rig.wait_version("g-window", "3.0.0")


def test_past_its_deadline_it_installs_at_the_next_idle_moment_outside_the_window(rig: Rig) -> None:
    t = rig.terminal("g-deadline")
    t.start()
    rig.wait_version("g-deadline", "1.0.0")
    post_event(t, "service.started", _started("busy"), key="gd-start-1")
    cmd = rig.desire(
        "g-deadline",
        rig.release,
        version="3.0.0",
        window=window_now_closed(),
        deadline=datetime.now(UTC) - timedelta(minutes=1),
    )
    rig.wait_state("g-deadline", cmd, "waiting_session")  # the deadline never overrides a session
    _still_waiting(rig, "g-deadline", cmd, "waiting_session")
    post_event(t, "service.abandoned", {**_completed("busy"), "step": "id-card"}, key="gd-end-1")
    rig.wait_state("g-deadline", cmd, "committed")
    assert "waiting_window" not in rig.states("g-deadline", cmd)
    rig.wait_version("g-deadline", "3.0.0")
