"""`fleet-demo`: Mosquitto + fleet server + a simulated fleet across the 6 pilot offices.

Everything on 127.0.0.1 with embedded defaults; state lives in a throw-away directory. The console
login is user `admin` with FLEET_ADMIN_PASSWORD if set (12+ characters), else a password made for
this run; the banner prints it.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# The simulated fortnight starts this many weekdays back and replays once it reaches today: the
# server refuses event times more than a day ahead of its clock, and at 60x a simulated week
# would otherwise run ahead of the real one within the hour.
HISTORY_WEEKDAYS = 10


def _opening_weekdays_ago(now_local: datetime, n: int) -> datetime:
    day = now_local
    while n > 0:
        day = day - timedelta(days=1)
        if day.weekday() < 5:
            n -= 1
    return day.replace(hour=8, minute=30, second=0, microsecond=0)


def _next_opening(now_local: datetime) -> datetime:
    day = now_local
    while True:
        day = day + timedelta(days=1)
        if day.weekday() < 5:
            return day.replace(hour=8, minute=30, second=0, microsecond=0)


def console_password() -> tuple[str, str]:
    """The console's bootstrap admin password and where it came from: the operator's
    FLEET_ADMIN_PASSWORD, or one made for this run. Raises SystemExit(2) with a plain line if the
    chosen one is too weak."""
    from fleet_server.auth.passwords import WeakPassword, check_policy

    chosen = os.environ.get("FLEET_ADMIN_PASSWORD", "")
    password = chosen or secrets.token_urlsafe(12)
    origin = "from FLEET_ADMIN_PASSWORD" if chosen else "made for this run; set FLEET_ADMIN_PASSWORD to choose it"
    try:
        check_policy(password)
    except WeakPassword as err:
        print(f"fleet-demo: FLEET_ADMIN_PASSWORD is not usable: {err} (unset it for a generated one)", file=sys.stderr)
        raise SystemExit(2) from None
    return password, origin


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--rollout" in argv:  # its own options (fleet-demo --rollout --help)
        from fleet_dev.rollout_demo import main as rollout_demo

        return rollout_demo([a for a in argv if a != "--rollout"])
    p = argparse.ArgumentParser(prog="fleet-demo", description=__doc__)
    p.add_argument(
        "--rollout",
        action="store_true",
        help="instead: roll a new agent release out in waves to real terminals under their launchers in the"
        " pilot offices while citizens are served (see fleet-demo --rollout --help)",
    )
    p.add_argument("--state-dir", default=".demo", help="where the demo keeps its files (wiped at start)")
    p.add_argument("--terminals-per-office", type=int, default=3)
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per real second")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: run until Ctrl-C)")
    p.add_argument("--peak", type=float, default=30.0, help="sessions per terminal per hour at the peak")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from fleet_dev.devstack import DevStack
    from fleet_dev.sim import SimClock, SimulatedFleet
    from fleet_dev.sim.traffic import BEIJING
    from fleet_server.app import create_app

    try:
        admin_password, origin = console_password()
    except SystemExit as refused:
        return int(refused.code or 2)
    root = Path(args.state_dir).resolve()
    if root.exists():
        shutil.rmtree(root)
    stack = DevStack(root, server_options={"alert_for_s": 60.0, "alert_clear_s": 30.0})
    assert stack.server is not None
    stack.server.auth.bootstrap_password("admin", admin_password)
    pilots = [o for o in stack.server.registry.store.offices() if o.pilot]
    profiles: dict[str, str] = {}
    for office in pilots:
        for i in range(1, args.terminals_per_office + 1):
            tid = f"{office.id}-{i:02d}"
            profiles[tid] = "lobby-floor-32" if i % 2 else "wall-21"
            stack.enrol(tid, office.id, profile=profiles[tid])
    creds = root / "credentials.txt"
    fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"admin API token: {stack.admin_token}\n")
        fh.write(f"console login: admin {admin_password}\n")
        fh.write(f"{stack.settings.broker_username} {stack.server_password}\n")
        fh.writelines(f"{tid} {pw}\n" for tid, pw in stack.passwords.items())
    stack.start_broker()
    app = create_app(stack.settings, stack.server)
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.http_port, log_level="warning"))
    threading.Thread(target=http.run, name="http", daemon=True).start()
    deadline = time.monotonic() + 15
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    if not http.started:
        print(
            f"fleet-demo: could not serve HTTP on 127.0.0.1:{args.http_port} (port in use? try --http-port)",
            file=sys.stderr,
        )
        stack.close()
        return 1

    # Each agent judges its peripherals by its own copy of its profile, as a provisioned terminal does.
    profiles_dir = Path(stack.settings.profiles_dir)
    agents = [
        stack.agent(tid, heartbeat_interval_s=10.0, profile_file=str(profiles_dir / f"{profiles[tid]}.yaml"))
        for tid in stack.passwords
    ]
    for a in agents:
        a.start()
    start = _opening_weekdays_ago(datetime.now(BEIJING), HISTORY_WEEKDAYS)
    clock = SimClock(start, args.speed, time.time())
    fleet = SimulatedFleet(agents, clock, peak_sessions_per_hour=args.peak)
    fleet.start()

    port = http.servers[0].sockets[0].getsockname()[1] if http.servers else args.http_port  # --http-port 0
    url = f"http://127.0.0.1:{port}"
    print(
        f"""
kiosk-fleet demo is running
  offices        {", ".join(o.name for o in pilots)}
  terminals      {len(agents)} simulated ({args.terminals_per_office} per pilot office), real agent code,
                 each with its local API (the simulated kiosk apps post events and peripheral readings there)
  broker         mqtt://127.0.0.1:{stack.port}  (per-terminal accounts: {creds})
  console        {url}/  log in as user admin, password {admin_password}
                 ({origin})
  API            {url}/api/v1/…  (every call needs the admin token below as a bearer token)
  admin token    {stack.admin_token}
  try            FLEETCTL_URL={url} FLEETCTL_TOKEN={stack.admin_token} .venv/bin/fleetctl terminals
                 curl -H 'Authorization: Bearer {stack.admin_token}' {url}/api/v1/usage/charts/busy-hours.svg
  metrics        {url}/metrics  (loopback only, or with FLEET_METRICS_TOKEN)
  rollouts       ./run.sh demo --rollout  rolls a new agent release through the pilot offices in waves
                 (real terminals under their launchers; the progress is printed until it is done)
  state          {root}
  simulated days from {start:%Y-%m-%d %H:%M} Beijing time ({HISTORY_WEEKDAYS} weekdays back, replayed once
                 they reach today), {args.speed:g}x real time
Ctrl-C stops everything.
""",
        flush=True,
    )

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    began = time.monotonic()
    try:
        while not stop.wait(5.0):
            local = clock.at(time.time())
            if local.hour >= 17:
                following = _next_opening(local)
                if following > datetime.now(BEIJING):  # caught up with today: replay the fortnight
                    following = _opening_weekdays_ago(datetime.now(BEIJING), HISTORY_WEEKDAYS)
                clock.start, clock.real_start = following, time.time()
            s = fleet.summary()
            backlog = sum(a.outbox.depth for a in agents)
            online = sum(1 for a in agents if a.link.connected)
            states = [p["state"] for t in stack.server.health.terminals() for p in t["peripherals"].values()]
            print(
                f"[{s['sim_time'][11:16]} sim] sessions {s['sessions']:>5}  events posted {s['events_posted']:>6}"
                f"  stored {stack.stored():>6}  outbox backlog {backlog:>4}  online {online}/{len(agents)}"
                f"  peripherals warn {states.count('warn')} fail {states.count('fail')}",
                flush=True,
            )
            if args.duration and time.monotonic() - began >= args.duration:
                break
    finally:
        fleet.stop()  # also stops serving the agents' local APIs
        for a in agents:
            a.stop(graceful=True)
        http.should_exit = True
        time.sleep(0.3)
        stack.close()
    summary: dict[str, Any] = fleet.summary()
    print(f"stopped: {summary['events_posted']} events posted, {summary['refused']} refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
