"""Ingest benchmark: heartbeats and events of 10,000 simulated terminals through Mosquitto into
the fleet server (a load generator publishes on their behalf), against a raw paho subscriber on
the same broker in the same run; then the server's CPU at 10k terminals × one heartbeat per 30 s.

    python bench/ingest.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet_dev.bench import emit, machine
from fleet_dev.devstack import DevStack
from fleet_dev.proc import free_port, wait_for
from fleet_server.broker.mosquitto import hash_password
from fleet_server.db import connect

OFFICES = ["dongcheng", "haidian", "chaoyang", "mentougou", "miyun", "loan-centre", "xicheng", "fengtai"]


# the baselines subscribe over the protocol the server's ingest link speaks, so that they
# measure the same MQTT parsing (over MQTT 5 paho costs 20-30% more CPU per message)
SERVER_PROTOCOL = MQTTProtocolVersion.MQTTv311


def client(st: DevStack, cid: str, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid, protocol=protocol)
    c.username_pw_set(st.settings.broker_username, st.server_password)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", st.port)
    c.loop_start()
    return c


def messages(tids: list[str], n: int, prefix: str) -> list[tuple[str, bytes]]:
    """n messages: mostly heartbeats, one in five a one-event batch, spread over the terminals."""
    out = []
    epochs = {t: uuid.uuid4().hex for t in tids}
    seqs = dict.fromkeys(tids, 0)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    for i in range(n):
        t = tids[i % len(tids)]
        if i % 5 == 4:
            seqs[t] += 1
            env = {
                "v": 1,
                "terminal": t,
                "epoch": epochs[t],
                "seq": seqs[t],
                "id": uuid.uuid4().hex,
                "ts": now,
                "type": "service.completed",
                "body": {"session": f"{t}-{seqs[t]}", "service_code": "TQ02", "duration_s": 95.0},
            }
            out.append((f"{prefix}/t/{t}/events", json.dumps({"v": 1, "events": [env]}).encode()))
        else:
            doc = {
                "state": "online",
                "ts": now,
                "version": "0.1.0",
                "hb_interval_s": 30,
                "uptime_s": 1200.0,
                "outbox": {"depth": 0, "oldest_age_s": 0.0},
                "peripherals": {"camera": "ok"},
                "disk_pct": 41.0,
            }
            out.append((f"{prefix}/t/{t}/status", json.dumps(doc).encode()))
    return out


def publish_all(c: paho.Client, msgs: list[tuple[str, bytes]], retain_status: bool) -> None:
    infos = [c.publish(t, p, qos=1, retain=retain_status and t.endswith("/status")) for t, p in msgs]
    for info in infos[-200:]:
        info.wait_for_publish(60)


RAW_SUBSCRIBER = """
import sys, paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-raw-cpu",
                protocol=MQTTProtocolVersion(int(sys.argv[4])))
c.username_pw_set(sys.argv[1], sys.argv[2])
c.on_connect = lambda cl, *a: cl.subscribe("fleet/v1/bench/t/+/status", qos=0)
c.connect("127.0.0.1", int(sys.argv[3]))
c.loop_forever()
"""


def steady(
    pub: paho.Client, beats: list[tuple[str, bytes]], per_s: float, pid: int, warm_s: float, measure_s: float
) -> float:
    """Publish heartbeats at `per_s` for warm_s + measure_s; CPU share of `pid` over the last part."""
    w0 = time.perf_counter()
    cpu0 = w_measure = None
    i = 0
    while True:
        now = time.perf_counter()
        if cpu0 is None and now - w0 >= warm_s:
            cpu0, w_measure = cpu_seconds(pid), now
        if now - w0 >= warm_s + measure_s:
            break
        t, payload = beats[i % len(beats)]
        delay = w0 + i / per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.publish(t, payload, qos=1, retain=True)
        i += 1
    assert cpu0 is not None and w_measure is not None
    return (cpu_seconds(pid) - cpu0) / (time.perf_counter() - w_measure)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--terminals", type=int, default=10_000)
    args = p.parse_args()
    n_msgs = 50_000 if args.quick else 200_000
    steady_s = 20.0 if args.quick else 60.0
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        st = DevStack(Path(tmp), max_queued_messages=1_000_000)
        assert st.server is not None
        tids = [f"sim-{i:05d}" for i in range(args.terminals)]
        print(f"enrolling {len(tids)} terminals …", flush=True)
        h = hash_password("unused-in-this-bench")  # the load generator publishes for them
        with st.server.lock:
            conn = st.server._conn
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO terminals (id, office_id, profile, tags, password_hash, enabled,"
                " created_at) VALUES (?,?,?,?,?,1,?)",
                [
                    (t, OFFICES[i % len(OFFICES)], "generic", "[]", h, "2026-01-01T00:00:00Z")
                    for i, t in enumerate(tids)
                ],
            )
            conn.execute("COMMIT")
        st.start_broker()
        st.stop_server()  # the server runs as its own process below, so its CPU can be measured

        # 1. baseline: a raw paho subscriber on the same broker, same messages
        base_msgs = messages(tids, n_msgs, "fleet/v1/bench")
        got = [0]
        last = [0.0]
        done = threading.Event()

        def on_message(c: Any, u: Any, m: Any) -> None:
            got[0] += 1
            last[0] = time.perf_counter()
            if got[0] >= n_msgs:
                done.set()

        sub = client(st, "bench-raw-sub", SERVER_PROTOCOL)
        sub.on_message = on_message
        sub.subscribe("fleet/v1/bench/#", qos=1)
        time.sleep(0.5)
        pub = client(st, "bench-pub")
        print(f"baseline: {n_msgs} messages to a raw paho subscriber …", flush=True)
        t0 = time.perf_counter()
        publish_all(pub, base_msgs, retain_status=False)
        done.wait(120)
        baseline = got[0] / (last[0] - t0)
        sub.disconnect()
        sub.loop_stop()

        # 2. the fleet server (own process): same messages, until every one is processed
        port = free_port()
        server = st.server_process(http_port=port)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}")
        wait_for(lambda: _ok(http), 30, what="server up")
        real_msgs = messages(tids, n_msgs, "fleet/v1")
        n_events = sum(1 for t, _ in real_msgs if t.endswith("/events"))
        n_status = n_msgs - n_events
        print(f"fleet server: {n_msgs} messages ({n_status} heartbeats, {n_events} events) …", flush=True)
        t0 = time.perf_counter()
        publish_all(pub, real_msgs, retain_status=True)

        def processed() -> bool:
            m = http.get("/metrics").text
            return (
                _sample(m, "fleet_status_messages_total") >= n_status
                and _sample(m, "fleet_events_ingested_total") >= n_events
            )

        wait_for(processed, 300, interval_s=0.05, what="all messages processed")
        rate = n_msgs / (time.perf_counter() - t0)
        with connect(st.settings.db_path, readonly=True) as conn:
            stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]

        # 3. steady state: 10k terminals, one heartbeat each per 30 s. One full cycle first, so that
        # every terminal is on its own 30 s rhythm (no state changes), then measure. Same-run
        # baseline: a bare paho subscriber (another process) receiving the same stream.
        per_s = args.terminals / 30.0
        warm_s = 30.0
        print(
            f"steady state: {per_s:.0f} heartbeats/s, {warm_s:.0f} s to settle, then {steady_s:.0f} s "
            "measuring the server's CPU …",
            flush=True,
        )
        beats = [m for m in messages(tids, args.terminals * 5 // 4, "fleet/v1") if m[0].endswith("/status")]
        cpu_share = steady(pub, beats, per_s, server.pid, warm_s, steady_s)
        raw = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RAW_SUBSCRIBER,
                st.settings.broker_username,
                st.server_password,
                str(st.port),
                str(SERVER_PROTOCOL.value),
            ],
            start_new_session=True,
        )
        bench_beats = [(t.replace("fleet/v1/", "fleet/v1/bench/", 1), p) for t, p in beats]
        raw_cpu_share = steady(pub, bench_beats, per_s, raw.pid, 3.0, steady_s)
        raw.kill()
        raw.wait()
        pub.disconnect()
        pub.loop_stop()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
        st.close()
    print(
        f"ingest: {rate:,.0f} msg/s through the server vs {baseline:,.0f} msg/s to a raw subscriber "
        f"({n_msgs} messages from {args.terminals} terminals; {stored} events stored of {n_events}); "
        f"steady 10k terminals × 1 heartbeat/30 s: {cpu_share:.3f} of one core "
        f"(a bare paho subscriber of the same stream: {raw_cpu_share:.3f}) — {machine()}"
    )
    emit(
        {
            "rate": round(rate, 1),
            "baseline_rate": round(baseline, 1),
            "ratio": round(rate / baseline, 3),
            "cpu_share_at_10k_terminals_30s_heartbeat": round(cpu_share, 4),
            "baseline_cpu_share_raw_subscriber": round(raw_cpu_share, 4),
            "baseline_protocol": {MQTTProtocolVersion.MQTTv311: "3.1.1", MQTTProtocolVersion.MQTTv5: "5"}[
                SERVER_PROTOCOL
            ],
            "messages": n_msgs,
            "events_stored": stored,
            "events_sent": n_events,
            "terminals": args.terminals,
        }
    )


def _ok(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").json().get("ok") is True
    except (httpx.HTTPError, ValueError):
        return False


def _sample(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name) and not line.startswith(name + "_created"):
            total += float(line.rsplit(" ", 1)[1])
    return total


if __name__ == "__main__":
    main()
