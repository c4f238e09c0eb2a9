"""The rig for update tests: Mosquitto, the real fleet server as its own process with its TUF
repository (set up and published to through fleet_dev.releases, as `fleetctl release` does), and
terminals laid out by fleet_dev.terminal running the agent under its launcher from a real venv
built from the real wheel. Tests send DesiredRelease on the cmd topic themselves."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_dev import releases
from fleet_dev.devstack import DevStack
from fleet_dev.dist import build_agent_wheel
from fleet_dev.proc import free_port, stop, wait_for
from fleet_dev.terminal import Terminal, stop_all
from fleet_wire.release import DesiredRelease, MaintenanceWindow
from fleet_wire.topics import Channel, topic
from tests.mqtt_util import RawClient

# stall bounds, not speed checks: builds of a release venv share two busy cores with other tests
UPDATE_TIMEOUT_S = 240.0


@dataclass
class Rig:
    work: Path
    dist: Any  # fleet_dev.dist.Built of the session
    stack: DevStack = field(init=False)
    server: subprocess.Popen[bytes] | None = None
    terminals: list[Terminal] = field(default_factory=list)
    release: Any = None  # the release a module publishes once at set-up (rig_fixture(release=...))
    _wheels: dict[tuple[str, str | None], Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stack = DevStack(self.work / "stack")
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"

    # -- set-up ---------------------------------------------------------------------------------

    def start(self, terminals: dict[str, str]) -> None:
        """Enrol terminals {id: profile}, start broker and the server process, set up TUF."""
        for tid, profile in terminals.items():
            self.stack.enrol(tid, "haidian", profile=profile)
        self.stack.start_broker()
        self.keystore = releases.make_keystore(self.work / "keystore")
        releases.install_online_key(self.keystore, self.stack.settings)
        self.stack.stop_server()  # the in-process one only enrolled; the real process serves
        self.server = self.stack.server_process(self.http_port)
        wait_for(self._healthy, 60, what="fleet server process")
        self.rc = releases.client(self.url, self.stack.admin_token)
        releases.set_up_server(self.rc, self.keystore)
        self.root_json = self.keystore.folder / "metadata" / "1.root.json"
        self.mqtt = RawClient(self.stack.port, self.stack.settings.broker_username, self.stack.server_password)

    def stop_server(self) -> None:
        """Stop the fleet server process (broker and terminals stay up)."""
        assert self.server is not None
        stop(self.server)
        self.server = None

    def start_server(self) -> None:
        self.server = self.stack.server_process(self.http_port)
        wait_for(self._healthy, 60, what="fleet server process")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        stop_all(self.terminals)
        if getattr(self, "mqtt", None) is not None:
            self.mqtt.close()
        if self.server is not None:
            stop(self.server)
        self.stack.close()

    def terminal(self, tid: str, first_version: str = "1.0.0", **settings: Any) -> Terminal:
        """Install a terminal on `first_version` (not started)."""
        base = self.stack.agent_settings(tid)
        base.pop("data_dir")
        base.update(
            heartbeat_interval_s=1.0,
            update_repo_url=f"{self.url}/tuf",
            update_root_file=str(self.root_json),
            update_tick_s=0.2,
        )
        base.update(settings)
        t = Terminal(self.work / f"term-{tid}", base)
        folder = self.agent_dist(first_version)
        t.install(next(folder.glob("kiosk_fleet_agent-*.whl")), self.dist.agent_lock, self.dist.wheelhouse)
        self.terminals.append(t)
        return t

    def agent_dist(self, version: str, defect: str | None = None) -> Path:
        """A dist folder (wheel + lock + wheelhouse, as `./run.sh dist` writes) for one agent build."""
        key = (version, defect)
        if key not in self._wheels:
            folder = self.work / f"dist-{version}-{defect or 'good'}"
            wheel = build_agent_wheel(folder, version, defect=defect)
            shutil.copyfile(self.dist.agent_lock, folder / f"kiosk_fleet_agent-{version}.lock")
            # linked, not copied: a dist folder's wheelhouse is only ever read
            shutil.copytree(self.dist.wheelhouse, folder / "agent-wheels", copy_function=os.link)
            for stale in (folder / "agent-wheels").glob("kiosk_fleet_agent-*.whl"):
                stale.unlink()
            assert wheel.parent == folder
            self._wheels[key] = folder
        return self._wheels[key]

    def publish_agent(self, version: str, defect: str | None = None, profiles: list[str] | None = None) -> Any:
        return releases.publish_agent(
            self.rc, self.keystore, self.agent_dist(version, defect), self.work / "bundles", profiles=profiles
        )

    # -- faults ---------------------------------------------------------------------------------

    def tamper(self, dist_folder: Path) -> None:
        """Flip bytes of a published agent wheel on the server's disk (same length, wrong hash)."""
        wheel = next(dist_folder.glob("kiosk_fleet_agent-*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        blob = self.stack.settings.tuf_paths()[0] / "blobs" / digest
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))  # in place: the served hard link changes with it

    def _repo(self) -> Any:
        from fleet_server.releases.repository import TufRepository

        tuf_dir, key = self.stack.settings.tuf_paths()
        return TufRepository(tuf_dir, key)

    def expire_timestamp(self) -> None:
        """Sign a timestamp (with the server's online key) whose life ended an hour ago."""
        self._repo().resign_timestamp(datetime.now(UTC) - timedelta(days=1, hours=1))

    def fresh_timestamp(self) -> None:
        self._repo().resign_timestamp(datetime.now(UTC))

    # -- commands and what came back ------------------------------------------------------------

    def desire(
        self,
        tid: str,
        published: Any,
        *,
        version: str,
        gate_s: float = 3.0,
        window: MaintenanceWindow | None = None,
        deadline: datetime | None = None,
        kind: str = "agent",
        rollout: str = "r1",
    ) -> DesiredRelease:
        cmd = DesiredRelease(
            id=uuid.uuid4().hex,
            rollout=rollout,
            kind=kind,  # type: ignore[arg-type]
            target=published.path,
            version=version,
            counter=published.counter,
            window=window,
            deadline=None if deadline is None else deadline.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            gate_s=gate_s,
        )
        self.send(tid, cmd)
        return cmd

    def send(self, tid: str, cmd: DesiredRelease) -> None:
        self.mqtt.publish(topic(tid, Channel.CMD), cmd.to_payload())

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.stack.settings.db_path}?mode=ro", uri=True, timeout=10)

    def reports(self, tid: str, cmd: DesiredRelease | None = None) -> list[dict[str, Any]]:
        """update.status bodies stored at the server, in report order."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT body FROM events WHERE terminal=? AND type='update.status' ORDER BY seq", (tid,)
            ).fetchall()
        bodies = [json.loads(r[0]) for r in rows]
        if cmd is not None:
            bodies = [b for b in bodies if b["cmd"] == cmd.id]
        return sorted(bodies, key=lambda b: (b["cmd"], b["report"]))

    def states(self, tid: str, cmd: DesiredRelease) -> list[str]:
        return [b["state"] for b in self.reports(tid, cmd)]

    def wait_state(self, tid: str, cmd: DesiredRelease, state: str, timeout_s: float = UPDATE_TIMEOUT_S) -> None:
        wait_for(lambda: state in self.states(tid, cmd), timeout_s, 0.2, what=f"{tid} reporting {state}")

    def count(self, tid: str, event_type: str) -> int:
        with self._db() as conn:
            return int(
                conn.execute("SELECT count(*) FROM events WHERE terminal=? AND type=?", (tid, event_type)).fetchone()[0]
            )

    def heartbeat_version(self, tid: str) -> str | None:
        with self._db() as conn:
            row = conn.execute("SELECT doc FROM terminal_status WHERE terminal=?", (tid,)).fetchone()
        return None if row is None else json.loads(row[0]).get("version")

    def wait_version(self, tid: str, version: str, timeout_s: float = UPDATE_TIMEOUT_S) -> None:
        wait_for(lambda: self.heartbeat_version(tid) == version, timeout_s, 0.2, what=f"{tid} heartbeat of {version}")


def rig_fixture(
    name: str, terminals: dict[str, str], *, release: str | None = None, built: str = "dist"
) -> Callable[..., Iterator[Rig]]:
    """The module-scoped `rig` fixture of an update test module (`rig = rig_fixture(...)`): a Rig
    in its own tmp folder over the session's `built` fixture (a fleet_dev.dist.Built), started
    with `terminals` {id: profile}; `release` (a version) is published once as `rig.release`."""

    @pytest.fixture(scope="module", name="rig")
    def _rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
        r = Rig(tmp_path_factory.mktemp(name), request.getfixturevalue(built))
        try:
            r.start(terminals)
            if release is not None:
                r.release = r.publish_agent(release)
            yield r
        finally:
            r.close()

    return _rig


def post_event(t: Terminal, event_type: str, body: dict[str, Any], key: str) -> int:
    """POST one event to the terminal's local API (retrying while the agent restarts); the status."""
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    while True:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{t.settings['api_port']}/v1/events",
                json={"type": event_type, "body": body, "key": key},
                timeout=10,
            )
            if r.status_code in (200, 201):
                return r.status_code
            raise AssertionError(f"event refused: {r.status_code} {r.text}")
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def window_now_closed() -> MaintenanceWindow:
    """A one-minute window twelve hours from now (so the terminal is outside it)."""
    later = datetime.now(UTC) + timedelta(hours=12)
    end = later + timedelta(minutes=1)
    return MaintenanceWindow(tz="UTC", start=later.strftime("%H:%M"), end=end.strftime("%H:%M"))


def window_now_open() -> MaintenanceWindow:
    now = datetime.now(UTC)
    return MaintenanceWindow(
        tz="Asia/Shanghai",
        start=(now - timedelta(hours=1)).astimezone(_cst()).strftime("%H:%M"),
        end=(now + timedelta(hours=1)).astimezone(_cst()).strftime("%H:%M"),
    )


def _cst() -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo("Asia/Shanghai")
