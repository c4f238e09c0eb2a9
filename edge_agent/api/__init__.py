"""The agent's local HTTP API for the kiosk app (bound to loopback)."""

from edge_agent.api.app import create_api

__all__ = ["create_api"]
