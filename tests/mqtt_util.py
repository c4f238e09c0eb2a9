"""A small real paho client for tests that must speak MQTT directly (spoofing, capturing)."""

from __future__ import annotations

import queue
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def connack(port: int, username: str, password: str, client_id: str, timeout_s: float = 10.0) -> Any:
    """One connection attempt (no reconnect); the broker's CONNACK reason code. Disconnects at once."""
    got: queue.Queue[Any] = queue.Queue()
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    c.username_pw_set(username, password)
    c.on_connect = lambda cl, u, flags, rc, props: got.put(rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        return got.get(timeout=timeout_s)
    finally:
        c.disconnect()
        c.loop_stop()


class RawClient:
    def __init__(
        self, port: int, username: str, password: str, *, v5: bool = True, client_id: str | None = None
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, Any] = {}
        self._acked = threading.Condition()
        self._connected = threading.Event()
        self.disconnected = threading.Event()  # set when the broker cuts (or we close) the connection
        self.connect_rc: Any = None
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        c.username_pw_set(username, password)
        c.on_connect = self._on_connect
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, bytes(m.payload)))
        c.on_publish = self._on_publish
        c.on_disconnect = lambda *a: self.disconnected.set()
        self.client = c
        c.connect("127.0.0.1", port)
        c.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("test client did not connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connect_rc = rc
        self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._acked:
            self.acks[mid] = rc
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> Any:
        """Publish and wait for the PUBACK; returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._acked:
            self._acked.wait_for(lambda: info.mid in self.acks, timeout=10)
            return self.acks.get(info.mid)

    def subscribe(self, topic: str) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes (a refusal is a failure code)."""
        done = threading.Event()
        codes: list[Any] = []

        def on_subscribe(client: Any, userdata: Any, mid: int, reason_codes: Any, props: Any) -> None:
            codes.extend(reason_codes)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=1)
        done.wait(10)
        return codes

    def drain(self, wait_s: float = 0.0) -> list[tuple[str, bytes]]:
        out = []
        try:
            out.append(self.messages.get(timeout=wait_s) if wait_s else self.messages.get_nowait())
            while True:
                out.append(self.messages.get_nowait())
        except queue.Empty:
            pass
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
