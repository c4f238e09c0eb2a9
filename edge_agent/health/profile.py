"""The device profile as the agent reads it: its peripherals and their check thresholds.

The fleet server validates whole profiles strictly (`fleet_server.registry.profiles`); the agent
only needs ids, kinds, probe intervals and thresholds, and must not import the server. Fields the
agent does not use (model, params, vendor…) are ignored here, not refused: a profile the server
accepted must never stop a terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleet_wire.profile_checks import (
    HOST_CHECKS,
    PERIPHERAL_CHECKS,
    ProfileCheckError,
    Threshold,
    thresholds,
)

HOST_ID = "host"
DEFAULT_PROBE_INTERVAL_S = 60.0  # the server's profile schema default
HOST_PROBE_INTERVAL_S = 30.0
# A terminal without a profile file still judges its host, by these (the `generic` profile's).
BUILTIN_HOST = {
    "disk_used_ratio": {"warn": 0.80, "fail": 0.92},
    "memory_used_ratio": {"warn": 0.85, "fail": 0.95},
    "cpu_temp_c": {"warn": 75, "fail": 88},
}


class ProfileUnusable(ValueError):
    """The profile file cannot be read or its checks make no sense; the message says which."""


@dataclass(frozen=True, slots=True)
class PeripheralSpec:
    """One thing the agent judges: a profile peripheral, or the host itself (id `host`)."""

    id: str
    kind: str
    required: bool
    probe_interval_s: float
    checks: dict[str, Threshold]


@dataclass(frozen=True, slots=True)
class AgentProfile:
    id: str
    heartbeat_interval_s: float | None
    host: PeripheralSpec
    peripherals: tuple[PeripheralSpec, ...] = field(default_factory=tuple)

    def spec(self, peripheral_id: str) -> PeripheralSpec | None:
        """The peripheral with this id (or the host), None if the model has none."""
        if peripheral_id == HOST_ID:
            return self.host
        return next((p for p in self.peripherals if p.id == peripheral_id), None)

    def of_kind(self, kind: str) -> list[PeripheralSpec]:
        return [p for p in self.peripherals if p.kind == kind]


def _host(raw: Any, where: str) -> PeripheralSpec:
    return PeripheralSpec(HOST_ID, HOST_ID, True, HOST_PROBE_INTERVAL_S, thresholds(HOST_CHECKS, raw, where))


BUILTIN_PROFILE = AgentProfile("builtin", None, _host(BUILTIN_HOST, "host"))


def parse_agent_profile(data: Any, source: str) -> AgentProfile:
    """Build the agent's view of one profile document (already parsed YAML)."""
    try:
        if not isinstance(data, dict):
            raise ProfileUnusable("a profile must be a mapping of fields")
        pid = data.get("id")
        if not isinstance(pid, str) or not pid:
            raise ProfileUnusable("the profile has no id")
        hb = data.get("heartbeat_interval_s")
        heartbeat = float(hb) if isinstance(hb, int | float) and not isinstance(hb, bool) else None
        host = _host(data.get("host"), "host")
        raw_peripherals = data.get("peripherals") or []
        if not isinstance(raw_peripherals, list):
            raise ProfileUnusable("peripherals: expected a list")
        specs: list[PeripheralSpec] = []
        for i, raw in enumerate(raw_peripherals):
            where = f"peripherals[{i}]"
            if not isinstance(raw, dict):
                raise ProfileUnusable(f"{where}: expected a mapping")
            kind, ident = raw.get("kind"), raw.get("id")
            if kind not in PERIPHERAL_CHECKS:
                raise ProfileUnusable(f"{where}.kind: unknown peripheral kind {kind!r}")
            if not isinstance(ident, str) or not ident or ident == HOST_ID or any(s.id == ident for s in specs):
                raise ProfileUnusable(f"{where}.id: {ident!r} is missing, reserved or used twice")
            interval = raw.get("probe_interval_s", DEFAULT_PROBE_INTERVAL_S)
            if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
                raise ProfileUnusable(f"{where}.probe_interval_s: {interval!r} is not a positive number")
            checks = thresholds(PERIPHERAL_CHECKS[kind], raw.get("checks"), f"{where}.checks")
            specs.append(PeripheralSpec(ident, kind, bool(raw.get("required", True)), float(interval), checks))
        return AgentProfile(pid, heartbeat, host, tuple(specs))
    except (ProfileCheckError, ProfileUnusable) as err:
        raise ProfileUnusable(f"{source}: {err}") from None


def load_agent_profile(path: Path | str) -> AgentProfile:
    """Read the device profile file the provisioning playbook installed on this terminal."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileUnusable(f"{path}: cannot read the device profile: {err}") from err
    except yaml.YAMLError as err:
        raise ProfileUnusable(f"{path}: the device profile is not valid YAML: {err}") from err
    return parse_agent_profile(data, str(path))
