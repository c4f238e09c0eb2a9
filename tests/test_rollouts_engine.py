"""The rollout engine on its own, tick by tick: a real SQLite file migrated by the server, the
real event store carrying the reports, and a clock the test moves by hand (time-outs and back-off
are about time; the test is not). The publisher records commands instead of sending them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from fleet_server.auth.models import Role, User
from fleet_server.config import SEED_DIR
from fleet_server.db import connect, migrate
from fleet_server.ingest.store import IngestStore
from fleet_server.registry.service import read_offices_file
from fleet_server.rollouts import store as rollout_store
from fleet_server.rollouts.engine import EngineSettings, TerminalCondition
from fleet_server.rollouts.planner import OfficeRef, TerminalInfo
from fleet_server.rollouts.releases import Release, ReleaseCatalog
from fleet_server.rollouts.schemas import RolloutPlan
from fleet_server.rollouts.service import RolloutService
from fleet_wire import topics
from fleet_wire.envelope import format_ts
from fleet_wire.release import DesiredRelease, decode_desired

ADMIN = User("admin", Role.ADMIN)
RELEASE = Release("agent/5/kiosk_fleet_agent-2.0.0-py3-none-any.whl", "agent", "2.0.0", 5, ("generic",))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """One engine over a real database file, with terminals, health and a recording publisher."""

    def __init__(self, tmp: Path, terminals: dict[str, str], **settings: Any) -> None:
        self.db = tmp / "fleet.db"
        migrate(self.db, rollout_store.migrations)
        self.clock = Clock()
        self.offices = {
            o.id: OfficeRef(o.id, o.name, o.pilot, o.timezone, o.maintenance)
            for o in read_offices_file(SEED_DIR / "offices.yaml")
        }
        self.terminals = [TerminalInfo(t, o, "generic") for t, o in terminals.items()]
        self.health: dict[str, TerminalCondition] = {t: TerminalCondition(True, online_since=0.0) for t in terminals}
        self.sent: list[tuple[str, DesiredRelease]] = []
        catalog = ReleaseCatalog()
        catalog.add(RELEASE)
        self.svc = RolloutService(
            str(self.db),
            releases=lambda: catalog,
            terminals=lambda: self.terminals,
            offices=lambda: self.offices,
            health=lambda: self.health,
            publish=lambda topic, payload: self.sent.append((topics.parse(topic).terminal_id, decode_desired(payload))),
            audit=lambda *a: None,
            registry=CollectorRegistry(),
            settings=EngineSettings(**settings),
            clock=self.clock,
        )
        self.conn = connect(self.db)
        self.events = IngestStore(self.conn)
        self.seq: dict[str, int] = {}

    def report(self, tid: str, cmd: DesiredRelease, state: str, report: int, reason: str = "ok", **extra: Any) -> None:
        seq = self.seq[tid] = self.seq.get(tid, 0) + 1
        body = {
            "rollout": cmd.rollout,
            "cmd": cmd.id,
            "kind": cmd.kind,
            "target": cmd.target,
            "version": cmd.version,
            "counter": cmd.counter,
            "state": state,
            "report": report,
            "reason": reason,
            **extra,
        }
        ts = "2027-01-15T08:00:00.000Z"
        self.events.write(
            [(tid, "e1", seq, uuid.uuid4().hex, "update.status", ts, ts, "dongcheng", json.dumps(body))], (), (), ()
        )

    def sends_to(self, tid: str) -> list[DesiredRelease]:
        return [c for t, c in self.sent if t == tid]

    def state(self, rid: str, tid: str) -> dict[str, Any]:
        return next(t for t in self.svc.terminals(rid) if t["terminal"] == tid)

    def close(self) -> None:
        self.conn.close()
        self.svc.close()


def _plan(**kw: Any) -> RolloutPlan:
    return RolloutPlan.model_validate({"release": RELEASE.path, "window": "now", "waves": [{}], **kw})


def test_resend_backs_off_and_goes_at_once_when_the_terminal_comes_back(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng"}, resend_initial_s=60, resend_max_s=600)
    rig.health["t-e-1"] = TerminalCondition(False, "offline", None, state="offline")
    rig.svc.create(_plan(id="backoff"), ADMIN)
    rig.svc.tick()
    assert len(rig.sends_to("t-e-1")) == 1
    rig.clock.now += 30
    rig.svc.tick()
    assert len(rig.sends_to("t-e-1")) == 1  # within the back-off
    rig.clock.now += 31
    rig.svc.tick()
    assert len(rig.sends_to("t-e-1")) == 2  # 60 s after the first
    rig.clock.now += 100
    rig.svc.tick()
    assert len(rig.sends_to("t-e-1")) == 2  # now 120 s apart
    rig.clock.now += 5
    rig.health["t-e-1"] = TerminalCondition(True, online_since=rig.clock.now - 1)
    rig.svc.tick()
    sends = rig.sends_to("t-e-1")
    assert len(sends) == 3 and len({c.id for c in sends}) == 1  # the same command, re-sent at once
    rig.report("t-e-1", sends[0], "notified", 1)
    rig.clock.now += 10_000
    rig.svc.tick()
    assert len(rig.sends_to("t-e-1")) == 3  # reported: no more re-sends
    rig.close()


def test_duplicates_reordering_and_an_old_commands_reports_change_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng"}, retry_initial_s=1, retry_max_s=1)
    rig.svc.create(_plan(id="order"), ADMIN)
    rig.svc.tick()
    first = rig.sends_to("t-e-1")[0]
    rig.report("t-e-1", first, "downloading", 2)  # report 1 is late: it comes in the next tick
    rig.svc.tick()
    for state, n in [("notified", 1), ("downloading", 2), ("failed", 3)]:
        rig.report("t-e-1", first, state, n, "download_failed" if state == "failed" else "ok")
    rig.svc.tick()
    t = rig.state("order", "t-e-1")
    assert t["state"] == "failed" and t["reason"] == "download_failed" and t["retry_at"]
    assert [h["to_state"] for h in t["history"]] == ["downloading", "failed"]  # 1 came after 2: ignored
    rig.clock.now += 2
    rig.svc.tick()  # the automatic retry: a new command
    rig.svc.tick()
    second = rig.sends_to("t-e-1")[-1]
    assert second.id != first.id and rig.state("order", "t-e-1")["state"] == "pending"
    rig.report("t-e-1", first, "committed", 9)  # the old command's: not this attempt's
    rig.svc.tick()
    assert rig.state("order", "t-e-1")["state"] == "pending"
    for n, state in enumerate(["notified", "installing", "on_trial", "committed"], start=1):
        rig.report("t-e-1", second, state, n)
    rig.report("t-e-1", second, "on_trial", 3)  # a duplicate after the commit
    rig.svc.tick()
    assert rig.state("order", "t-e-1")["state"] == "committed"
    assert rig.svc.get("order")["state"] == "completed"
    rig.close()


def test_unanswered_command_times_out_retries_then_halts_with_the_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "haidian", "t-e-2": "dongcheng"}, retry_initial_s=5, retry_max_s=5)
    rig.svc.create(_plan(id="quiet", timeouts={"pending": 100}, max_retries=1), ADMIN)
    rig.svc.tick()
    for c in rig.sends_to("t-e-2"):
        for n, state in enumerate(["notified", "on_trial", "committed"], start=1):
            rig.report("t-e-2", c, state, n)
    rig.clock.now += 101
    rig.svc.tick()
    t = rig.state("quiet", "t-e-1")
    assert t["state"] == "timed_out" and "no report after the command was sent" in t["detail"]
    assert rig.svc.get("quiet")["state"] == "running"  # a retry is due, not a failure yet
    rig.clock.now += 6
    rig.svc.tick()
    assert len({c.id for c in rig.sends_to("t-e-1")}) == 2
    rig.clock.now += 101
    rig.svc.tick()
    doc = rig.svc.get("quiet")
    assert doc["state"] == "halted"
    assert doc["reason"].startswith("wave 1: 1 of 2 terminals failed, limit 0 — 1 in 海淀管理部:")
    assert "(timed_out: no report after the command was sent for more than 100 s)" in doc["reason"]
    assert rig.svc.metrics.halted._value.get() == 1
    rig.close()


def test_a_terminal_enrolled_later_reopens_a_completed_rollout(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng"})
    rig.svc.create(_plan(id="late", targets={"offices": ["dongcheng"]}), ADMIN)
    rig.svc.tick()
    for n, state in enumerate(["notified", "committed"], start=1):
        rig.report("t-e-1", rig.sends_to("t-e-1")[0], state, n)
    rig.svc.tick()
    assert rig.svc.get("late")["state"] == "completed"
    rig.terminals.append(TerminalInfo("t-e-9", "dongcheng", "generic"))
    rig.terminals.append(TerminalInfo("t-e-8", "haidian", "generic"))  # not targeted
    rig.health["t-e-9"] = TerminalCondition(True, online_since=0.0)
    rig.svc.registry_changed()
    rig.svc.tick()
    assert rig.svc.get("late")["state"] == "running"
    rig.svc.tick()
    assert len(rig.sends_to("t-e-9")) == 1 and rig.sends_to("t-e-8") == []
    for n, state in enumerate(["notified", "committed"], start=1):
        rig.report("t-e-9", rig.sends_to("t-e-9")[0], state, n)
    rig.svc.tick()
    doc = rig.svc.get("late")
    assert doc["state"] == "completed" and doc["states"] == {"committed": 2}
    rig.close()


def test_office_window_in_the_command_and_stale_metadata_in_the_preview(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng", "t-e-2": "haidian"})
    rig.svc.create(
        RolloutPlan.model_validate(
            {"id": "windowed", "release": RELEASE.path, "waves": [{}], "deadline": "2027-02-01T00:00:00Z", "gate_s": 30}
        ),
        ADMIN,
    )
    rig.svc.tick()
    cmd = rig.sends_to("t-e-1")[0]
    assert cmd.window is not None and (cmd.window.tz, cmd.window.start, cmd.window.end) == (
        "Asia/Shanghai",
        "01:00",
        "05:00",
    )
    assert cmd.deadline == "2027-02-01T00:00:00.000Z" and cmd.gate_s == 30 and cmd.counter == RELEASE.counter
    # the terminal says its trusted metadata expires within the hour: the next preview flags it
    soon = datetime.fromtimestamp(rig.clock.now + 3600, UTC).isoformat().replace("+00:00", "Z")
    body_extra = {"metadata_expires": soon}
    rig.report("t-e-1", cmd, "notified", 1, **body_extra)
    rig.svc.tick()
    pv = rig.svc.preview(_plan())
    flags = {t["terminal"]: t["flags"] for t in pv["waves"][0]["terminals"]}
    assert flags == {"t-e-1": ["stale_metadata"], "t-e-2": []}
    rig.close()


def test_a_revoked_terminal_ends_revoked_and_is_nobodys_failure(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng", "t-e-2": "haidian"})
    rig.svc.create(_plan(id="revoked"), ADMIN)
    rig.svc.tick()
    for n, state in enumerate(["notified", "committed"], start=1):
        rig.report("t-e-1", rig.sends_to("t-e-1")[0], state, n)
    rig.terminals[1] = TerminalInfo("t-e-2", "haidian", "generic", enabled=False)
    rig.svc.registry_changed()
    rig.svc.tick()
    t2 = rig.state("revoked", "t-e-2")
    assert (t2["state"], t2["reason"]) == ("failed", "revoked")
    doc = rig.svc.get("revoked")
    assert doc["state"] == "completed"  # within a failure limit of 0: a revoked terminal is no failure
    assert rig.svc.retry("revoked", ADMIN)["retried"] == []  # and is not retried
    rig.close()


def test_an_unreadable_report_row_is_skipped_and_the_loop_goes_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng"})
    rig.svc.create(_plan(id="garbled"), ADMIN)
    rig.svc.tick()
    ts = "2027-01-15T08:00:00.000Z"
    bad = [
        "{",
        '{"rollout": "garbled", "report": "x"}',
        '{"rollout": "garbled", "report": 1, "state": "exploded"}',
        "[]",
    ]
    rig.events.write(
        [("t-e-1", "e0", i, uuid.uuid4().hex, "update.status", ts, ts, "dongcheng", b) for i, b in enumerate(bad, 1)],
        (),
        (),
        (),
    )
    for n, state in enumerate(["notified", "committed"], start=1):
        rig.report("t-e-1", rig.sends_to("t-e-1")[0], state, n)
    rig.svc.tick()
    assert rig.svc.get("garbled")["state"] == "completed"
    rig.close()


def test_an_emptied_event_table_is_read_again_from_the_start(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng"})
    rig.svc.create(_plan(id="emptied"), ADMIN)
    rig.svc.tick()
    cmd = rig.sends_to("t-e-1")[0]
    for n in range(1, 4):
        rig.report("t-e-1", cmd, "downloading", n)
    rig.svc.tick()
    rig.conn.execute("DELETE FROM events")  # e.g. retention removed everything, rowids start over
    rig.report("t-e-1", cmd, "committed", 4)
    rig.svc.tick()
    assert rig.state("emptied", "t-e-1")["state"] == "committed"
    rig.close()


def test_nothing_is_sent_before_the_install_period_and_its_end_is_the_deadline(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"t-e-1": "dongcheng", "t-e-2": "haidian"})
    start = datetime.fromtimestamp(rig.clock.now + 3 * 3600, UTC)
    end = datetime.fromtimestamp(rig.clock.now + 2 * 86400, UTC)
    plan = RolloutPlan.model_validate(
        {
            "id": "period",
            "release": RELEASE.path,
            "waves": [{"size": {"count": 1}}, {}],
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "deadline": "2099-01-01T00:00:00Z",  # later than the period's end: the end applies
        }
    )
    rig.svc.create(plan, ADMIN)
    # hours before the start: ticks send nothing, time nothing out, and the wave says why it waits
    for _ in range(3):
        rig.svc.tick()
        rig.clock.now += 3600 - 1
    assert rig.sent == []
    doc = rig.svc.get("period")
    assert doc["state"] == "running" and datetime.fromisoformat(doc["window_start"]) == start
    assert "install period starts" in doc["waves"][0]["note"] and "nothing is sent before" in doc["waves"][0]["note"]
    assert {t["state"] for t in rig.svc.terminals("period")} == {"pending"}
    # the start passes: the first wave's terminal gets its command, with the period's end as the deadline
    rig.clock.now += 10
    rig.svc.tick()
    assert len(rig.sent) == 1
    _, cmd = rig.sent[0]
    assert cmd.deadline == format_ts(end) and cmd.window is not None  # still the office's maintenance window
    # the earlier of the two applies: a deadline before the period's end is sent as it is
    (tmp_path / "second").mkdir()
    rig2 = Rig(tmp_path / "second", {"t-e-3": "dongcheng"})
    rig2.svc.create(
        _plan(id="early-deadline", window_end="2099-01-01T00:00:00Z", deadline="2098-06-01T00:00:00+08:00"), ADMIN
    )
    rig2.svc.tick()
    assert rig2.sends_to("t-e-3")[0].deadline == "2098-05-31T16:00:00.000Z"
    rig.close()
    rig2.close()
