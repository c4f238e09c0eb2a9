"""kill -9 of the agent, and of its launcher (the agent goes with it, as the whole unit does), at
each step of an agent update: after the download, mid-install, right after the switch, during the
gate. After the restart the terminal ends on a working version, committed, and the server's view
(reports, heartbeat) matches the terminal's."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge_agent import launcher
from fleet_dev.proc import wait_for
from fleet_dev.terminal import Terminal
from tests.update_util import UPDATE_TIMEOUT_S, Rig, rig_fixture, window_now_closed

pytestmark = pytest.mark.timeout(1500)

STEPS = ("after_download", "mid_install", "after_switch", "during_gate")
VICTIMS = ("agent", "launcher")
TERMINALS = {f"k-{step.replace('_', '-')}-{victim}": "generic" for step in STEPS for victim in VICTIMS}


rig = rig_fixture("update-kill", TERMINALS, release="2.0.0")


def _kill(t: Terminal, victim: str) -> None:
    if victim == "agent":
        t.kill_agent()
    else:
        t.kill_launcher()
        t.start()


def _incomplete_release(t: Terminal) -> bool:
    return any(
        n.startswith("2.0.0-") and not (t.opt / "releases" / n / launcher.COMPLETE_MARKER).exists()
        for n in t.releases()
    )


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_ends_committed_on_a_working_version(rig: Rig, step: str, victim: str) -> None:
    tid = f"k-{step.replace('_', '-')}-{victim}"
    t = rig.terminal(tid)
    first = t.current()
    t.start()
    rig.wait_version(tid, "1.0.0")
    pub: Any = rig.release
    kwargs: dict[str, Any] = {}
    if step == "after_download":
        # outside the window until a deadline a little ahead: it downloads, then waits
        kwargs = {"window": window_now_closed(), "deadline": datetime.now(UTC) + timedelta(seconds=20)}
    cmd = rig.desire(tid, pub, version="2.0.0", gate_s=4.0, **kwargs)

    reached: dict[str, Callable[[], bool]] = {
        "after_download": lambda: "waiting_window" in rig.states(tid, cmd),
        "mid_install": lambda: _incomplete_release(t),
        "after_switch": lambda: (t.current() or "").startswith("2.0.0-"),
        "during_gate": lambda: "on_trial" in rig.states(tid, cmd),
    }
    wait_for(reached[step], UPDATE_TIMEOUT_S, 0.01, what=f"{tid} reaching {step}")
    downloads = sorted((t.data_dir / "update" / "downloads").rglob("*.whl"))
    inodes = {p: p.stat().st_ino for p in downloads}
    _kill(t, victim)

    rig.wait_state(tid, cmd, "committed")
    rig.wait_version(tid, "2.0.0")
    reports = rig.reports(tid, cmd)
    numbers = [r["report"] for r in reports]
    assert numbers == sorted(set(numbers)) == list(range(1, len(numbers) + 1)), reports  # each once, no gap
    states = [r["state"] for r in reports]
    assert states[0] == "notified" and states[-1] == "committed"
    assert "rolled_back" not in states and "failed" not in states
    assert states.count("on_trial") == 1
    new = t.current()
    assert new is not None and new.startswith("2.0.0-")
    assert launcher.is_complete(t.opt / "releases" / new)
    assert set(t.releases()) == {first, new}
    assert t.launcher_state()["trial"] is None
    if step == "after_download":
        # the verified download was reused, not fetched again
        assert downloads and all(p.stat().st_ino == inodes[p] for p in downloads)
    t.stop()
    assert t.current() == new
