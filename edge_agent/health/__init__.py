"""Peripheral and host health judged by the terminal's device profile.

`profile` reads the profile the terminal was provisioned with, `evaluate` judges readings against
its thresholds (pure), `probes` measures the host and the camera, `monitor` keeps the latest
readings, runs the probes off the pump thread and answers for the heartbeat and `/v1/health`.
"""

from edge_agent.health.monitor import HealthMonitor, ReadingRefused
from edge_agent.health.profile import AgentProfile, PeripheralSpec, ProfileUnusable, load_agent_profile

__all__ = ["AgentProfile", "HealthMonitor", "PeripheralSpec", "ProfileUnusable", "ReadingRefused", "load_agent_profile"]
