"""The rollout bench's end-to-end section: a small real fleet (Mosquitto, `fleet-server run`, agents
under their launchers from release venvs built from real wheels, in three offices, citizen events
posted all along) takes a good release through three waves and a bad one (fails its health gate)
that must halt at the canary. The harness is the one of tests/test_rollout_e2e.py
(fleet_dev.rollout_demo.RolloutFleet).

Figures: how long the good rollout took (`rollout_s`) against the sum of its waves' soak times
(`soak_s_total`, time the plan asks to wait), so the difference is our machinery: commands,
downloads, release venv builds, restarts, health gates. As a same-run baseline for the biggest
part of it, `venv_build_s_median` is how long provisioning took to build one terminal's first
release venv in this run.

    python bench/rollout.py --quick          (this section runs after the control loop)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fleet_dev.dist import build
from fleet_dev.proc import wait_for
from fleet_dev.rollout_demo import STALL_S, CitizenTraffic, RolloutFleet, three_waves

OFFICES = ["dongcheng", "haidian", "xicheng"]  # two pilot offices and one other


def run(quick: bool) -> dict[str, Any]:
    per_office = 2 if quick else 3
    soak_s = 2.0 if quick else 5.0
    layout = {f"{o[:2]}-{i:02d}": o for o in OFFICES for i in range(1, per_office + 1)}
    with tempfile.TemporaryDirectory(prefix="bench-rollout-e2e-") as tmp:
        work = Path(tmp)
        built = build(work / "dist")
        fleet = RolloutFleet(work / "fleet", built)
        traffic = CitizenTraffic()
        try:
            fleet.start(layout)
            installs = []
            for tid in layout:
                t0 = time.perf_counter()
                t = fleet.install(tid)
                installs.append(time.perf_counter() - t0)
                t.start()
                traffic.serve(t)
            for tid in layout:
                wait_for(lambda tid=tid: fleet.heartbeat_version(tid) == "1.0.0", STALL_S, 0.2, what=f"{tid} online")
            traffic.start()
            fleet.publish("1.0.0")
            good = fleet.publish("1.1.0")
            bad = fleet.publish("1.2.0", defect="gate_fails")
            print(
                f"end to end: {len(layout)} agents under their launchers in {len(OFFICES)} offices, real broker,"
                f" fleet-server run, TUF; soak {soak_s:g} s per wave; one release venv built in"
                f" {statistics.median(installs):.1f} s (median of provisioning)",
                flush=True,
            )

            plan = three_waves(good.path, soak_s=soak_s, rollout_id="bench-good")
            t0 = time.monotonic()
            rid = fleet.create_rollout(plan)
            doc = fleet.wait_rollout(rid)
            rollout_s = time.monotonic() - t0
            terms = fleet.rollout_terminals(rid)
            committed = [t["terminal"] for t in terms if t["state"] == "committed"]
            on_new = [tid for tid in layout if fleet.heartbeat_version(tid) == "1.1.0"]

            t0 = time.monotonic()
            brid = fleet.create_rollout(three_waves(bad.path, soak_s=soak_s, rollout_id="bench-bad"))
            bdoc = fleet.wait_rollout(brid)
            halt_s = time.monotonic() - t0
            time.sleep(3)  # a few more engine ticks: nothing may go out past the canary
            waves = fleet.wave_of(brid)
            wheel = bad.path.rpartition("/")[2]
            outside = [t for t, w in waves.items() if w != 1 and (fleet.reports(t, brid) or fleet.downloaded(t, wheel))]
            canary = next(t for t, w in waves.items() if w == 1)
            wait_for(lambda: fleet.heartbeat_version(canary) == "1.1.0", STALL_S, 0.5, what="canary rolled back")

            traffic.stop()
            for tid in layout:
                wait_for(lambda tid=tid: fleet.stored(tid) >= traffic.accepted[tid], 120, 0.2, what=f"{tid} drained")
            stored = sum(fleet.stored(tid) for tid in layout)
            doubled = sum(r - s for r, s in (fleet.stored_keys_unique(tid) for tid in layout))
        finally:
            traffic.stop()
            fleet.close()
    soak_total = sum(w["soak_s"] for w in plan["waves"])
    result = {
        "e2e_terminals": len(layout),
        "e2e_offices": len(OFFICES),
        "e2e_state": doc["state"],
        "e2e_committed": len(committed),
        "e2e_not_committed": len(layout) - len(committed),
        "e2e_heartbeat_on_new_version": len(on_new),
        "bad_release_halted": bdoc["state"] == "halted",
        "bad_release_reason": bdoc["reason"],
        "bad_release_downloads_outside_canary": len(outside),
        "bad_release_halt_s": round(halt_s, 1),
        "rollout_s": round(rollout_s, 1),
        "soak_s_total": soak_total,
        "venv_build_s_median": round(statistics.median(installs), 2),
        "citizen_events_accepted": traffic.total,
        "citizen_events_stored": stored,
        "citizen_events_doubled": doubled,
    }
    print(
        f"  good release: {doc['state']}, {len(committed)} of {len(layout)} committed in {rollout_s:.1f} s"
        f" ({soak_total:g} s of it soak; one venv build {result['venv_build_s_median']} s);"
        f" bad release: {bdoc['state']} in {halt_s:.1f} s, {len(outside)} download(s) outside the canary;"
        f" citizen events {traffic.total} accepted, {stored} stored",
        flush=True,
    )
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv[1:]), ensure_ascii=False))
