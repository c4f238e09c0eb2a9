"""Helpers shared by the benchmarks: a raw paho baseline on the same broker, result printing."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def raw_qos1_rate(port: int, username: str, password: str, n: int, size: int) -> float:
    """Messages/s for plain paho QoS1 publish → Mosquitto → one subscriber, n messages of `size` bytes."""
    got = threading.Event()
    count = [0]
    first: list[float] = []
    last = [0.0]

    def on_message(c: Any, u: Any, m: Any) -> None:
        count[0] += 1
        last[0] = time.perf_counter()
        if count[0] >= n:
            got.set()

    sub = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=MQTTProtocolVersion.MQTTv5
    )
    sub.username_pw_set(username, password)
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("fleet/v1/bench/raw", qos=1)
    subscribed.wait(10)
    pub = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=MQTTProtocolVersion.MQTTv5
    )
    pub.username_pw_set(username, password)
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    payload = os.urandom(size // 2).hex().encode()[:size]
    first.append(time.perf_counter())
    for _ in range(n):
        pub.publish("fleet/v1/bench/raw", payload, qos=1)
    # the broker may drop messages for a slow subscriber (max_queued_messages): stop when quiet
    seen = -1
    while not got.wait(1.0) and count[0] != seen:
        seen = count[0]
    elapsed = last[0] - first[0]
    if count[0] < n:
        print(f"  (baseline subscriber received {count[0]} of {n}; the broker dropped the rest)", flush=True)
    for c in (pub, sub):
        c.disconnect()
        c.loop_stop()
    return count[0] / elapsed


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last line: one JSON object."""
    print(json.dumps(result, ensure_ascii=False), flush=True)


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
