"""The terminal's one MQTT connection to the centre."""

from edge_agent.link.backoff import Backoff
from edge_agent.link.mqtt import LinkEvent, LinkSettings, MqttLink

__all__ = ["Backoff", "LinkEvent", "LinkSettings", "MqttLink"]
