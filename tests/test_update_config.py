"""Config releases end to end: signed settings from the allow-list are applied by a restart,
tried and gated like an agent release, committed without reinstalling anything, and kept across
restarts; a config release naming a setting outside the allow-list is rejected."""

from __future__ import annotations

import json

import pytest

from fleet_dev import releases
from fleet_dev.proc import wait_for
from tests.update_util import Rig, rig_fixture

pytestmark = pytest.mark.timeout(600)


rig = rig_fixture("update-config", {"c-1": "generic"})


def _hb_interval(rig: Rig, tid: str) -> float | None:
    with rig._db() as conn:
        row = conn.execute("SELECT doc FROM terminal_status WHERE terminal=?", (tid,)).fetchone()
    return None if row is None else json.loads(row[0]).get("hb_interval_s")


def test_config_release_applies_by_restart_commits_and_survives_restarts(rig: Rig) -> None:
    t = rig.terminal("c-1")
    first = t.current()
    t.start()
    rig.wait_version("c-1", "1.0.0")
    assert _hb_interval(rig, "c-1") == 1.0
    pub = releases.publish_config(rig.rc, rig.keystore, {"heartbeat_interval_s": 2}, "cfg-1", rig.work / "cfg")
    cmd = rig.desire("c-1", pub, version="cfg-1", kind="config", gate_s=3.0)
    rig.wait_state("c-1", cmd, "committed")
    states = rig.states("c-1", cmd)
    assert states == ["notified", "downloading", "downloaded", "installing", "on_trial", "committed"]
    wait_for(lambda: _hb_interval(rig, "c-1") == 2.0, 60, what="heartbeat with the new interval")
    assert t.releases() == [first] and t.current() == first  # nothing reinstalled
    assert t.update_state()["committed"]["config"]["version"] == "cfg-1"
    t.stop()
    t.start()
    t.wait_api()
    assert t.api_get("/v1/update")["committed"]["config"]["version"] == "cfg-1"
    wait_for(lambda: _hb_interval(rig, "c-1") == 2.0, 60, what="interval kept across a restart")

    bad = releases.publish_config(rig.rc, rig.keystore, {"broker_host": "elsewhere.example"}, "cfg-2", rig.work / "cfg")
    refused = rig.desire("c-1", bad, version="cfg-2", kind="config")
    rig.wait_state("c-1", refused, "rejected")
    last = rig.reports("c-1", refused)[-1]
    assert last["reason"] == "not_a_release" and "broker_host" in last["detail"]
