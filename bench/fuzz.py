"""Fuzz benchmark: one terminal's broker credentials publish hostile payloads of every class (random
bytes, truncated JSON, wrong types, seq extremes, far seqs, fresh epochs, foreign terminal ids,
poisons, retained garbage, oversized, cmd/ack garbage, into other terminals' topics) while honest
terminals post events through their agents; then it tries to take over another terminal's and the
server's client id with the same credentials.

    python bench/fuzz.py --quick     # 10,000 payloads, 3 honest terminals

Accounting: every payload the broker delivered must be classified by the ingest (a counted reject,
or decoded with each event stored, a duplicate, quarantined or limited), and the database must hold
exactly the events the ingest says it stored: `unaccounted` counts the exceptions (must be 0).
`lost_in_transit` counts payloads PUBACKed by the broker that never reached the server (statuses
travel to the server at QoS 0). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fleet_dev.bench import emit, machine
from fleet_dev.devstack import DevStack
from fleet_dev.fuzz import run_round


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="10,000 payloads, under 90 s")
    p.add_argument("--payloads", type=int, default=0)
    p.add_argument("--honest", type=int, default=3)
    args = p.parse_args()
    n = args.payloads or (10_000 if args.quick else 100_000)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        # a deep queue for the server's session: a broker drop would hide what the ingest did
        # accounts in the dynamic-security plugin, as in production: each bound to its own client id
        st = DevStack(Path(tmp), max_queued_messages=200_000, accounts="dynsec")
        try:
            st.enrol("fuzz-00", "dongcheng")
            honest = [f"honest-{i:02d}" for i in range(args.honest)]
            for i, tid in enumerate(honest):
                st.enrol(tid, ["haidian", "chaoyang", "miyun"][i % 3])
            st.start_broker()
            st.start_server()
            assert st.server is not None and st.server.link.connected.wait(10)
            print(f"fuzzing with {n} payloads from fuzz-00, {len(honest)} honest terminals ({machine()}) …", flush=True)
            result = run_round(st, "fuzz-00", honest, n, log=lambda s: print(s, flush=True))
        finally:
            st.close()
    elapsed = time.monotonic() - t0
    print(f"classes: {result.pop('classes')}")
    r = result
    print(
        f"{r['fuzzed']} payloads in {elapsed:.1f}s: delivered {r['delivered']}, rejects counted"
        f" {r['rejected_counted']}, unaccounted {r['unaccounted']}, wrongly stored {r['wrongly_stored']};"
        f" honest {r['honest_sent']} sent, {r['honest_lost']} lost, receipt p99 {r['honest_receipt_p99_s']}s;"
        f" takeovers {r.pop('takeovers')}"
    )
    result["elapsed_s"] = round(elapsed, 1)
    emit(result)


if __name__ == "__main__":
    main()
