"""Rollout engine benchmark: the real engine (RolloutService over a real SQLite file migrated by
the server) drives a four-wave rollout over 10,000 terminals to the end, one tick at a time.

Stand-ins, named as such: the terminals are a *simulated population* that answers each command
by writing `update.status` events through the real event store (IngestStore.write, as the ingest
does), one state per tick; the *publisher counts* commands instead of sending them to a broker;
the health snapshot says every terminal is online and healthy. The engine, its SQL and its
tables are the real ones.

Same-run baseline: each tick also times the bare reads any engine must do at that moment (every
terminal row of the live rollout, and the events stored since the last tick), so the engine's
own cost is the difference.

    python bench/rollout.py --quick

Sections: `control_loop` (this one) and `end_to_end` (bench/rollout_e2e.py: six agents under
their launchers in three offices, a real broker and `fleet-server run`; a good release through
three waves and a bad one that must halt at the canary); both report in the one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from fleet_dev.bench import emit, machine
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
from fleet_wire.release import decode_desired

STEPS = ["notified", "downloading", "downloaded", "installing", "on_trial", "committed"]
RELEASE = Release("agent/7/kiosk_fleet_agent-2.0.0-py3-none-any.whl", "agent", "2.0.0", 7, ("generic",))


class CountingPublisher:
    """Stands in for the broker: counts each command and hands it to the simulated population."""

    def __init__(self) -> None:
        self.sent = 0
        self.inbox: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.sent += 1
        self.inbox.append((topic, payload))


class Population:
    """Simulated terminals: each takes one step per tick after its command, reported as an
    update.status event stored through the real event store."""

    def __init__(self, store: IngestStore, offices: dict[str, str]) -> None:
        self.store = store
        self.offices = offices
        self.jobs: dict[str, dict[str, Any]] = {}  # terminal -> the command it works on
        self.seq: dict[str, int] = {}

    def take(self, inbox: list[tuple[str, bytes]]) -> None:
        for topic, payload in inbox:
            tid = topics.parse(topic).terminal_id
            cmd = decode_desired(payload)
            job = self.jobs.get(tid)
            if job is None or job["cmd"] != cmd.id:
                self.jobs[tid] = {"cmd": cmd.id, "doc": cmd, "step": 0}
        inbox.clear()

    def step(self) -> int:
        now = format_ts(datetime.now(UTC))
        rows = []
        for tid, job in self.jobs.items():
            if job["step"] >= len(STEPS):
                continue
            cmd = job["doc"]
            job["step"] += 1
            seq = self.seq[tid] = self.seq.get(tid, 0) + 1
            body = {
                "rollout": cmd.rollout,
                "cmd": cmd.id,
                "kind": cmd.kind,
                "target": cmd.target,
                "version": cmd.version,
                "counter": cmd.counter,
                "state": STEPS[job["step"] - 1],
                "report": job["step"],
                "reason": "ok",
                "detail": "",
                "running": "1.0.0",
                "metadata_expires": None,
            }
            rows.append(
                (
                    tid,
                    "e1",
                    seq,
                    uuid.uuid4().hex,
                    "update.status",
                    now,
                    now,
                    self.offices[tid],
                    json.dumps(body, separators=(",", ":")),
                )
            )
        if rows:
            self.store.write(rows, (), (), ())
        return len(rows)


def _baseline(db: Path, upto: int) -> tuple[float, int]:
    """The bare reads of one tick: every terminal row of the rollout, and the new events."""
    with connect(db, readonly=True) as conn:
        t0 = time.perf_counter()
        conn.execute("SELECT * FROM rollout_terminals").fetchall()
        rows = conn.execute(
            "SELECT rowid, terminal, body FROM events WHERE rowid > ? ORDER BY rowid", (upto,)
        ).fetchall()
        return time.perf_counter() - t0, (rows[-1][0] if rows else upto)


def control_loop(args: argparse.Namespace) -> dict[str, Any]:
    n = args.terminals
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        db = Path(tmp) / "fleet.db"
        migrate(db, rollout_store.migrations)
        offices = {
            o.id: OfficeRef(o.id, o.name, o.pilot, o.timezone, o.maintenance)
            for o in read_offices_file(SEED_DIR / "offices.yaml")
        }
        ids = sorted(offices)
        terminals = [TerminalInfo(f"t-{i:05d}", ids[i % len(ids)], "generic") for i in range(n)]
        health = {t.id: TerminalCondition(True, online_since=0.0) for t in terminals}
        publisher = CountingPublisher()
        catalog = ReleaseCatalog()
        catalog.add(RELEASE)
        svc = RolloutService(
            str(db),
            releases=lambda: catalog,
            terminals=lambda: terminals,
            offices=lambda: offices,
            health=lambda: health,
            publish=publisher,
            audit=lambda *a: None,
            registry=CollectorRegistry(),
            settings=EngineSettings(resend_initial_s=3600, resend_max_s=3600),
        )
        from fleet_server.auth.models import Role, User

        plan = RolloutPlan.model_validate(
            {
                "id": "bench",
                "release": RELEASE.path,
                "window": "now",
                "waves": [
                    {"name": "canary", "size": {"count": 1}, "pilot_only": True},
                    {"name": "pilots", "pilot_only": True},
                    {"name": "quarter", "size": {"percent": 25}},
                    {"name": "everyone"},
                ],
            }
        )
        t0 = time.perf_counter()
        svc.create(plan, User("bench", Role.ADMIN))
        create_s = time.perf_counter() - t0
        ingest_conn = connect(db)
        population = Population(IngestStore(ingest_conn), {t.id: t.office for t in terminals})
        ticks: list[float] = []
        baselines: list[float] = []
        busy: list[tuple[float, int, int]] = []  # (seconds, reports, sends) of ticks that did work
        upto = 0
        print(
            f"rollout of {n:,} terminals over 4 waves: real engine and SQLite; simulated population"
            " (one step per tick through the real event store); a counting publisher instead of a broker",
            flush=True,
        )
        for _ in range(args.max_ticks):
            base_s, upto = _baseline(db, upto)
            sent_before = publisher.sent
            stats = svc.tick()
            ticks.append(stats.seconds)
            baselines.append(base_s)
            if stats.reports or publisher.sent > sent_before:
                busy.append((stats.seconds, stats.reports, publisher.sent - sent_before))
            population.take(publisher.inbox)
            population.step()
            if svc.get("bench")["state"] == "completed":
                break
        final = svc.get("bench")
        ingest_conn.close()
        svc.close()
    ms = sorted(t * 1000 for t in ticks)
    worst = max(busy) if busy else (0.0, 0, 0)
    result = {
        "terminals": n,
        "state": final["state"],
        "committed": final["states"].get("committed", 0),
        "ticks": len(ticks),
        "commands_counted": publisher.sent,
        "create_ms": round(create_s * 1000, 1),
        "tick_ms_median": round(statistics.median(ms), 2),
        "tick_ms_p90": round(ms[int(len(ms) * 0.9) - 1], 2),
        "tick_ms_max": round(ms[-1], 2),
        "worst_tick": {"ms": round(worst[0] * 1000, 2), "reports": worst[1], "sends": worst[2]},
        "baseline_reads_ms_median": round(statistics.median(baselines) * 1000, 2),
        "publisher": "counting (no broker)",
    }
    print(
        f"  {final['state']}: {result['committed']:,} of {n:,} committed in {len(ticks)} ticks;"
        f" tick median {result['tick_ms_median']} ms, p90 {result['tick_ms_p90']} ms, max {result['tick_ms_max']} ms"
        f" (worst: {worst[1]:,} reports and {worst[2]:,} sends); bare reads of the same rows"
        f" {result['baseline_reads_ms_median']} ms (median); target ≤ 1000 ms — {machine()}",
        flush=True,
    )
    return result


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """A small real fleet end to end (bench/rollout_e2e.py, the harness of the e2e tests)."""
    from rollout_e2e import run  # bench/ is on sys.path when this runs as a script

    return run(args.quick)


SECTIONS: list[tuple[str, Callable[[argparse.Namespace], dict[str, Any]]]] = [
    ("control_loop", control_loop),
    ("end_to_end", end_to_end),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="the control loop over 10,000 terminals; 6 real agents end to end"
    )
    p.add_argument("--terminals", type=int, default=10_000)
    p.add_argument("--max-ticks", type=int, default=200)
    args = p.parse_args()
    result: dict[str, Any] = {}
    for name, section in SECTIONS:
        out = section(args)
        if name in ("control_loop", "end_to_end"):
            result.update(out)  # top-level: terminals, tick_ms_median, …, e2e_terminals, rollout_s, …
        else:
            result[name] = out
    emit(result)


if __name__ == "__main__":
    main()
