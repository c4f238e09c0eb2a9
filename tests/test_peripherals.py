"""Peripheral health for real: the agent judges kiosk-app readings and its own probes by the
terminal's device profile, and the fleet server sees the state, the reading and the alert."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from edge_agent.health import HealthMonitor, load_agent_profile
from edge_agent.health.evaluate import PeripheralRecord, Reading, judge
from edge_agent.health.probes import CameraProbe, HostProbe, ProbeResult, cpu_temp_c
from fleet_dev.proc import wait_for
from fleet_dev.sim.kiosk import KioskClient, LocalApi, api_token, local_api_app
from fleet_server.registry.profiles import load_profiles
from fleet_wire.profile_checks import CheckState, Direction, Threshold
from fleet_wire.status import PeripheralStatus, decode_status

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "device_profiles"
WALL = PROFILES_DIR / "wall-21.yaml"
LOBBY = PROFILES_DIR / "lobby-floor-32.yaml"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _every_threshold() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        profile = load_agent_profile(path)
        for spec in (profile.host, *profile.peripherals):
            out.extend((path.stem, spec.id, check) for check in spec.checks)
    return out


def _ok_value(t: Threshold) -> float:
    step = max(1.0, abs(t.warn))
    return t.warn - step if t.direction is Direction.HIGHER_IS_WORSE else t.warn + step


# -- the profile is read, all of it -------------------------------------------------------------


def test_the_agent_reads_every_threshold_the_server_validates() -> None:
    """Nothing in device_profiles/ is decoration: the agent's model holds every check, same limits."""
    server_view = load_profiles(PROFILES_DIR)
    assert server_view
    for pid, full in server_view.items():
        mine = load_agent_profile(PROFILES_DIR / f"{pid}.yaml")
        assert mine.id == pid and mine.heartbeat_interval_s == full.heartbeat_interval_s
        assert {k: (t.warn, t.fail) for k, t in mine.host.checks.items()} == {
            k: (v["warn"], v["fail"]) for k, v in full.host.model_dump().items()
        }
        assert [p.id for p in mine.peripherals] == [p.id for p in full.peripherals]
        for p in full.peripherals:
            spec = mine.spec(p.id)
            assert spec is not None and spec.kind == p.kind and spec.required == p.required
            assert spec.probe_interval_s == p.probe_interval_s
            assert {k: (t.warn, t.fail) for k, t in spec.checks.items()} == {
                k: (v["warn"], v["fail"]) for k, v in p.checks.model_dump().items()
            }


@pytest.mark.parametrize(("profile_id", "peripheral", "check"), _every_threshold())
def test_every_threshold_of_every_shipped_profile_turns_a_reading_warn_and_fail(
    profile_id: str, peripheral: str, check: str
) -> None:
    profile = load_agent_profile(PROFILES_DIR / f"{profile_id}.yaml")
    spec = profile.spec(peripheral)
    assert spec is not None
    t = spec.checks[check]
    now = 1_800_000_000.0
    cases = [(_ok_value(t), CheckState.OK, None), (t.fail, CheckState.FAIL, t.fail)]
    if t.warn != t.fail:
        cases.append((t.warn, CheckState.WARN, t.warn))
    for value, state, limit in cases:
        j = judge(spec.checks, PeripheralRecord({check: Reading(value, now)}), now, 60.0, now)
        assert (j.state, j.limit) == (state, limit), (value, t)
        assert j.check == (check if state is not CheckState.OK else None)
        assert j.reading == {check: value}


# -- the kiosk app's readings through the local API -------------------------------------------


def _agent(tmp_path: Path, profile: Path | None = WALL, **settings: Any) -> Agent:
    return Agent(
        AgentSettings(
            environment="test",
            terminal_id="t-kiosk",
            data_dir=tmp_path / "agent",
            profile_file=profile,
            **settings,
        )
    )


def test_local_api_judges_a_reading_and_refuses_what_the_profile_cannot_judge(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    try:
        app = local_api_app(agent)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            r = client.post(
                "/v1/peripherals/readings",
                json={"peripheral": "receipt_printer", "readings": {"paper_left_pct": 2, "head_temp_c": 41}},
            )
            assert r.status_code == 200, r.text
            doc = r.json()
            assert (doc["state"], doc["check"], doc["limit"]) == ("fail", "paper_left_pct", 3)
            assert doc["reading"] == {"paper_left_pct": 2, "head_temp_c": 41}
            refused = {
                "unknown_peripheral": {"peripheral": "a4_printer", "readings": {"toner_pct": 50}},  # not on wall-21
                "unknown_check": {"peripheral": "receipt_printer", "readings": {"errors_per_hour": 0}},
            }
            for code, body in refused.items():
                r = client.post("/v1/peripherals/readings", json=body)
                assert (r.status_code, r.json()["error"]) == (422, code), r.text
            assert "paper_left_pct" in client.post("/v1/peripherals/readings", json=refused["unknown_check"]).text
            for value in (True, "8", None):
                r = client.post(
                    "/v1/peripherals/readings",
                    json={"peripheral": "receipt_printer", "readings": {"paper_left_pct": value}},
                )
                assert r.status_code == 422, value
            # the refused reports changed nothing
            assert (
                client.get("/v1/peripherals").json()["peripherals"]["receipt_printer"]["reading"]["paper_left_pct"] == 2
            )
            # a fault from the vendor SDK fails it outright; the next report without one clears it
            r = client.post(
                "/v1/peripherals/readings", json={"peripheral": "id_reader", "fault": "SAM module not found"}
            )
            assert (r.json()["state"], r.json()["error"]) == ("fail", "SAM module not found")
            r = client.post("/v1/peripherals/readings", json={"peripheral": "id_reader", "readings": {"read_ms": 900}})
            assert (r.json()["state"], r.json()["error"]) == ("ok", None)
            problems = client.get("/v1/health").json()["problems"]
            assert any(
                p.startswith("receipt_printer (required) failed: paper_left_pct is 2, at or below the fail limit 3")
                for p in problems
            ), problems
            listing = client.get("/v1/peripherals").json()
            assert listing["profile"]["peripherals"]["receipt_printer"] == {
                "kind": "receipt_printer",
                "required": True,
                "checks": ["paper_left_pct", "head_temp_c", "cutter_errors_per_day"],
            }
    finally:
        agent.stop(graceful=False)


def test_heartbeat_carries_each_peripheral_in_the_shape_the_wire_accepts(tmp_path: Path) -> None:
    agent = _agent(tmp_path, LOBBY)
    try:
        agent.health_monitor.report("a4_printer", {"toner_pct": 8, "jams_per_day": 0})
        agent.health_monitor.probe_now()
        summary = agent.status_summary()
        status = decode_status(json.dumps({"state": "online", **summary}).encode())
        assert status.profile == "lobby-floor-32"
        assert status.peripherals is not None and set(status.peripherals) == {
            "camera",
            "id_reader",
            "receipt_printer",
            "a4_printer",
            "qr_scanner",
            "assistance",
            "screen",
        }
        a4 = status.peripherals["a4_printer"]
        assert isinstance(a4, PeripheralStatus)
        assert (a4.state, a4.check, a4.reading, a4.limit) == (
            "warn",
            "toner_pct",
            {"toner_pct": 8, "jams_per_day": 0},
            10,
        )
        assert status.host is not None and "disk_used_ratio" in status.host.reading
        # the kiosk app has not reported these yet: unknown, not ok and not failed
        assert isinstance(status.peripherals["qr_scanner"], PeripheralStatus)
        assert status.peripherals["qr_scanner"].state == "unknown"
    finally:
        agent.stop(graceful=False)


def test_a_silent_kiosk_app_turns_its_peripherals_stale(tmp_path: Path) -> None:
    clock = Clock()
    profile = load_agent_profile(WALL)
    monitor = HealthMonitor(profile, {}, clock=clock)
    stale_s = monitor.stale_after_s(profile.spec("qr_scanner"))  # type: ignore[arg-type]
    assert stale_s == 3 * 60  # three of the profile's (default) reporting intervals
    assert monitor.state("qr_scanner")["state"] == "unknown"
    monitor.report("qr_scanner", {"decode_ms": 120, "no_response_s": 0})
    assert monitor.state("qr_scanner")["state"] == "ok"
    clock.now += stale_s + 1
    doc = monitor.state("qr_scanner")
    assert doc["state"] == "stale" and doc["reading"] == {"decode_ms": 120, "no_response_s": 0}
    assert any("qr_scanner (optional): no fresh reading for 181 s" in p for p in monitor.problems())
    # a peripheral the kiosk app never reported on is stale too, once the agent has listened long enough
    assert monitor.state("screen")["state"] == "stale"
    monitor.report("qr_scanner", {"decode_ms": 1200})
    assert monitor.state("qr_scanner")["state"] == "fail"


class FakeHungProbe:
    """A fake: a driver call that never returns (a real camera will not hang on demand)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self) -> ProbeResult:
        self.release.wait(30)
        return ProbeResult({"fps": 25.0, "frame_timeout_ms": 40.0, "reopen_per_hour": 0.0})


def test_a_hung_probe_is_reported_and_holds_up_nothing(tmp_path: Path) -> None:
    hung = FakeHungProbe()
    profile = load_agent_profile(WALL)
    monitor = HealthMonitor(profile, {"camera": hung, "host": HostProbe(tmp_path)}, probe_timeout_s=0.3)
    try:
        monitor.probe_now()  # returns after the timeout although the camera probe still hangs
        camera = monitor.state("camera")
        assert (camera["state"], camera["error"]) == ("fail", "probe did not answer within 0.3 s")
        assert monitor.host()["state"] == "ok"  # the other probe ran
        monitor.probe_now()  # a hung probe is not started a second time
        assert sum(t.name == "probe-camera" for t in threading.enumerate()) == 1
    finally:
        hung.release.set()
    wait_for(lambda: monitor.state("camera")["state"] == "ok", 10, what="the late answer to count")


# -- what the agent measures itself ------------------------------------------------------------


def test_camera_probe_reports_a_camera_that_cannot_be_opened(tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    missing = str(tmp_path / "dev" / "video7")
    probe = CameraProbe(missing)
    result = probe()
    assert result.fault == f"camera source {missing!r} cannot be opened"
    assert result.readings == {"reopen_per_hour": 1.0}
    assert probe().readings["reopen_per_hour"] == 2.0  # every failed attempt counts as one more reopen
    monitor = HealthMonitor(load_agent_profile(WALL), {"camera": CameraProbe(missing)})
    monitor.probe_now()
    doc = monitor.state("camera")
    assert (doc["state"], doc["check"]) == ("fail", "fault") and "cannot be opened" in doc["error"]
    assert any(p.startswith("camera (required) failed: camera source") for p in monitor.problems())
    # configured once: without a probe source of its own the agent probes the face camera
    agent = _agent(tmp_path, face={"camera_source": missing, "enabled": False})
    try:
        agent.health_monitor.probe_now()
        assert agent.health_monitor.state("camera")["error"] == f"camera source {missing!r} cannot be opened"
    finally:
        agent.stop(graceful=False)


def _images(directory: Path, n: int = 4) -> Path:
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    directory.mkdir(parents=True)
    for i in range(n):
        frame = np.full((240, 320, 3), 40 * i, dtype=np.uint8)
        assert cv2.imwrite(str(directory / f"frame{i}.png"), frame)
    return directory


def test_camera_probe_measures_a_real_source_directory_file_and_video(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    frames = _images(tmp_path / "frames")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (320, 240))
    for i in range(10):
        writer.write(np.full((240, 320, 3), 20 * i, dtype=np.uint8))
    writer.release()
    for source in (frames, frames / "frame0.png", video):
        result = CameraProbe(str(source))()
        assert result.fault is None, (source, result.fault)
        assert set(result.readings) == {"fps", "frame_timeout_ms", "reopen_per_hour"}, source
        assert result.readings["reopen_per_hour"] == 0 and result.readings["frame_timeout_ms"] >= 0
    monitor = HealthMonitor(load_agent_profile(WALL), {"camera": CameraProbe(str(frames))})
    monitor.probe_now()
    assert monitor.state("camera")["state"] == "ok"


def test_the_agent_runs_and_judges_its_host_without_opencv(tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["cv2"] = None  # as if opencv were not installed
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
agent = Agent(AgentSettings(environment="test", terminal_id="t-nocv", data_dir=sys.argv[1],
                            profile_file={str(WALL)!r}, camera_probe_source="0"))
agent.health_monitor.probe_now()
print("camera", agent.health_monitor.state("camera"))
print("host", agent.health_monitor.host()["state"])
agent.outbox.close()
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "'state': 'unknown'" in proc.stdout and "without OpenCV" in proc.stdout
    assert "host ok" in proc.stdout


def test_cpu_temperature_is_read_where_the_host_exposes_it(tmp_path: Path) -> None:
    # A fake sysfs tree: a hot cabinet cannot be made on demand. Zone 1 reports a sentinel.
    fake_sys = tmp_path / "thermal"
    for zone, milli in (("thermal_zone0", "91500"), ("thermal_zone1", "-274000"), ("cooling_device0", "1")):
        (fake_sys / zone).mkdir(parents=True)
        (fake_sys / zone / "temp").write_text(milli + "\n", encoding="ascii")
    assert cpu_temp_c(fake_sys) == 91.5
    assert cpu_temp_c(tmp_path / "nothing") is None
    lobby = load_agent_profile(LOBBY)
    monitor = HealthMonitor(lobby, {"host": HostProbe(tmp_path, thermal_root=fake_sys)})
    monitor.probe_now()
    host = monitor.host()
    assert (host["state"], host["check"], host["limit"]) == ("fail", "cpu_temp_c", 88)
    assert 0 < host["reading"]["disk_used_ratio"] < 1 and 0 < host["reading"]["memory_used_ratio"] < 1
    # this machine: a reading exactly when the kernel exposes a thermal zone
    real = HostProbe(tmp_path)().readings
    exposes = (
        any((z / "temp").is_file() for z in Path("/sys/class/thermal").glob("thermal_zone*"))
        if Path("/sys/class/thermal").is_dir()
        else False
    )
    assert ("cpu_temp_c" in real) == exposes


def test_an_unusable_profile_file_is_a_problem_not_a_dead_agent(tmp_path: Path) -> None:
    broken = tmp_path / "device-profile.yaml"
    broken.write_text(WALL.read_text(encoding="utf-8").replace("fps: {warn: 15, fail: 8}", "fps: {warn: 5, fail: 8}"))
    agent = _agent(tmp_path, broken)
    try:
        problems = agent.health()["problems"]
        assert any("device profile not usable" in p and "peripherals[0].checks.fps" in p for p in problems), problems
        assert agent.health_monitor.profile.id == "builtin" and agent.status_summary()["peripherals"] == {}
        agent.post_event("service.started", {"session": "s-1", "service_code": "TQ02", "face_login": False})
        assert agent.outbox.depth == 1
    finally:
        agent.stop(graceful=False)


# -- end to end: kiosk app -> agent -> broker -> fleet server ------------------------------------


def _stack_with_wall_terminal(make_stack: Any) -> Any:
    st = make_stack(0, start=False, server_options={"health_sweep_s": 0.2, "alert_for_s": 0.0, "alert_clear_s": 0.0})
    st.enrol("t-000", "haidian", profile="wall-21")
    st.start_broker()
    st.start_server()
    assert st.server.link.connected.wait(10)
    return st


def _server_peripheral(st: Any, name: str) -> dict[str, Any]:
    doc = st.server.health.terminal("t-000")
    return dict(doc["peripherals"].get(name) or {}) if doc else {}


def _alert(st: Any, kind: str, subject: str) -> str | None:
    for a in st.server.health.alerts():
        if (a["kind"], a["subject"]) == (kind, subject):
            return str(a["message"])
    return None


def test_kiosk_reading_over_a_threshold_turns_the_peripheral_warn_then_fail_at_the_server_and_alerts(
    make_stack: Any,
) -> None:
    st = _stack_with_wall_terminal(make_stack)
    agent = st.agent("t-000", heartbeat_interval_s=0.5, profile_file=str(WALL))
    st.tracked_agents.append(agent)
    agent.start()
    api = LocalApi(agent).start()
    kiosk = KioskClient(api.url, api_token(agent))
    try:
        r = kiosk.post_readings(
            "receipt_printer", {"paper_left_pct": 12, "head_temp_c": 41, "cutter_errors_per_day": 0}
        )
        assert r.status_code == 200 and r.json()["state"] == "warn", r.text
        wait_for(
            lambda: _server_peripheral(st, "receipt_printer").get("state") == "warn", 20, what="warn at the server"
        )
        seen = _server_peripheral(st, "receipt_printer")
        assert (seen["check"], seen["limit"]) == ("paper_left_pct", 20)
        assert seen["reading"] == {"paper_left_pct": 12, "head_temp_c": 41, "cutter_errors_per_day": 0}
        wait_for(lambda: _alert(st, "peripheral_warn", "t-000:receipt_printer") is not None, 20, what="warn alert")
        assert "paper_left_pct is 12 (warn threshold 20)" in str(_alert(st, "peripheral_warn", "t-000:receipt_printer"))

        kiosk.post_readings("receipt_printer", {"paper_left_pct": 2})
        wait_for(
            lambda: _server_peripheral(st, "receipt_printer").get("state") == "fail", 20, what="fail at the server"
        )
        assert _server_peripheral(st, "receipt_printer")["limit"] == 3
        wait_for(lambda: _alert(st, "peripheral_failed", "t-000:receipt_printer") is not None, 20, what="fail alert")
        message = str(_alert(st, "peripheral_failed", "t-000:receipt_printer"))
        assert message.startswith("receipt_printer on terminal t-000 failed: paper_left_pct is 2 (fail threshold 3)")
        # the alert is committed before the sweep exports its gauges: wait for them
        wait_for(
            lambda: (
                st.server is not None
                and st.server.metrics_registry.get_sample_value(
                    "fleet_peripherals_failed", {"office": "haidian", "peripheral": "receipt_printer"}
                )
                == 1
            ),
            10,
            what="the failed-peripheral gauge",
        )
        # no camera source configured on this terminal: said so, and no page for it
        camera = _server_peripheral(st, "camera")
        assert camera["state"] == "unknown" and "no camera source configured" in camera["error"]
        assert _alert(st, "peripheral_failed", "t-000:camera") is None

        kiosk.post_readings("receipt_printer", {"paper_left_pct": 100})  # roll changed
        wait_for(lambda: _alert(st, "peripheral_failed", "t-000:receipt_printer") is None, 20, what="resolved")
        assert _server_peripheral(st, "receipt_printer")["state"] == "ok"
    finally:
        kiosk.close()
        api.stop()


def test_a_camera_that_cannot_be_opened_fails_at_the_server(make_stack: Any, tmp_path: Path) -> None:
    pytest.importorskip("cv2")
    st = _stack_with_wall_terminal(make_stack)
    missing = str(tmp_path / "dev" / "video3")
    agent = st.agent(
        "t-000", heartbeat_interval_s=0.5, profile_file=str(WALL), camera_probe_source=missing, probe_interval_s=0.5
    )
    st.tracked_agents.append(agent)
    agent.start()
    wait_for(lambda: _server_peripheral(st, "camera").get("state") == "fail", 20, what="camera fail at the server")
    camera = _server_peripheral(st, "camera")
    assert camera["check"] == "fault" and camera["error"] == f"camera source {missing!r} cannot be opened"
    assert camera["reading"]["reopen_per_hour"] >= 1
    wait_for(lambda: _alert(st, "peripheral_failed", "t-000:camera") is not None, 20, what="camera alert")
    assert "cannot be opened" in str(_alert(st, "peripheral_failed", "t-000:camera"))
