"""The agent's MQTT client: connection lifecycle only. Callbacks from paho's thread hand events to
the owner's queue (`on_event`) and return at once; nothing here touches the outbox."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.link.backoff import Backoff
from fleet_wire import topics
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # broker keeps our session (and queued receipts) a week
KEEPALIVE_S = 30


@dataclass(frozen=True, slots=True)
class LinkSettings:
    terminal_id: str
    host: str
    port: int
    username: str
    password: str
    keepalive_s: int = KEEPALIVE_S
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    tls_ca: str | None = None


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """Something that happened on the link: kind is connected, disconnected, puback or message."""

    kind: str
    session_present: bool = False
    mid: int = 0
    accepted: bool = True
    topic: str = ""
    payload: bytes = b""
    reason: str = ""


class MqttLink:
    """One persistent MQTT 5 session to the broker, with its own reconnect loop."""

    def __init__(
        self,
        settings: LinkSettings,
        on_event: Callable[[LinkEvent], None],
        *,
        birth: Callable[[], dict[str, Any]] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._birth = birth or (lambda: {})
        self._backoff = backoff or Backoff(settings.backoff_base_s, settings.backoff_cap_s)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self.auth_failures = 0
        self.last_error = ""
        self._status_topic = topics.topic(settings.terminal_id, Channel.STATUS)
        self._client = self._build_client()

    # -- public --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"link-{self.settings.terminal_id}", daemon=True)
        self._thread.start()

    def stop(self, graceful: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the link; graceful publishes an `offline` status (no Last Will) first."""
        if graceful and self.connected:
            try:
                info = self._client.publish(
                    self._status_topic, json.dumps({"state": "offline", "reason": "shutdown"}), qos=1, retain=True
                )
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self._stop.set()
        try:
            self._client.disconnect()
        except Exception:
            pass
        if self._thread:
            self._thread.join(timeout_s)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to the client; returns its mid, or None if it was not queued."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        # For QoS > 0 paho keeps the message in its session store whatever the socket said
        # (no connection, connection lost…) and re-sends it after reconnecting; only a full
        # client queue means it was not kept.
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS):
            log.warning("publish to %s not queued: %s", topic, paho.error_string(info.rc))
            return None
        return info.mid

    def publish_status(self, doc: dict[str, Any]) -> None:
        """Publish the retained status document (birth or heartbeat)."""
        self.publish(self._status_topic, json.dumps(doc, separators=(",", ":")), qos=1, retain=True)

    # -- internals -----------------------------------------------------------------------------

    def _build_client(self) -> paho.Client:
        s = self.settings
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.terminal_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.username_pw_set(s.username, s.password)
        if s.tls_ca:
            client.tls_set(ca_certs=s.tls_ca)
        client.will_set(
            self._status_topic, json.dumps({"state": "offline", "reason": "connection_lost"}), qos=1, retain=True
        )
        # paho's own in-memory queue is bounded far below its 65,535 limit by our send window.
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _run(self) -> None:
        s = self.settings
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho ships no annotations here
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self._client.connect(s.host, s.port, s.keepalive_s, clean_start=False, properties=props)
                else:
                    self._client.reconnect()
                first = False
            except (OSError, ValueError) as err:
                self.last_error = f"cannot reach broker {s.host}:{s.port}: {err}"
                self._sleep_backoff()
                continue
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.5)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            if self._connected.is_set():
                self._connected.clear()
                self._emit(LinkEvent("disconnected", reason="loop ended"))
            if not self._stop.is_set():
                self._sleep_backoff()

    def _sleep_backoff(self) -> None:
        self._stop.wait(self._backoff.next_delay())

    def _emit(self, event: LinkEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("link event handler failed for %s", event.kind)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            if reason_code.value in (134, 135):  # bad user name or password / not authorized
                self.auth_failures += 1
                log.error(
                    "broker refused terminal %s credentials (%s); check its enrolment",
                    self.settings.terminal_id,
                    reason_code,
                )
            return
        self._backoff.reset()
        self.last_error = ""
        tid = self.settings.terminal_id
        client.subscribe([(topics.topic(tid, Channel.RECEIPT), 1), (topics.topic(tid, Channel.CMD), 1)])
        birth = {"state": "online", **self._birth()}
        client.publish(self._status_topic, json.dumps(birth, separators=(",", ":")), qos=1, retain=True)
        if not self._connected.is_set():
            self._connected.set()
            self.reconnects += 1
        self._emit(LinkEvent("connected", session_present=bool(flags.session_present)))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self._emit(LinkEvent("disconnected", reason=str(reason_code)))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        accepted = not getattr(reason_code, "is_failure", False)
        self._emit(LinkEvent("puback", mid=mid, accepted=accepted, reason=str(reason_code)))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._emit(LinkEvent("message", topic=message.topic, payload=bytes(message.payload)))
