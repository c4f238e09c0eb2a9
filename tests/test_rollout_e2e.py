"""Rollouts end to end, the way an IT admin runs them, real processes throughout: Mosquitto, the
fleet server as its own process (`fleet-server run`: the rollout engine, the TUF repository under
/tuf), six terminals in three offices (two pilot offices and one other), each the agent under its
launcher from release venvs built from real wheels, and simulated kiosk apps posting citizen
events to every terminal all along. The admin only uses the REST API.

One fleet for the module, the tests in order (each leaves the fleet converged for the next):
a good release through three waves; a release failing its health gate and one crash-looping,
both halted at the canary; a fleet rollback, after which the rolled-back release is refused
(counter_downgrade); a terminal offline during its wave, one enrolled after the rollout started
and the server killed with SIGKILL mid-rollout, all converging."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_dev.proc import wait_for
from fleet_dev.rollout_demo import STALL_S, CitizenTraffic, RolloutFleet, three_waves
from tests.test_cli import console_login, signed_in

pytestmark = pytest.mark.timeout(1500)

LAYOUT = {
    "dc-01": "dongcheng",
    "dc-02": "dongcheng",
    "hd-01": "haidian",
    "hd-02": "haidian",
    "xc-01": "xicheng",
    "xc-02": "xicheng",
}
PILOTS = {"dongcheng", "haidian"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, dist: Any) -> Iterator[RolloutFleet]:
    f = RolloutFleet(tmp_path_factory.mktemp("rollout-e2e"), dist)
    try:
        f.start(LAYOUT)
        f.install_all(LAYOUT)
        for tid in LAYOUT:
            wait_for(lambda tid=tid: f.heartbeat_version(tid) == "1.0.0", STALL_S, 0.2, what=f"{tid} on 1.0.0")
        f.publish("1.0.0")  # what the terminals run, published: the next release's rollback twin
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def citizens(fleet: RolloutFleet) -> Iterator[CitizenTraffic]:
    traffic = CitizenTraffic()
    for t in fleet.terminals.values():
        traffic.serve(t)
    traffic.start()
    try:
        yield traffic
    finally:
        traffic.stop()


def _stored_exactly_once(fleet: RolloutFleet, citizens: CitizenTraffic) -> None:
    """Every citizen event a terminal accepted is stored at the server, once."""
    citizens.pause()
    try:
        assert not citizens.refused, citizens.refused
        for tid, accepted in citizens.accepted.items():
            wait_for(lambda tid=tid, n=accepted: fleet.stored(tid) >= n, 120, 0.2, what=f"{tid}: events stored")
            rows, sessions = fleet.stored_keys_unique(tid)
            assert rows == accepted == sessions, (tid, rows, accepted, sessions)
    finally:
        citizens.resume()


def _by_terminal(fleet: RolloutFleet, rid: str) -> dict[str, dict[str, Any]]:
    return {t["terminal"]: t for t in fleet.rollout_terminals(rid)}


def _committed_everywhere(fleet: RolloutFleet, rid: str, version: str, tids: list[str]) -> None:
    terms = _by_terminal(fleet, rid)
    off = {
        t: (terms[t]["state"], terms[t]["reason"], terms[t]["detail"]) for t in tids if terms[t]["state"] != "committed"
    }
    assert not off, {t: (why, fleet.terminals[t].log()[-3000:]) for t, why in off.items()}
    for tid in tids:
        wait_for(lambda tid=tid: fleet.heartbeat_version(tid) == version, 60, 0.2, what=f"{tid} heartbeat of {version}")
        current = fleet.terminals[tid].current()
        assert current is not None and current.startswith(f"{version}-"), (tid, current)
        reports = fleet.reports(tid, rid)
        assert reports[-1]["state"] == "committed"
        # the health gate ran in the new version, not in the old one on its way out
        assert all(r["running"] == version for r in reports if r["state"] == "on_trial"), (tid, reports)
    for tid in tids:  # reporting healthy, on the new version, as the health service sees it
        wait_for(lambda tid=tid: _healthy_on(fleet.health()[tid], version), 60, 0.2, what=f"{tid} healthy on {version}")


def _healthy_on(h: dict[str, Any], version: str) -> bool:
    failing = [p for p, doc in h["peripherals"].items() if doc["state"] == "fail"]
    return bool(h["state"] == "online" and h["agent_version"] == version and not failing)


def _db(fleet: RolloutFleet) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{fleet.stack.settings.db_path}?mode=ro", uri=True, timeout=30)


def test_good_release_goes_through_three_waves_and_citizen_events_are_stored_once(
    fleet: RolloutFleet, citizens: CitizenTraffic
) -> None:
    tids = list(LAYOUT)
    for t in fleet.terminals.values():  # before the switch (the traffic thread posts too)
        citizens.post(t)
    pub = fleet.publish("1.1.0")
    rid = fleet.create_rollout(three_waves(pub.path, rollout_id="good-1-1-0"))
    waves = fleet.wave_of(rid)
    assert sorted(waves.values()) == [1, 2, 2, 2, 3, 3]
    canary = next(t for t, w in waves.items() if w == 1)
    assert LAYOUT[canary] in PILOTS
    assert {LAYOUT[t] for t, w in waves.items() if w == 2} <= PILOTS
    assert {t for t, w in waves.items() if w == 3} == {"xc-01", "xc-02"}
    before = dict(citizens.accepted)

    doc = fleet.wait_rollout(rid, what="completed")
    assert doc["state"] == "completed", doc
    assert [w["state"] for w in doc["waves"]] == ["done", "done", "done"], doc["waves"]
    assert [w["states"] for w in doc["waves"]] == [{"committed": 1}, {"committed": 3}, {"committed": 2}]
    during = {tid: citizens.accepted[tid] - before[tid] for tid in tids}
    assert all(n > 0 for n in during.values()), during  # citizens were served through every switch
    for t in fleet.terminals.values():  # after the switch
        citizens.post(t)

    _committed_everywhere(fleet, rid, "1.1.0", tids)
    # each wave started only after the one before had committed (history at the server)
    terms = _by_terminal(fleet, rid)

    def first_sent(tid: str) -> str:
        return min(h["at"] for h in terms[tid]["history"])

    def committed_at(tid: str) -> str:
        return next(h["at"] for h in terms[tid]["history"] if h["to_state"] == "committed")

    for wave in (2, 3):
        earlier = [t for t, w in waves.items() if w == wave - 1]
        assert min(first_sent(t) for t, w in waves.items() if w == wave) >= max(committed_at(t) for t in earlier)
    for tid in tids:  # the agent's own report sequence, in order, each state once
        states = [r["state"] for r in fleet.reports(tid, rid)]
        assert states == ["notified", "downloading", "downloaded", "installing", "on_trial", "committed"], (tid, states)
    _stored_exactly_once(fleet, citizens)


@pytest.mark.parametrize(
    ("version", "defect", "reason"), [("1.2.0", "gate_fails", "gate_failed"), ("1.3.0", "crash_at_start", "crash_loop")]
)
def test_bad_release_halts_at_the_canary_which_rolls_itself_back(
    fleet: RolloutFleet, citizens: CitizenTraffic, version: str, defect: str, reason: str
) -> None:
    tids = list(LAYOUT)
    pub = fleet.publish(version, defect)
    rid = fleet.create_rollout(three_waves(pub.path, rollout_id=f"bad-{version.replace('.', '-')}"))
    waves = fleet.wave_of(rid)
    canary = next(t for t, w in waves.items() if w == 1)

    doc = fleet.wait_rollout(rid, what="halted")
    assert doc["state"] == "halted", doc
    assert doc["current_wave"] == 1
    # the API says why, in words, naming the wave, the office and the terminal's own reason
    assert "wave 1" in doc["reason"] and reason in doc["reason"], doc["reason"]
    assert "1 of 1" in doc["reason"], doc["reason"]
    assert [w["state"] for w in doc["waves"]][1:] == ["pending", "pending"], doc["waves"]
    terms = _by_terminal(fleet, rid)
    assert terms[canary]["state"] == "rolled_back" and terms[canary]["reason"] == reason, terms[canary]

    # the canary rolled itself back to the release it ran before, and says so in its heartbeat
    wait_for(lambda: fleet.heartbeat_version(canary) == "1.1.0", 120, 0.2, what=f"{canary} back on 1.1.0")
    current = fleet.terminals[canary].current()
    assert current is not None and current.startswith("1.1.0-")
    assert fleet.terminals[canary].launcher_state()["trial"] is None
    wait_for(lambda: fleet.health()[canary]["state"] == "online", 60, 0.2, what=f"{canary} online")

    # nobody outside wave 1 was even told, let alone downloaded it: not after a few more ticks either
    time.sleep(5)
    wheel = pub.path.rpartition("/")[2]
    others = [t for t in tids if t != canary]
    for tid in others:
        assert terms[tid]["state"] == "pending" and terms[tid]["sends"] == 0, terms[tid]
        assert fleet.reports(tid, rid) == [], tid
        assert not fleet.downloaded(tid, wheel), tid
    assert fleet.downloaded(canary, wheel)
    assert fleet.rollout(rid)["state"] == "halted"

    after = fleet.act(rid, "abort", {"note": "bad build"})
    assert after["state"] == "aborted"
    for tid in tids:
        assert fleet.heartbeat_version(tid) == "1.1.0"
    _stored_exactly_once(fleet, citizens)


def test_fleet_rollback_converges_and_the_rolled_back_release_is_refused(
    fleet: RolloutFleet, citizens: CitizenTraffic
) -> None:
    tids = list(LAYOUT)
    good = fleet.rollout("good-1-1-0")
    assert good["state"] == "completed"
    rb = fleet.act("good-1-1-0", "rollback", {"id": "rollback-1-1-0", "note": "support asked for 1.0.0"})
    twin = rb["release"]
    assert rb["version"] == "1.0.0" and rb["counter"] > good["counter"], rb
    doc = fleet.wait_rollout("rollback-1-1-0", what="completed")
    assert doc["state"] == "completed", doc
    _committed_everywhere(fleet, "rollback-1-1-0", "1.0.0", tids)
    old = fleet.rollout("good-1-1-0")
    assert old["state"] == "rolled_back" and old["superseded_by"] == "rollback-1-1-0"
    assert twin in old["reason"]

    # 1.1.0 again under its old counter: every terminal committed the twin's higher one and refuses
    rid = fleet.create_rollout(
        {
            "id": "again-1-1-0",
            "release": good["release"],
            "window": "now",
            "gate_s": 2.0,
            "targets": {"terminals": ["dc-01"]},
            "waves": [{"name": "one"}],
        }
    )
    doc = fleet.wait_rollout(rid, what="halted")
    assert doc["state"] == "halted", doc
    assert "counter_downgrade" in doc["reason"], doc["reason"]
    term = _by_terminal(fleet, rid)["dc-01"]
    assert term["state"] == "rejected" and term["reason"] == "counter_downgrade", term
    assert fleet.heartbeat_version("dc-01") == "1.0.0"
    assert fleet.terminals["dc-01"].current() is not None
    assert str(fleet.terminals["dc-01"].current()).startswith("1.0.0-")
    fleet.act(rid, "abort")
    _stored_exactly_once(fleet, citizens)


def test_offline_late_enrolled_and_server_sigkill_all_converge(fleet: RolloutFleet, citizens: CitizenTraffic) -> None:
    offline = "xc-02"  # not in a pilot office: the last wave
    citizens.leave(offline)
    fleet.terminals[offline].stop()
    wait_for(lambda: fleet.health()[offline]["state"] != "online", 60, 0.2, what=f"{offline} seen offline")

    pub = fleet.publish("1.4.0")
    rid = fleet.create_rollout(three_waves(pub.path, rollout_id="late-1-4-0"))
    # a terminal enrolled (through the API, as an admin does) after the rollout started
    password = fleet.enrol("xc-03", "xicheng")
    late = fleet.install("xc-03", password=password)
    late.start()
    citizens.serve(late)
    wait_for(lambda: fleet.heartbeat_version("xc-03") == "1.0.0", STALL_S, 0.2, what="xc-03 online")

    # kill -9 the server while wave 2 is under way
    fleet.wait_rollout(
        rid,
        lambda d: d["current_wave"] == 2 and any(s != "pending" for s in d["waves"][1]["states"]),
        what="wave 2 under way",
    )
    with _db(fleet) as conn:
        before = dict(conn.execute("SELECT terminal, cmd FROM rollout_terminals WHERE rollout=?", (rid,)).fetchall())
    fleet.kill_server()
    time.sleep(2)  # terminals keep installing; their reports wait in their outboxes
    fleet.start_server()

    # it continues from its persisted state: the last wave runs, but the offline terminal holds it
    doc = fleet.wait_rollout(
        rid,
        lambda d: d["current_wave"] == 3 and _by_terminal(fleet, rid).get("xc-01", {}).get("state") == "committed",
        what="wave 3 under way with xc-01 committed",
    )
    terms = _by_terminal(fleet, rid)
    assert terms["xc-03"]["wave"] == 3 and terms["xc-03"]["joined_late"], terms["xc-03"]
    assert terms[offline]["state"] == "pending", terms[offline]
    time.sleep(3)
    assert fleet.rollout(rid)["state"] == "running"

    fleet.terminals[offline].start()  # back online: it gets the release at once
    citizens.serve(fleet.terminals[offline])
    doc = fleet.wait_rollout(rid, what="completed")
    assert doc["state"] == "completed", doc
    tids = [*LAYOUT, "xc-03"]
    _committed_everywhere(fleet, rid, "1.4.0", tids)
    with _db(fleet) as conn:
        after = dict(conn.execute("SELECT terminal, cmd FROM rollout_terminals WHERE rollout=?", (rid,)).fetchall())
    # the same commands all along: the restarted engine continued, it did not start over
    assert {t: after[t] for t in before} == before
    for tid in tids:  # one install per terminal, whatever was re-sent around the kill
        states = [r["state"] for r in fleet.reports(tid, rid)]
        assert states.count("installing") == 1 and states[-1] == "committed", (tid, states)
    _stored_exactly_once(fleet, citizens)


def test_halted_rollout_with_on_halt_rollback_returns_the_canary_to_the_release_it_replaced(
    fleet: RolloutFleet, citizens: CitizenTraffic
) -> None:
    """`on_halt: rollback`: the engine rolls the terminals the bad release reached back by itself,
    to the release's signed rollback twin: the release the fleet ran before it (1.4.0 here)."""
    tids = [*LAYOUT, "xc-03"]
    assert {fleet.heartbeat_version(t) for t in tids} == {"1.4.0"}
    pub = fleet.publish("1.5.0", "gate_fails")
    rid = fleet.create_rollout(three_waves(pub.path, rollout_id="bad-1-5-0", on_halt="rollback"))
    canary = next(t for t, w in fleet.wave_of(rid).items() if w == 1)
    doc = fleet.wait_rollout(rid, lambda d: d["superseded_by"] is not None, what="rolled back by the engine")
    assert doc["state"] == "rolled_back", doc
    assert "gate_failed" in doc["reason"] or "rollout-engine" in doc["reason"], doc["reason"]
    back = fleet.rollout(doc["superseded_by"])
    assert back["release"] == pub.twin and back["created_by"] == "rollout-engine", back
    assert [t["terminal"] for t in fleet.rollout_terminals(back["id"])] == [canary]
    assert back["version"] == "1.4.0", back  # the release 1.5.0 replaced, not an older one
    back = fleet.wait_rollout(back["id"], what="the automatic rollback completed")
    assert back["state"] == "completed", back
    _committed_everywhere(fleet, back["id"], "1.4.0", [canary])
    for tid in tids:
        assert fleet.heartbeat_version(tid) == "1.4.0", tid
    _stored_exactly_once(fleet, citizens)


def test_demo_rollout_option_rolls_a_release_through_the_pilot_offices(tmp_path: Path) -> None:
    """`./run.sh demo --rollout` (fleet-demo --rollout), cut down to two pilot offices; the console
    login it prints works while the rollout runs."""
    env = {k: v for k, v in os.environ.items() if k != "FLEET_ADMIN_PASSWORD"}  # a password made for the run
    with (tmp_path / "stderr.log").open("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet_dev.demo", "--rollout", "--offices", "2", "--soak-s", "1",
             "--state-dir", str(tmp_path / "demo")],
            stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            head = ""
            for line in proc.stdout:
                head += line
                if line.startswith("console "):
                    break
            login = re.search(r"^console (http://\S+)/rollouts  log in as user (\S+), password (\S+)", head, re.M)
            assert login, head
            url, name, password = login.groups()
            session = console_login(url, name, password)
            assert session is not None, "the printed console login was refused"
            assert signed_in(session)
            session.close()
            rest, _ = proc.communicate(timeout=STALL_S * 2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        stderr = errors.read()
    out = head + rest
    assert proc.returncode == 0, out[-3000:] + stderr[-3000:]
    assert "rollout demo-1-1-0: agent/" in out
    assert "1:canary running" in out and "2:pilots running" in out  # the waves' progress, printed
    assert "completed wave 2/2  1:canary done [committed 1]  |  2:pilots done [committed 1]" in out
    assert out.count("heartbeat reports agent 1.1.0") == 2
    accepted, stored = re.search(r"citizen events: (\d+) accepted by the terminals, (\d+) stored", out).groups()  # type: ignore[union-attr]
    assert int(accepted) > 0 and accepted == stored
