"""Agent releases end to end, real processes throughout: Mosquitto, the fleet server process with
its TUF repository, the agent under its launcher from release venvs built from real wheels.

A good release commits (heartbeat of the new version, reports in order, citizen events posted
around the switch stored exactly once); one that fails its gate and one that crash-loops roll
themselves back and are refused afterwards; a bad target, bad metadata, a counter downgrade and a
wrong profile are rejected with nothing installed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleet_dev.proc import wait_for
from tests.update_util import UPDATE_TIMEOUT_S, Rig, post_event, rig_fixture

pytestmark = pytest.mark.timeout(900)

TERMINALS = {"t-good": "generic", "t-gate": "generic", "t-crash": "generic", "t-rej": "generic", "t-key": "generic"}


rig = rig_fixture("update-agent", TERMINALS)


def _final(rig: Rig, tid: str, cmd: Any) -> str:
    final = {"committed", "rolled_back", "rejected", "failed"}
    wait_for(
        lambda: bool(final & set(rig.states(tid, cmd))), UPDATE_TIMEOUT_S, 0.2, what=f"{tid}: a final update state"
    )
    return [s for s in rig.states(tid, cmd) if s in final][-1]


def _reports_are_numbered(reports: list[dict[str, Any]]) -> None:
    assert [r["report"] for r in reports] == list(range(1, len(reports) + 1)), reports


def test_good_release_commits_and_citizen_events_around_the_switch_are_stored_once(rig: Rig) -> None:
    t = rig.terminal("t-good")
    first = t.current()
    t.start()
    rig.wait_version("t-good", "1.0.0")
    posted = 0
    for i in range(5):
        post_event(t, "service.completed", _completed(f"before-{i}"), key=f"good-before-{i}")
        posted += 1
    older = rig.publish_agent("1.0.9")  # a lower counter, for the downgrade check at the end
    pub = rig.publish_agent("1.1.0")
    assert older.counter < pub.counter

    stop = threading.Event()
    during: list[int] = []

    def keep_posting() -> None:
        n = 0
        while not stop.is_set():
            post_event(t, "service.completed", _completed(f"during-{n}"), key=f"good-during-{n}")
            during.append(n)
            n += 1
            stop.wait(0.05)

    poster = threading.Thread(target=keep_posting, name="test-poster")
    poster.start()
    try:
        cmd = rig.desire("t-good", pub, version="1.1.0", gate_s=3.0)
        assert _final(rig, "t-good", cmd) == "committed", t.log()[-4000:]
    finally:
        stop.set()
        poster.join(60)
    posted += len(during)
    for i in range(5):
        post_event(t, "service.completed", _completed(f"after-{i}"), key=f"good-after-{i}")
        posted += 1
    rig.wait_version("t-good", "1.1.0")

    reports = rig.reports("t-good", cmd)
    _reports_are_numbered(reports)
    assert [r["state"] for r in reports] == [
        "notified",
        "downloading",
        "downloaded",
        "installing",
        "on_trial",
        "committed",
    ]
    assert [r["running"] for r in reports][-2:] == ["1.1.0", "1.1.0"]
    assert reports[0]["running"] == "1.0.0"
    assert all(r["metadata_expires"] for r in reports[1:])

    wait_for(lambda: rig.count("t-good", "service.completed") >= posted, 60, what="citizen events stored")
    assert rig.count("t-good", "service.completed") == posted  # each exactly once
    assert len(during) > 0
    new = t.current()
    assert new is not None and new.startswith("1.1.0-") and new != first
    assert set(t.releases()) == {first, new}  # the previous release stays for one more update
    assert t.launcher_state()["trial"] is None
    assert t.update_state()["committed"]["agent"]["version"] == "1.1.0"
    # the same command again (the server re-sends until it hears): nothing new happens
    rig.send("t-good", cmd)
    # the same release under a new command: committed at once, nothing installed
    again = rig.desire("t-good", pub, version="1.1.0")
    rig.wait_state("t-good", again, "committed")
    assert rig.states("t-good", again) == ["notified", "committed"]
    assert set(t.releases()) == {first, new}
    # a release below the committed counter: refused, nothing installed
    down = rig.desire("t-good", older, version="1.0.9")
    rig.wait_state("t-good", down, "rejected")
    assert rig.reports("t-good", down)[-1]["reason"] == "counter_downgrade"
    assert set(t.releases()) == {first, new} and t.current() == new


def test_release_that_fails_its_gate_rolls_back_and_is_refused_afterwards(rig: Rig) -> None:
    t = rig.terminal("t-gate")
    first = t.current()
    t.start()
    rig.wait_version("t-gate", "1.0.0")
    pub = rig.publish_agent("1.2.0", defect="gate_fails")
    cmd = rig.desire("t-gate", pub, version="1.2.0", gate_s=3.0)
    assert _final(rig, "t-gate", cmd) == "rolled_back", t.log()[-4000:]
    reports = rig.reports("t-gate", cmd)
    _reports_are_numbered(reports)
    assert [r["state"] for r in reports][-2:] == ["on_trial", "rolled_back"]
    assert reports[-1]["reason"] == "gate_failed"
    assert "pump" in reports[-1]["detail"]
    rig.wait_version("t-gate", "1.0.0")
    assert t.current() == first
    assert t.launcher_state()["trial"] is None
    failed = t.launcher_state()["failed"]
    assert len(failed) == 1 and failed[0].startswith("1.2.0-")
    wait_for(lambda: t.releases() == [first], 30, what="the failed release's directory removed")
    again = rig.desire("t-gate", pub, version="1.2.0")
    rig.wait_state("t-gate", again, "rejected")
    assert rig.reports("t-gate", again)[-1]["reason"] == "refused_before"
    assert t.current() == first


def test_release_that_crash_loops_is_rolled_back_by_the_launcher_and_refused_afterwards(rig: Rig) -> None:
    t = rig.terminal("t-crash")
    first = t.current()
    t.start()
    rig.wait_version("t-crash", "1.0.0")
    pub = rig.publish_agent("1.3.0", defect="crash_at_start")
    cmd = rig.desire("t-crash", pub, version="1.3.0", gate_s=3.0)
    assert _final(rig, "t-crash", cmd) == "rolled_back", t.log()[-4000:]
    reports = rig.reports("t-crash", cmd)
    _reports_are_numbered(reports)
    assert reports[-1]["reason"] == "crash_loop"
    assert reports[-1]["running"] == "1.0.0"  # reported by the old version, after the rollback
    assert "on_trial" not in [r["state"] for r in reports]  # the broken one never got that far
    assert t.log().count("launcher: starting 1.3.0-") == 3  # the trial start and two restarts
    rig.wait_version("t-crash", "1.0.0")
    assert t.current() == first
    assert t.launcher_state()["failed"][0].startswith("1.3.0-")
    wait_for(lambda: t.releases() == [first], 30, what="the failed release's directory removed")
    again = rig.desire("t-crash", pub, version="1.3.0")
    rig.wait_state("t-crash", again, "rejected")
    assert rig.reports("t-crash", again)[-1]["reason"] == "refused_before"


def test_untrusted_or_unfit_releases_are_rejected_with_nothing_installed(rig: Rig, tmp_path: Path) -> None:
    t = rig.terminal("t-rej")
    first = t.current()
    t.start()
    rig.wait_version("t-rej", "1.0.0")

    def rejected(pub: Any, version: str, reason: str, tid: str = "t-rej", term: Any = t) -> None:
        cmd = rig.desire(tid, pub, version=version)
        assert _final(rig, tid, cmd) == "rejected", term.log()[-3000:]
        last = rig.reports(tid, cmd)[-1]
        assert last["reason"] == reason, last
        assert term.releases() == [term_first[tid]] and term.current() == term_first[tid]

    term_first = {"t-rej": first}
    wall = rig.publish_agent("1.4.0", profiles=["wall-21"])
    rejected(wall, "1.4.0", "incompatible_profile")

    tampered = rig.publish_agent("1.5.0")
    # published before the tampering: it carries the rollback twin of 1.5.0, checked at upload
    fine = rig.publish_agent("1.6.0")
    rig.tamper(rig.agent_dist("1.5.0"))
    rejected(tampered, "1.5.0", "tampered")

    rig.expire_timestamp()
    try:
        rejected(fine, "1.6.0", "expired")
    finally:
        rig.fresh_timestamp()

    # a terminal that trusts other root keys than the repository's
    from fleet_dev import releases

    other = releases.make_keystore(tmp_path / "other-keystore")
    k = rig.terminal("t-key", update_root_file=str(other.folder / "metadata" / "1.root.json"))
    term_first["t-key"] = k.current()
    k.start()
    rig.wait_version("t-key", "1.0.0")
    rejected(fine, "1.6.0", "bad_signature", "t-key", k)
    # the command's own claims count for nothing: the target says kind, version, counter
    assert rig.reports("t-rej")[-1]["running"] == "1.0.0"


def _completed(session: str) -> dict[str, Any]:
    return {"session": session, "service_code": "TQ02", "duration_s": 100.0, "face_login": False}
