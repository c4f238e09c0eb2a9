"""Health from real heartbeats and Last Wills; alerts with flap suppression."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from fleet_dev.proc import wait_for
from fleet_server.db import migrate
from fleet_server.health import service as health_service
from fleet_server.health.rules import Hysteresis, State, is_open, judge
from fleet_server.health.service import HealthService, OfficeInfo

WEEKDAY_HOURS = {"mon-fri": "08:30-17:00", "sat": "09:00-12:00"}


def test_judge_states_from_heartbeat_age() -> None:
    assert judge(None, None, "", 30, 100).state == State.MISSING
    assert judge(90, "online", "", 30, 100).state == State.ONLINE
    assert judge(50, "online", "", 30, 100).state == State.STALE
    v = judge(0, "online", "", 30, 100)
    assert v.state == State.OFFLINE and "no heartbeat for 100 s" in v.reason
    v = judge(99, "offline", "connection_lost", 30, 100)
    assert v.state == State.OFFLINE and "Last Will" in v.reason


def test_opening_hours_in_office_time_zone() -> None:
    # 2026-11-23 is a Monday; 01:00 UTC is 09:00 in Beijing
    assert is_open(WEEKDAY_HOURS, "Asia/Shanghai", datetime(2026, 11, 23, 1, 0, tzinfo=UTC))
    assert not is_open(WEEKDAY_HOURS, "Asia/Shanghai", datetime(2026, 11, 23, 12, 0, tzinfo=UTC))  # 20:00
    assert is_open(WEEKDAY_HOURS, "Asia/Shanghai", datetime(2026, 11, 28, 2, 0, tzinfo=UTC))  # Sat 10:00
    assert not is_open(WEEKDAY_HOURS, "Asia/Shanghai", datetime(2026, 11, 29, 2, 0, tzinfo=UTC))  # Sunday


def test_hysteresis_needs_a_sustained_condition() -> None:
    h = Hysteresis(for_s=10, clear_s=5)
    assert [h.update(True, t) for t in (0, 5, 9)] == [None, None, None]
    assert h.update(True, 10) == "fire"
    assert h.update(False, 11) is None and h.update(True, 12) is None  # a blip does not resolve
    assert h.update(False, 13) is None and h.update(False, 18) == "resolve"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _service(tmp_path: Path, clock: Clock, terminals: dict[str, str], **kw: Any) -> HealthService:
    db = tmp_path / "h.db"
    migrate(db, health_service.migrations)
    return HealthService(
        str(db),
        lambda: terminals,
        lambda: [OfficeInfo("haidian", {"mon-sun": "00:00-23:59"}, "Asia/Shanghai")],
        CollectorRegistry(),
        clock=clock,
        **kw,
    )


def _status(terminal: str, state: str, at: float, reason: str = "heartbeat", **doc: Any) -> tuple[str, ...]:
    iso = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    return (terminal, state, reason, iso, iso, json.dumps({"state": state, "hb_interval_s": 2, **doc}))


def test_flapping_terminal_raises_one_alert_not_one_per_flap(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    svc = _service(
        tmp_path, clock, {"t-1": "haidian", "t-2": "haidian", "t-3": "haidian"}, alert_for_s=20, alert_clear_s=20
    )
    svc.on_status([_status("t-2", "online", clock.now), _status("t-3", "online", clock.now)])
    for i in range(60):  # t-1 drops and comes back every 3 s for three minutes
        state = "offline" if (i // 1) % 2 else "online"
        svc.on_status(
            [
                _status("t-1", state, clock.now, "connection_lost" if state == "offline" else "heartbeat"),
                _status("t-2", "online", clock.now),
                _status("t-3", "online", clock.now),
            ]
        )
        svc.sweep()
        clock.now += 3
    raised = svc.metrics.alerts_raised.labels("terminal_offline")._value.get()
    transitions = svc.terminal("t-1")["transitions"]  # type: ignore[index]
    assert len(transitions) >= 50  # every flap is recorded as a transition …
    assert raised == 0  # … but none lasted long enough to page anybody
    # now it stays down: exactly one alert, resolved once it is back for long enough
    for _ in range(20):
        svc.on_status(
            [
                _status("t-1", "offline", clock.now, "connection_lost"),
                _status("t-2", "online", clock.now),
                _status("t-3", "online", clock.now),
            ]
        )
        svc.sweep()
        clock.now += 3
    assert svc.metrics.alerts_raised.labels("terminal_offline")._value.get() == 1
    [alert] = svc.alerts(active_only=True)
    assert alert["kind"] == "terminal_offline" and "Last Will" in alert["message"]
    for _ in range(12):
        svc.on_status([_status(t, "online", clock.now) for t in ("t-1", "t-2", "t-3")])
        svc.sweep()
        clock.now += 2
    assert svc.alerts(active_only=True) == []
    assert svc.alerts(active_only=False)[0]["resolved_at"] is not None
    svc.close()


def test_disk_backlog_peripheral_and_office_alerts(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    svc = _service(tmp_path, clock, {"t-1": "haidian", "t-2": "haidian"}, alert_for_s=0, alert_clear_s=0)
    svc.on_status(
        [
            _status(
                "t-1",
                "online",
                clock.now,
                disk_pct=95.0,
                outbox={"depth": 9, "oldest_age_s": 7200},
                peripherals={"receipt_printer": "fault", "camera": "ok"},
            ),
            _status("t-2", "offline", clock.now, "connection_lost"),
        ]
    )
    svc.sweep()
    svc.sweep()
    kinds = sorted(a["kind"] for a in svc.alerts())
    assert kinds == ["disk_nearly_full", "outbox_backlog_old", "peripheral_failed", "terminal_offline"]
    assert svc.metrics.peripherals.labels("haidian", "receipt_printer")._value.get() == 1
    assert svc.metrics.terminals.labels("haidian", "offline")._value.get() == 1
    svc.on_status([_status("t-1", "offline", clock.now, "shutdown")])
    svc.sweep()
    assert "office_offline" in {a["kind"] for a in svc.alerts()}
    svc.close()


def test_a_terminals_state_and_its_recorded_transitions_agree_while_a_sweep_commits(tmp_path: Path) -> None:
    """The state a sweep sets is only read together with its recorded transition: a reader while
    the sweep's commit waits on the database (another writer holds it here) waits for it too,
    rather than getting "offline" with a transition list that does not have it yet."""
    import sqlite3
    import threading

    clock = Clock(1_800_000_000.0)
    svc = _service(tmp_path, clock, {"t-1": "haidian"})
    svc.on_status([_status("t-1", "online", clock.now)])
    svc.sweep()
    assert [t["to"] for t in svc.terminal("t-1")["transitions"]] == ["online"]  # type: ignore[index]
    clock.now += 60  # silent for 30 intervals of 2 s: offline at the next sweep

    other = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database: the sweep's commit waits
    sweeper = threading.Thread(target=svc.sweep, name="test-sweep")
    docs: list[dict[str, Any] | None] = []
    reader = threading.Thread(target=lambda: docs.append(svc.terminal("t-1")), name="test-reader")
    try:
        sweeper.start()
        wait_for(lambda: svc.terminals()[0]["state"] == "offline", 10, what="the sweep's new state")
        reader.start()
        reader.join(1.0)  # without the sweep's lock it has read already, the commit still waiting
    finally:
        other.execute("ROLLBACK")
        other.close()
    sweeper.join(15)
    reader.join(15)
    [doc] = docs
    assert doc is not None and doc["state"] == "offline"
    assert [t["to"] for t in doc["transitions"]] == ["offline", "online"], doc["transitions"]
    svc.close()


def test_health_transitions_from_real_heartbeats_and_last_will(make_stack: Any) -> None:
    st = make_stack(2, server_options={"health_sweep_s": 0.3})
    assert st.server is not None
    health = st.server.health
    assert {h["state"] for h in health.terminals()} == {"missing"}
    proc = st.agent_process("t-000", heartbeat_interval_s=1.0)
    try:
        wait_for(lambda: health.terminal("t-000")["state"] == "online", 20, what="t-000 online")  # type: ignore[index]
        # frozen agent: the TCP session stays up, but heartbeats stop → stale, then offline
        os.killpg(proc.pid, signal.SIGSTOP)
        wait_for(lambda: health.terminal("t-000")["state"] == "stale", 20, what="t-000 stale")  # type: ignore[index]
        wait_for(lambda: health.terminal("t-000")["state"] == "offline", 20, what="t-000 offline")  # type: ignore[index]
        assert "no heartbeat" in health.terminal("t-000")["reason"]  # type: ignore[index]
        os.killpg(proc.pid, signal.SIGCONT)
        wait_for(lambda: health.terminal("t-000")["state"] == "online", 20, what="t-000 back online")  # type: ignore[index]
        # killed: the broker publishes its Last Will
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: health.terminal("t-000")["state"] == "offline", 20, what="Last Will")  # type: ignore[index]
        doc = health.terminal("t-000")
        assert doc is not None and "Last Will" in doc["reason"]
        states = [t["to"] for t in reversed(doc["transitions"])]
        assert states == ["online", "stale", "offline", "online", "offline"]
        assert health.terminal("t-001")["state"] == "missing"  # type: ignore[index]
        assert (
            st.server.metrics_registry.get_sample_value("fleet_terminals", {"office": "dongcheng", "state": "offline"})
            == 1
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_device_profile_sets_the_limits_a_terminal_is_judged_by(tmp_path: Path) -> None:
    from fleet_server.health.service import HealthLimits

    clock = Clock(1_800_000_000.0)
    db = tmp_path / "h.db"
    migrate(db, health_service.migrations)
    limits = {
        "t-kiosk": HealthLimits(
            stale_after=3, offline_after=10, disk_fail_pct=92, peripherals=frozenset({"camera", "receipt_printer"})
        )
    }
    svc = HealthService(
        str(db),
        lambda: {"t-kiosk": "haidian", "t-plain": "haidian"},
        lambda: [OfficeInfo("haidian", {"mon-sun": "00:00-23:59"}, "Asia/Shanghai")],
        CollectorRegistry(),
        clock=clock,
        alert_for_s=0,
        alert_clear_s=0,
        limits=lambda: limits,
    )
    periph = {"camera": "ok", "receipt_printer": "fault", "coffee_machine": "fault"}
    svc.on_status([_status(t, "online", clock.now, disk_pct=91.0, peripherals=periph) for t in ("t-kiosk", "t-plain")])
    clock.now += 7  # 3.5 intervals of 2 s: past the default offline limit (3), not the profile's (10)
    svc.sweep()
    states = {h["terminal"]: h["state"] for h in svc.terminals()}
    assert states == {"t-kiosk": "stale", "t-plain": "offline"}
    svc.sweep()
    alerts = {(a["kind"], a["subject"]) for a in svc.alerts()}
    # disk at 91%: over the default 90 %, under the model's 92 %
    assert ("disk_nearly_full", "t-plain") in alerts and ("disk_nearly_full", "t-kiosk") not in alerts
    # a peripheral the model does not have is not paged about
    assert ("peripheral_failed", "t-kiosk:receipt_printer") in alerts
    assert ("peripheral_failed", "t-kiosk:coffee_machine") not in alerts
    assert ("peripheral_failed", "t-plain:coffee_machine") in alerts
    svc.close()


def test_claimed_heartbeat_interval_is_capped_by_the_device_profile(tmp_path: Path) -> None:
    from fleet_server.health.service import HealthLimits

    clock = Clock(1_800_000_000.0)
    db = tmp_path / "h.db"
    migrate(db, health_service.migrations)
    svc = HealthService(
        str(db),
        lambda: {"t-liar": "haidian", "t-none": "haidian"},
        lambda: [OfficeInfo("haidian", {"mon-sun": "00:00-23:59"}, "Asia/Shanghai")],
        CollectorRegistry(),
        clock=clock,
        limits=lambda: {"t-liar": HealthLimits(stale_after=3, offline_after=10, max_hb_interval_s=30)},
    )
    # both claim a heartbeat every 1e12 s, then fall silent
    svc.on_status([_status(t, "online", clock.now, hb_interval_s=1e12) for t in ("t-liar", "t-none")])
    svc.sweep()
    assert {h["state"] for h in svc.terminals()} == {"online"}
    clock.now += 10 * 30 + 1  # ten of the profile's 30 s heartbeats
    svc.sweep()
    liar = svc.terminal("t-liar")
    assert liar is not None and liar["state"] == "offline" and liar["heartbeat_interval_s"] == 30
    assert "expected every 30 s" in liar["reason"]
    clock.now += 3 * 600  # no profile: capped by the schema's maximum (600 s), three of those
    svc.sweep()
    assert svc.terminal("t-none")["state"] == "offline"  # type: ignore[index]
    svc.close()


def test_a_managers_alert_list_is_filtered_before_the_limit(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    offices = {"t-mine": "haidian", **{f"t-{i:03d}": "chaoyang" for i in range(30)}}
    svc = _service(tmp_path, clock, offices, alert_for_s=0, alert_clear_s=0)
    # the manager's terminal goes first, so its alert is the oldest one
    svc.on_status([_status("t-mine", "online", clock.now, disk_pct=99.0)])
    svc.sweep()
    svc.sweep()
    clock.now += 1
    svc.on_status([_status(t, "online", clock.now, disk_pct=99.0) for t in offices if t != "t-mine"])
    svc.sweep()
    svc.sweep()
    everyone = svc.alerts(limit=10)
    assert len(everyone) == 10 and {a["office"] for a in everyone} == {"chaoyang"}
    mine = svc.alerts(offices=["haidian"], limit=10)
    assert [(a["subject"], a["office"]) for a in mine] == [("t-mine", "haidian")]
    assert svc.alerts(offices=[], limit=10) == []
    assert len(svc.alerts(offices=["chaoyang"], limit=5)) == 5
    svc.close()


def _periph(state: str, check: str | None, reading: dict[str, float], limit: float | None, **kw: Any) -> dict[str, Any]:
    return {"state": state, "check": check, "reading": reading, "limit": limit, "since": "2027-01-04T09:00:00Z", **kw}


def test_peripheral_alerts_name_the_reading_and_the_threshold(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000.0)
    svc = _service(tmp_path, clock, {"t-1": "haidian"}, alert_for_s=0, alert_clear_s=0)
    doc = {
        "receipt_printer": _periph("fail", "paper_left_pct", {"paper_left_pct": 2, "head_temp_c": 40}, 3),
        "id_reader": _periph("warn", "read_ms", {"read_ms": 1800}, 1500),
        "camera": _periph("fail", "fault", {}, None, error="camera source '/dev/video7' cannot be opened"),
        "qr_scanner": _periph("stale", None, {"decode_ms": 120}, None),
        "screen": _periph("ok", None, {"usb_resets_per_day": 0}, None),
        "a4_printer": _periph("unknown", None, {}, None, error="no reading yet"),
    }
    host = _periph("warn", "cpu_temp_c", {"cpu_temp_c": 80, "disk_used_ratio": 0.4}, 75)
    svc.on_status([_status("t-1", "online", clock.now, peripherals=doc, host=host)])
    svc.sweep()
    svc.sweep()
    alerts = {(a["kind"], a["subject"]): a["message"] for a in svc.alerts()}
    assert set(alerts) == {
        ("peripheral_failed", "t-1:receipt_printer"),
        ("peripheral_failed", "t-1:camera"),
        ("peripheral_warn", "t-1:id_reader"),
        ("peripheral_warn", "t-1:qr_scanner"),
        ("peripheral_warn", "t-1:host"),
    }
    assert "paper_left_pct is 2 (fail threshold 3)" in alerts[("peripheral_failed", "t-1:receipt_printer")]
    assert "read_ms is 1800 (warn threshold 1500)" in alerts[("peripheral_warn", "t-1:id_reader")]
    assert "'/dev/video7' cannot be opened" in alerts[("peripheral_failed", "t-1:camera")]
    assert "no fresh reading" in alerts[("peripheral_warn", "t-1:qr_scanner")]
    assert "cpu_temp_c is 80 (warn threshold 75)" in alerts[("peripheral_warn", "t-1:host")]
    shown = svc.terminal("t-1")
    assert shown is not None
    assert shown["peripherals"]["receipt_printer"]["reading"] == {"paper_left_pct": 2, "head_temp_c": 40}
    assert shown["host"]["check"] == "cpu_temp_c"
    assert svc.metrics.peripherals.labels("haidian", "receipt_printer")._value.get() == 1
    assert svc.metrics.peripherals.labels("haidian", "id_reader")._value.get() == 0
    # paper changed: the failure resolves, and a warn that turns into a fail is a new alert
    doc["receipt_printer"] = _periph("ok", None, {"paper_left_pct": 100}, None)
    doc["id_reader"] = _periph("fail", "read_ms", {"read_ms": 4200}, 4000)
    svc.on_status([_status("t-1", "online", clock.now, peripherals=doc, host=host)])
    svc.sweep()
    svc.sweep()
    active = {(a["kind"], a["subject"]) for a in svc.alerts()}
    assert ("peripheral_failed", "t-1:receipt_printer") not in active
    assert ("peripheral_failed", "t-1:id_reader") in active and ("peripheral_warn", "t-1:id_reader") not in active
    svc.close()
