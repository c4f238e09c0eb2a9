"""The terminal's one MQTT connection to the centre."""

from edge_agent.link.backoff import Backoff
from edge_agent.link.mqtt import LinkEvent, MqttLink, LinkSettings

__all__ = ["Backoff", "LinkEvent", "MqttLink", "LinkSettings"]
