"""The server's acknowledgement in the health gate: required only when the old version could
reach the server. A server that goes silent during the trial of a terminal that could reach it
rolls that terminal back (`gate_unacknowledged`); an office that was already cut off from the
server before the install commits on the terminal's own health, and the reports arrive later."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.update_util import Rig, rig_fixture, window_now_closed

pytestmark = pytest.mark.timeout(900)


rig = rig_fixture("update-outage", {"o-silent": "generic", "o-cutoff": "generic"}, release="4.0.0")


def test_server_silent_during_the_trial_of_a_reachable_terminal_rolls_it_back(rig: Rig) -> None:
    t = rig.terminal("o-silent")
    first = t.current()
    t.start()
    rig.wait_version("o-silent", "1.0.0")
    cmd = rig.desire("o-silent", rig.release, version="4.0.0", gate_s=4.0)
    rig.wait_state("o-silent", cmd, "installing")
    rig.stop_server()
    try:
        # the new release starts, gates without an acknowledgement and goes back
        from fleet_dev.proc import wait_for

        wait_for(lambda: t.launcher_state()["failed"] != [], 240, 0.2, what="the trial to fail")
    finally:
        rig.start_server()
    rig.wait_state("o-silent", cmd, "rolled_back")
    last = rig.reports("o-silent", cmd)[-1]
    assert last["reason"] == "gate_unacknowledged", last
    assert last["running"] == "4.0.0"  # reported by the new version before it switched back
    rig.wait_version("o-silent", "1.0.0")
    assert t.current() == first


def test_an_office_cut_off_before_the_install_commits_on_its_own_health(rig: Rig) -> None:
    t = rig.terminal("o-cutoff", update_reach_window_s=3.0)
    t.start()
    rig.wait_version("o-cutoff", "1.0.0")
    deadline = datetime.now(UTC) + timedelta(seconds=25)
    cmd = rig.desire(
        "o-cutoff",
        rig.release,
        version="4.0.0",
        gate_s=4.0,
        window=window_now_closed(),
        deadline=deadline,
    )
    rig.wait_state("o-cutoff", cmd, "waiting_window")  # downloaded while the server could be reached
    rig.stop_server()
    try:
        from fleet_dev.proc import wait_for

        wait_for(
            lambda: t.update_state().get("committed", {}).get("agent") is not None,
            240,
            0.2,
            what="the terminal to commit without the server",
        )
        assert (t.current() or "").startswith("4.0.0-")
    finally:
        rig.start_server()
    rig.wait_state("o-cutoff", cmd, "committed")  # the reports come through the outbox afterwards
    states = rig.states("o-cutoff", cmd)
    assert states[-2:] == ["on_trial", "committed"]
    rig.wait_version("o-cutoff", "4.0.0")
