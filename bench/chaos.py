"""Chaos benchmark: terminals (separate agent processes) take events from their kiosk apps over the
local API while the broker restarts, agents are killed with SIGKILL, and the server process is
killed and restarted. Afterwards every acknowledged event must be stored exactly once.

    python bench/chaos.py --quick     # 8 terminals, ~6k events, 3 broker restarts, 6 kills, 1 server kill
    python bench/chaos.py             # 50 terminals, 100k events, 5 broker restarts, 20 kills, 3 server kills
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fleet_dev.bench import emit, machine
from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, spawn, wait_for

OFFICES = ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun", "loan-centre"]


class Terminal:
    def __init__(self, st: DevStack, tid: str) -> None:
        self.st, self.tid = st, tid
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5.0)

    def start(self) -> None:
        env_over = dict(api_port=self.port, receipt_timeout_s=2.0, heartbeat_interval_s=5.0)
        env = {**os.environ}
        for key, value in self.st.agent_settings(self.tid, **env_over).items():
            env[f"EDGE_{key.upper()}"] = str(value)
        self.proc = spawn([sys.executable, "-m", "edge_agent", "run"], env, self.st.root / f"agent-{self.tid}.log")

    def kill(self) -> None:
        if self.proc:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def post(self, session: str) -> str:
        """'ok', 'refused' (the kiosk saw an error: nothing promised) or 'doubt' (no answer).

        The session id doubles as the idempotency key, so the kiosk may retry a doubtful post.
        """
        body = {
            "type": "service.completed",
            "key": f"kiosk-{session}",
            "body": {"session": session, "service_code": "TQ02", "duration_s": 60.0},
        }
        try:
            r = self.client.post("/v1/events", json=body)
        except httpx.ConnectError:
            return "refused"
        except httpx.HTTPError:
            return "doubt"
        return "ok" if r.status_code in (200, 201) else "refused"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        n_term, target, broker_restarts, kills, server_kills = 8, 6_000, 3, 6, 1
    else:
        n_term, target, broker_restarts, kills, server_kills = 50, 100_000, 5, 20, 3
    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        if os.environ.get("CHAOS_KEEP"):
            tmp = os.environ["CHAOS_KEEP"]
        st = DevStack(Path(tmp))
        tids = [f"chaos-{i:02d}" for i in range(n_term)]
        for i, tid in enumerate(tids):
            st.enrol(tid, OFFICES[i % len(OFFICES)])
        st.start_broker()
        server = st.server_process()
        terms = [Terminal(st, tid) for tid in tids]
        for t in terms:
            t.start()
        time.sleep(3)
        acked: set[str] = set()
        doubt: set[str] = set()
        lock = threading.Lock()
        counter = [0]
        stop = threading.Event()

        attempts = itertools.count(1)

        def producer(worker: int) -> None:
            while not stop.is_set():
                with lock:
                    if counter[0] >= target:
                        return
                    counter[0] += 1  # reserve one event of the target
                    session = f"c{worker}-{next(attempts)}"  # unique per attempt
                t = terms[rng.randrange(n_term)]
                outcome = t.post(session)
                for _ in range(20):  # no answer (agent killed mid-request): retry with the same key
                    if outcome != "doubt":
                        break
                    time.sleep(0.25)
                    outcome = t.post(session)
                    if outcome == "refused":  # agent still down: keep asking, the event may be stored
                        outcome = "doubt"
                with lock:
                    if outcome == "ok":
                        acked.add(session)
                    elif outcome == "doubt":
                        doubt.add(session)
                    else:
                        counter[0] -= 1  # the kiosk shows an error; the citizen tries again
                if outcome == "refused":
                    time.sleep(0.05)

        workers = [threading.Thread(target=producer, args=(w,), daemon=True) for w in range(8)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        # spread the faults over the production period
        faults = ["broker"] * broker_restarts + ["agent"] * kills + ["server"] * server_kills
        rng.shuffle(faults)
        for k, fault in enumerate(faults):
            while counter[0] < target * (k + 1) / (len(faults) + 1) and any(w.is_alive() for w in workers):
                time.sleep(0.05)
            if fault == "broker":
                assert st.broker is not None
                st.broker.restart(hard=rng.random() < 0.5)
                print(f"  broker restarted at {counter[0]} events", flush=True)
            elif fault == "agent":
                t = rng.choice(terms)
                t.kill()
                time.sleep(0.2)
                t.start()
                print(f"  agent {t.tid} killed -9 and restarted at {counter[0]} events", flush=True)
            else:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                time.sleep(0.5)
                server = st.server_process()
                print(f"  server killed -9 and restarted at {counter[0]} events", flush=True)
        for w in workers:
            w.join()
        produce_s = time.monotonic() - t0

        def sessions() -> set[str]:
            with sqlite3.connect(st.settings.db_path) as conn:
                return {r[0] for r in conn.execute("SELECT json_extract(body,'$.session') FROM events")}

        try:
            wait_for(lambda: acked <= sessions(), 300, interval_s=1.0, what="every acknowledged event stored")
        except TimeoutError as err:
            print(f"  {err}")
        with sqlite3.connect(st.settings.db_path) as conn:
            # business events only: agents also send their own telemetry samples (no session)
            rows = conn.execute("SELECT count(*) FROM events WHERE type LIKE 'service.%'").fetchone()[0]
            distinct = conn.execute(
                "SELECT count(DISTINCT json_extract(body,'$.session')) FROM events WHERE type LIKE 'service.%'"
            ).fetchone()[0]
        stored_sessions = sessions()
        for t in terms:
            t.kill()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        st.close()
    lost = len(acked - stored_sessions)
    print(
        f"{len(acked)} events acknowledged to kiosks in {produce_s:.0f}s at {n_term} terminals "
        f"({broker_restarts} broker restarts, {kills} agent kills, {server_kills} server kills); "
        f"{rows} rows stored, {lost} lost, {rows - distinct} duplicates, {len(doubt)} in doubt "
        f"(no answer before a kill; {len(doubt & stored_sessions)} of them stored) — {machine()}"
    )
    emit(
        {
            "events": len(acked),
            "stored": len(acked & stored_sessions),
            "lost": lost,
            "duplicates": rows - distinct,
            "in_doubt": len(doubt),
            "terminals": n_term,
            "broker_restarts": broker_restarts,
            "agent_kills": kills,
            "server_kills": server_kills,
        }
    )


if __name__ == "__main__":
    main()
