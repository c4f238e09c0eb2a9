"""The server's MQTT client: one persistent session that subscribes to every terminal's uplink.

Messages are acknowledged by hand (paho `manual_ack`) only after the writer committed them.

MQTT 3.1.1, not 5: paho parses every MQTT 5 packet's properties in Python, and as a subscriber
at 10,000 terminals' heartbeats it cost 20-30% more CPU over MQTT 5 (measured). The server uses
nothing MQTT 5 adds: a 3.1.1 persistent session (clean session off) keeps the subscriptions and
every unacknowledged QoS 1 message across reconnects just as a v5 session with an expiry does,
and never expires (Mosquitto keeps it until `persistent_client_expiration`, unset by default),
so a server away for longer than a day still finds what the broker queued for it. What 3.1.1
lacks is the CONNECT "receive maximum": the broker's `max_inflight_messages` (Mosquitto's
default 20) bounds how many QoS 1 messages it sends us before our acknowledgements.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet_server.ingest.service import Inbound, IngestService
from fleet_wire import topics
from fleet_wire.topics import Channel

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
# After the last queued message is handed over, paho's thread waits this long before it blocks
# on the socket again, so the next messages are read in one wake-up instead of one each. At
# 10,000 terminals' heartbeats (333 msg/s, one every 3 ms) a wake-up per message was most of
# the link's CPU: a paho subscriber used 0.059-0.072 of a core without the pause, 0.025-0.027
# with 20 ms (0.039 with 10 ms), measured side by side. 20 ms is the writer's own group-commit
# wait (BATCH_WAIT_S), so a receipt is late by at most as much again; under load the socket is
# never drained and nothing waits.
READ_PAUSE_S = 0.02


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
        self._stopping = False
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,  # the persistent session: see the module docstring
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
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def _publish(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        """Send a downlink message (QoS 1) to a terminal's topic; queued by paho while disconnected."""
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
        if self._stopping:
            log.info("ingest disconnected on shutdown")
        else:
            log.warning("ingest disconnected: %s", reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self.ingest.submit(Inbound(message.topic, bytes(message.payload), message.mid, message.qos))
        except Exception:
            log.exception("could not queue message from %s", message.topic)
        self._pause_when_drained(client)

    def _pause_when_drained(self, client: paho.Client) -> None:
        """Let the next messages gather in the socket before paho blocks on it (READ_PAUSE_S)."""
        sock: Any = client.socket()
        if sock is None or self._stopping:
            return
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, unseen by select
        try:
            if (pending is not None and pending()) or select.select([sock], [], [], 0)[0]:
                return
        except (OSError, ValueError):  # the socket closed under us: paho reports the loss itself
            return
        time.sleep(READ_PAUSE_S)
