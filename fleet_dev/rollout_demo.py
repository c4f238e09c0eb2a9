"""A fleet an IT admin rolls releases out to, real processes throughout, and the demo's rollout.

`RolloutFleet` is the one harness of the end-to-end rollout tests, the rollout bench's end-to-end
section and `fleet-demo --rollout`:

- Mosquitto with a generated account per terminal (the fleet server keeps its password file and
  ACL in step with the registry and SIGHUPs the broker, `FLEET_BROKER_ACCOUNTS=files`, so a
  terminal enrolled through the API later can connect);
- the fleet server as its own process (`fleet-server run`: the rollout engine ticks in it, its
  TUF repository is served under /tuf), set up and published to as `fleetctl release` does;
- terminals laid out by `fleet_dev.terminal` (the agent under its launcher, from release venvs
  built from real wheels), each in its office;
- `CitizenTraffic`: simulated kiosk apps posting citizen events to each terminal's local API
  with idempotency keys, counting what each terminal accepted, so the events table can be checked
  for exactly once around every switch;
- the admin's side over the REST API only: `/api/v1/rollouts…` and `/api/v1/terminals`.

    fleet-demo --rollout        (or ./run.sh demo --rollout)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleet_dev import releases
from fleet_dev.devstack import DevStack
from fleet_dev.dist import build_agent_wheel
from fleet_dev.proc import free_port, spawn, wait_for
from fleet_dev.terminal import Terminal

# stall bounds, never speed checks: release venvs are built on two busy cores
STALL_S = 480.0
FIRST_VERSION = "1.0.0"
FINAL_ROLLOUT_STATES = frozenset({"completed", "halted", "aborted", "rolled_back"})
SERVICE_CODES = ("TQ02", "TQ01", "DK01", "CX01")  # rent / purchase withdrawal, loan, statement query


def three_waves(
    release: str,
    *,
    soak_s: float = 2.0,
    gate_s: float = 2.0,
    rollout_id: str | None = None,
    failures: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """The plan an admin writes for a fleet: canary (one terminal in a pilot office), the pilot
    offices, then everyone; installing at once (`window: now`), halting on any failure."""
    plan: dict[str, Any] = {
        "release": release,
        "window": "now",
        "gate_s": gate_s,
        "waves": [
            {"name": "canary", "size": {"count": 1}, "pilot_only": True, "soak_s": soak_s,
             "failures": {"count": failures}},
            {"name": "pilots", "pilot_only": True, "soak_s": soak_s, "failures": {"count": failures}},
            {"name": "everyone", "soak_s": soak_s, "failures": {"count": failures}},
        ],
    }  # fmt: skip
    if rollout_id:
        plan["id"] = rollout_id
    plan.update(extra)
    return plan


class CitizenTraffic:
    """Simulated kiosk apps: one thread per terminal served, posting `service.completed` events to
    its local API, each with its own idempotency key, retried with the same key
    while the agent restarts (so a request that timed out after the outbox stored it is still one
    event). `accepted[tid]` counts distinct events each terminal confirmed (200/201)."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.accepted: dict[str, int] = {}
        self.refused: list[str] = []
        self._terminals: dict[str, Terminal] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._started = False
        self._threads: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._run_id = uuid.uuid4().hex[:8]
        self._n = itertools.count(1)
        self._http = httpx.Client(timeout=10)

    def serve(self, t: Terminal) -> None:
        tid = str(t.settings["terminal_id"])
        self._locks.setdefault(tid, threading.Lock())
        self.accepted.setdefault(tid, 0)
        self._terminals[tid] = t
        if self._started and tid not in self._threads:
            self._spawn(tid)

    def leave(self, tid: str) -> None:
        """Stop serving a terminal; returns once no request to it is in flight."""
        self._terminals.pop(tid, None)
        thread, gone = self._threads.pop(tid, (None, None))
        if thread is not None and gone is not None:
            gone.set()
            thread.join(180)

    def pause(self) -> None:
        """Stop posting; returns once no request is in flight (e.g. to compare counts)."""
        self._running.clear()
        for lock in list(self._locks.values()):
            with lock:
                pass

    def resume(self) -> None:
        self._running.set()

    def post(self, t: Terminal, deadline_s: float = STALL_S, *, unless_paused: bool = False) -> None:
        """Post one citizen event to `t` and wait until the terminal has accepted it."""
        tid = str(t.settings["terminal_id"])
        self._locks.setdefault(tid, threading.Lock())
        self.accepted.setdefault(tid, 0)
        n = next(self._n)
        key = f"citizen-{self._run_id}-{n}"
        body = {
            "type": "service.completed",
            "body": {
                "session": f"{tid}-{self._run_id}-{n}",
                "service_code": SERVICE_CODES[n % len(SERVICE_CODES)],
                "duration_s": 60.0 + n % 90,
                "face_login": n % 3 == 0,
            },
            "key": key,
        }
        url = f"http://127.0.0.1:{t.settings['api_port']}/v1/events"
        end = time.monotonic() + deadline_s
        with self._locks[tid]:
            if unless_paused and not self._running.is_set():
                return
            while True:
                try:
                    r = self._http.post(url, json=body)
                except httpx.TransportError:
                    if time.monotonic() > end:
                        raise
                    time.sleep(0.1)
                    continue
                if r.status_code in (200, 201):
                    self.accepted[tid] += 1
                    return
                if r.status_code >= 500 and time.monotonic() < end:  # an agent on its way down
                    time.sleep(0.1)
                    continue
                self.refused.append(f"{tid}: {r.status_code} {r.text[:200]}")
                return

    def start(self) -> CitizenTraffic:
        self._started = True
        for tid in list(self._terminals):
            self._spawn(tid)
        return self

    def _spawn(self, tid: str) -> None:
        gone = threading.Event()
        thread = threading.Thread(target=self._run, args=(tid, gone), name=f"citizen-{tid}", daemon=True)
        self._threads[tid] = (thread, gone)
        thread.start()

    def _run(self, tid: str, gone: threading.Event) -> None:
        while not (self._stop.is_set() or gone.is_set()):
            t = self._terminals.get(tid)
            if t is not None and self._running.is_set():
                try:
                    self.post(t, deadline_s=120.0, unless_paused=True)
                except httpx.TransportError as err:
                    self.refused.append(f"{tid}: unreachable for 120 s ({err})")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        for thread, _ in list(self._threads.values()):
            thread.join(180)
        self._threads.clear()
        self._http.close()

    @property
    def total(self) -> int:
        return sum(self.accepted.values())


@dataclass
class RolloutFleet:
    work: Path
    built: Any  # fleet_dev.dist.Built: the session's `./run.sh dist` (its wheelhouse and lock)
    stack: DevStack = field(init=False)
    server: subprocess.Popen[bytes] | None = None
    terminals: dict[str, Terminal] = field(default_factory=dict)
    _dists: dict[tuple[str, str | None], Path] = field(default_factory=dict)
    admin_password: str = ""  # the console's bootstrap admin (FLEET_ADMIN_PASSWORD of the server)

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.stack = DevStack(self.work / "stack")
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.api = httpx.Client(
            base_url=self.url, timeout=60.0, headers={"Authorization": f"Bearer {self.stack.admin_token}"}
        )

    # -- set-up ---------------------------------------------------------------------------------

    def start(self, layout: dict[str, str]) -> None:
        """Enrol terminals {id: office}, start the broker and `fleet-server run`, set up TUF."""
        for tid, office in layout.items():
            self.stack.enrol(tid, office)
        self.stack.start_broker()
        self.keystore = releases.make_keystore(self.work / "keystore")
        releases.install_online_key(self.keystore, self.stack.settings)
        self.stack.stop_server()  # the in-process server only enrolled; the process serves
        self.start_server()
        self.rc = releases.client(self.url, self.stack.admin_token)
        releases.set_up_server(self.rc, self.keystore)
        self.root_json = self.keystore.folder / "metadata" / "1.root.json"

    def start_server(self) -> subprocess.Popen[bytes]:
        """`fleet-server run` over the stack's database, keeping the broker's account files."""
        broker = self.stack.broker
        assert broker is not None and broker.proc is not None
        cfg = self.stack.broker_config
        pid_file = self.work / "mosquitto.pid"
        pid_file.write_text(f"{broker.proc.pid}\n", "ascii")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "EDGE_"))},
            "FLEET_ENVIRONMENT": "development",
            "FLEET_DB_PATH": str(self.stack.settings.db_path),
            "FLEET_BROKER_PORT": str(self.stack.port),
            "FLEET_BROKER_PASSWORD": self.stack.server_password,
            "FLEET_ADMIN_TOKEN": self.stack.admin_token,
            **({"FLEET_ADMIN_PASSWORD": self.admin_password} if self.admin_password else {}),
            "FLEET_HTTP_PORT": str(self.http_port),
            "FLEET_BROKER_ACCOUNTS": "files",
            "FLEET_BROKER_PASSWD_FILE": str(cfg.passwd_path),
            "FLEET_BROKER_ACL_FILE": str(cfg.acl_path),
            "FLEET_BROKER_PID_FILE": str(pid_file),
        }
        self.server = spawn([sys.executable, "-m", "fleet_server", "run"], env, self.work / "server.log")
        wait_for(self._healthy, 90, 0.2, what="fleet-server run answering /healthz")
        return self.server

    def kill_server(self) -> None:
        """kill -9 the fleet server process (its whole process group)."""
        assert self.server is not None
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait(15)
        self.server = None

    def _healthy(self) -> bool:
        if self.server is not None and self.server.poll() is not None:
            raise RuntimeError(f"fleet-server run exited with {self.server.returncode}:\n{self.server_log()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def server_log(self) -> str:
        path = self.work / "server.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def close(self) -> None:
        for t in self.terminals.values():
            t.stop()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait(10)
        self.server = None
        for client in (self.api, getattr(self, "rc", None)):
            if client is not None:
                (client.http if hasattr(client, "http") else client).close()
        self.stack.close()

    # -- terminals ------------------------------------------------------------------------------

    def install(self, tid: str, *, version: str = FIRST_VERSION, password: str | None = None) -> Terminal:
        """Install a terminal (as provisioning does: launcher + first release venv), not started."""
        base = self.stack.agent_settings(tid) if password is None else self._settings_for(tid, password)
        base.pop("data_dir")
        base.update(
            heartbeat_interval_s=1.0,
            update_repo_url=f"{self.url}/tuf",
            update_root_file=str(self.root_json),
            update_tick_s=0.2,
        )
        t = Terminal(self.work / f"term-{tid}", base)
        t.install(self.wheel(version), self.built.agent_lock, self.built.wheelhouse)
        self.terminals[tid] = t
        return t

    def _settings_for(self, tid: str, password: str) -> dict[str, Any]:
        self.stack.passwords[tid] = password
        return self.stack.agent_settings(tid)

    def install_all(self, tids: Iterable[str], *, start: bool = True) -> list[Terminal]:
        out = []
        for tid in tids:
            t = self.install(tid)
            if start:
                t.start()
            out.append(t)
        return out

    def enrol(self, tid: str, office: str, profile: str = "generic") -> str:
        """Enrol a terminal through the API (as an admin does); its broker password."""
        r = self.api.post("/api/v1/terminals", json={"id": tid, "office_id": office, "profile": profile})
        if r.status_code != 201:
            raise RuntimeError(f"enrolling {tid} failed: {r.status_code} {r.text}")
        self.stack.offices[tid] = office
        return str(r.json()["mqtt_password"])

    # -- releases -------------------------------------------------------------------------------

    def agent_dist(self, version: str, defect: str | None = None) -> Path:
        """A dist folder (wheel + lock + wheelhouse, as `./run.sh dist` writes) for one agent build."""
        key = (version, defect)
        if key not in self._dists:
            folder = self.work / f"dist-{version}-{defect or 'good'}"
            build_agent_wheel(folder, version, defect=defect)
            shutil.copyfile(self.built.agent_lock, folder / f"kiosk_fleet_agent-{version}.lock")
            shutil.copytree(self.built.wheelhouse, folder / "agent-wheels")
            for stale in (folder / "agent-wheels").glob("kiosk_fleet_agent-*.whl"):
                stale.unlink()
            self._dists[key] = folder
        return self._dists[key]

    def wheel(self, version: str, defect: str | None = None) -> Path:
        return next(self.agent_dist(version, defect).glob("kiosk_fleet_agent-*.whl"))

    def publish(self, version: str, defect: str | None = None) -> releases.Published:
        """Build, sign and publish an agent release (`fleetctl release build/sign/publish`)."""
        return releases.publish_agent(self.rc, self.keystore, self.agent_dist(version, defect), self.work / "bundles")

    # -- the admin's API ------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self.api.request(method, path, json=body)
        if r.status_code != expect:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:2000]}")
        return r.json()

    def create_rollout(self, plan: dict[str, Any]) -> str:
        doc = self.call("POST", "/api/v1/rollouts", plan, expect=201)
        return str(doc["rollout"]["id"])

    def rollout(self, rid: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/api/v1/rollouts/{rid}"))

    def rollout_terminals(self, rid: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v1/rollouts/{rid}/terminals"))

    def wave_of(self, rid: str) -> dict[str, int]:
        return {t["terminal"]: int(t["wave"]) for t in self.rollout_terminals(rid)}

    def act(self, rid: str, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        expect = 201 if action == "rollback" else 200
        return dict(self.call("POST", f"/api/v1/rollouts/{rid}/{action}", body or {}, expect=expect))

    def health(self) -> dict[str, dict[str, Any]]:
        return {h["terminal"]: h for h in self.call("GET", "/api/v1/health/terminals")}

    def wait_rollout(
        self,
        rid: str,
        until: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout_s: float = STALL_S,
        progress: Callable[[dict[str, Any]], None] | None = None,
        every_s: float = 1.0,
        what: str = "",
    ) -> dict[str, Any]:
        """Poll the rollout until `until(doc)` (default: a final state); the last doc."""
        done = until or (lambda d: d["state"] in FINAL_ROLLOUT_STATES)
        end = time.monotonic() + timeout_s
        last_print = 0.0
        while True:
            doc = self.rollout(rid)
            if progress is not None and time.monotonic() - last_print >= every_s:
                progress(doc)
                last_print = time.monotonic()
            if done(doc):
                return doc
            if time.monotonic() > end:
                raise TimeoutError(f"rollout {rid}: {what or 'a final state'} not reached in {timeout_s:g} s: {doc}")
            time.sleep(0.5)

    # -- reading back at the server -------------------------------------------------------------

    def _db(self) -> closing[sqlite3.Connection]:
        """A read-only connection, closed when the `with` block ends (sqlite3's own `with` only commits)."""
        return closing(sqlite3.connect(f"file:{self.stack.settings.db_path}?mode=ro", uri=True, timeout=30))

    # A terminal's rows are found through its stream numbers: the key (stream, seq) indexes them.
    _OF_TERMINAL = "stream IN (SELECT num FROM event_streams WHERE terminal=?)"

    def stored(self, tid: str, event_type: str = "service.completed") -> int:
        """Events of one type stored at the server for a terminal (one row per (terminal, epoch, seq))."""
        with self._db() as conn:
            row = conn.execute(
                f"SELECT count(*) FROM events WHERE {self._OF_TERMINAL} AND type=?", (tid, event_type)
            ).fetchone()
        return int(row[0])

    def stored_keys_unique(self, tid: str) -> tuple[int, int]:
        """(rows, distinct sessions) of a terminal's citizen events: equal when nothing doubled."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT count(*), count(DISTINCT json_extract(body, '$.session')) FROM events"
                f" WHERE {self._OF_TERMINAL} AND type='service.completed'",
                (tid,),
            ).fetchone()
        return int(rows[0]), int(rows[1])

    def reports(self, tid: str, rollout: str | None = None) -> list[dict[str, Any]]:
        """update.status bodies stored at the server for a terminal (of one rollout), in order."""
        with self._db() as conn:
            rows = conn.execute(
                f"SELECT body FROM events WHERE {self._OF_TERMINAL} AND type='update.status' ORDER BY rowid", (tid,)
            ).fetchall()
        bodies = [json.loads(r[0]) for r in rows]
        return [b for b in bodies if rollout is None or b["rollout"] == rollout]

    def heartbeat_version(self, tid: str) -> str | None:
        with self._db() as conn:
            row = conn.execute("SELECT doc FROM terminal_status WHERE terminal=?", (tid,)).fetchone()
        return None if row is None else json.loads(row[0]).get("version")

    def downloaded(self, tid: str, wheel_name: str) -> bool:
        """Whether the terminal ever fetched this wheel (its updater's download folder or a
        release venv of it)."""
        t = self.terminals[tid]
        folder = t.data_dir / "update" / "downloads"
        names = [p.name for p in folder.rglob("*")] if folder.exists() else []
        version = wheel_name.split("-")[1]
        return any(wheel_name in n for n in names) or any(r.startswith(f"{version}-") for r in t.releases())


# -- the demo ---------------------------------------------------------------------------------------


def _progress_line(doc: dict[str, Any]) -> str:
    waves = []
    for w in doc["waves"]:
        states = " ".join(f"{k} {v}" for k, v in sorted(w["states"].items()))
        waves.append(f"{w['wave']}:{w['name']} {w['state']} [{states}]")
    return f"  {doc['state']:<9} wave {doc['current_wave']}/{len(doc['waves'])}  " + "  |  ".join(waves)


def main(argv: list[str] | None = None) -> int:
    """`fleet-demo --rollout`: a new agent release through the pilot offices in waves while the
    simulated kiosk apps keep serving citizens on every terminal."""
    p = argparse.ArgumentParser(prog="fleet-demo --rollout", description=main.__doc__)
    p.add_argument("--state-dir", default=".demo/rollout", help="where the demo keeps its files (wiped at start)")
    p.add_argument("--offices", type=int, default=6, choices=range(1, 7), help="how many of the 6 pilot offices")
    p.add_argument("--terminals-per-office", type=int, default=1, help="real terminals per pilot office")
    p.add_argument("--soak-s", type=float, default=5.0, help="soak time of each wave")
    p.add_argument("--version", default="1.1.0", help="the agent version rolled out")
    args = p.parse_args(argv)
    if args.offices * args.terminals_per_office < 2:
        p.error("a canary and at least one more terminal: raise --offices or --terminals-per-office")

    from fleet_dev.demo import console_password
    from fleet_dev.dist import build

    try:
        admin_password, origin = console_password()
    except SystemExit as refused:
        return int(refused.code or 2)
    root = Path(args.state_dir).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print("building the agent wheel, its wheelhouse and lock (as ./run.sh dist does) …", flush=True)
    built = build(root / "dist")
    fleet = RolloutFleet(root / "fleet", built, admin_password=admin_password)
    pilots = ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun", "loan-centre"][: args.offices]
    layout = {f"{o}-{i:02d}": o for o in pilots for i in range(1, args.terminals_per_office + 1)}
    traffic = CitizenTraffic(interval_s=0.5)
    try:
        fleet.start(layout)
        print(f"fleet server {fleet.url} (admin token {fleet.stack.admin_token}); broker port {fleet.stack.port}")
        print(f"console {fleet.url}/rollouts  log in as user admin, password {admin_password} ({origin})")
        print(f"installing {len(layout)} terminals under their launchers (a release venv each) …", flush=True)
        for t in fleet.install_all(layout):
            traffic.serve(t)
        for tid in layout:
            wait_for(lambda tid=tid: fleet.heartbeat_version(tid) == FIRST_VERSION, STALL_S, 0.5,  # type: ignore[misc]
                     what=f"{tid} online on {FIRST_VERSION}")  # fmt: skip
        traffic.start()
        print(f"publishing agent {args.version} (TUF-signed) …", flush=True)
        fleet.publish(FIRST_VERSION)  # the release the terminals run, so the new one has a rollback twin
        pub = fleet.publish(args.version)
        plan = three_waves(pub.path, soak_s=args.soak_s, rollout_id="demo-" + args.version.replace(".", "-"))
        plan["waves"] = plan["waves"][:2]  # canary, then the rest of the pilot offices
        rid = fleet.create_rollout(plan)
        print(
            f"rollout {rid}: {pub.path}, waves: canary (1 terminal) → the pilot offices\n"
            f"  watch it     FLEETCTL_URL={fleet.url} FLEETCTL_TOKEN={fleet.stack.admin_token}"
            f" .venv/bin/fleetctl rollout status {rid} --watch",
            flush=True,
        )

        def show(doc: dict[str, Any]) -> None:
            print(
                _progress_line(doc) + f"   citizens served {traffic.total}, stored "
                f"{sum(fleet.stored(t) for t in layout)}",
                flush=True,
            )

        doc = fleet.wait_rollout(rid, progress=show, every_s=3.0)
        show(doc)
        print(f"rollout {doc['state']}{': ' + doc['reason'] if doc['reason'] else ''}")
        for tid in layout:
            print(f"  {tid:<16} heartbeat reports agent {fleet.heartbeat_version(tid)}")
        traffic.stop()
        wait_for(lambda: sum(fleet.stored(t) for t in layout) >= traffic.total, 120, 0.5, what="events drained")
        stored = sum(fleet.stored(t) for t in layout)
        print(f"citizen events: {traffic.total} accepted by the terminals, {stored} stored at the server")
        return 0 if doc["state"] == "completed" else 1
    finally:
        traffic.stop()
        fleet.close()
