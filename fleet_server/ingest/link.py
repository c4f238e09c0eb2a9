"""The server's MQTT client: one persistent session that subscribes to every terminal's uplink.

Messages are acknowledged by hand (paho `manual_ack`) only after the writer committed them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet_server.ingest.service import Inbound, IngestService
from fleet_wire import topics
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class ServerLinkSettings:
    host: str
    port: int
    username: str
    password: str
    client_id: str = "fleet-server-ingest"
    tls_ca: str | None = None


class ServerLink:
    def __init__(self, settings: ServerLinkSettings, ingest: IngestService) -> None:
        self.settings = settings
        self.ingest = ingest
        self.connected = threading.Event()
        self.connects = 0
        self.last_error = ""
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        c.username_pw_set(settings.username, settings.password)
        if settings.tls_ca:
            c.tls_set(ca_certs=settings.tls_ca)
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c
        ingest.publish = self._publish
        ingest.ack = self._ack

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = 1000
        self._client.connect_async(
            self.settings.host, self.settings.port, keepalive=30, clean_start=False, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def _publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def _ack(self, mid: int, qos: int) -> None:
        self._client.ack(mid, qos)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the server: {reason_code}"
            log.error(self.last_error)
            return
        self.connects += 1
        self.last_error = ""
        # Status at QoS 0: a heartbeat superseded 30 s later is not worth an acknowledgement
        # round-trip each (it halved the server's CPU at 10k terminals), and the retained status
        # of every terminal is re-delivered on each (re)subscription anyway. Events stay QoS 1.
        client.subscribe(
            [
                (topics.subscription(Channel.EVENTS), 1),
                (topics.subscription(Channel.STATUS), 0),
                (topics.subscription(Channel.CMD_ACK), 1),
            ]
        )
        self.connected.set()
        log.info("ingest connected (session present: %s)", flags.session_present)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        if getattr(self, "_stopping", False):
            log.info("ingest disconnected on shutdown")
        else:
            log.warning("ingest disconnected: %s", reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.ingest.submit(Inbound(message.topic, bytes(message.payload), message.mid, message.qos))
        except Exception:
            log.exception("could not queue message from %s", message.topic)
