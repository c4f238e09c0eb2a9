"""The health-check part of a device profile, shared by the agent (which judges) and the server
(which validates the profiles and reports what the agent judged).

Pure data and arithmetic, no I/O. A profile check is `{warn: X, fail: Y}`; whether a higher or a
lower value is worse is fixed per check here, once, so both sides read the same thresholds the same
way. `fleet_server.registry.profiles` validates full profiles against typed models that must agree
with this table (a test holds them together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Direction(StrEnum):
    HIGHER_IS_WORSE = "higher"  # latency, error counts, fullness, temperature
    LOWER_IS_WORSE = "lower"  # frame rate, paper or toner left


class CheckState(StrEnum):
    """A peripheral's (or the host's) state as the agent reports it in its heartbeat."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    STALE = "stale"  # readings stopped arriving (kiosk app silent, probe hung)
    UNKNOWN = "unknown"  # nothing measured yet, or nothing can be measured (no camera source)


_H, _L = Direction.HIGHER_IS_WORSE, Direction.LOWER_IS_WORSE

# peripheral kind -> check name -> direction
PERIPHERAL_CHECKS: dict[str, dict[str, Direction]] = {
    "camera": {"fps": _L, "frame_timeout_ms": _H, "reopen_per_hour": _H},
    "id_card_reader": {"read_ms": _H, "sam_errors_per_hour": _H},
    "receipt_printer": {"paper_left_pct": _L, "head_temp_c": _H, "cutter_errors_per_day": _H},
    "document_printer": {"toner_pct": _L, "tray_sheets_left": _L, "jams_per_day": _H},
    "qr_scanner": {"decode_ms": _H, "no_response_s": _H},
    "assistance_caller": {"registration_age_s": _H, "call_setup_ms": _H, "packet_loss_pct": _H},
    "touch_screen": {"idle_open_hours_h": _H, "usb_resets_per_day": _H},
}
HOST_CHECKS: dict[str, Direction] = {"disk_used_ratio": _H, "memory_used_ratio": _H, "cpu_temp_c": _H}


class ProfileCheckError(ValueError):
    """A profile's check section cannot be used (unknown check, missing or disordered thresholds)."""


@dataclass(frozen=True, slots=True)
class Threshold:
    """One check of a profile: its name, which way is worse, and its two limits."""

    check: str
    direction: Direction
    warn: float
    fail: float

    def state(self, value: float) -> CheckState:
        """Classify a reading as ok, warn or fail (at the limit counts as crossed)."""
        if self.direction is Direction.HIGHER_IS_WORSE:
            return CheckState.FAIL if value >= self.fail else CheckState.WARN if value >= self.warn else CheckState.OK
        return CheckState.FAIL if value <= self.fail else CheckState.WARN if value <= self.warn else CheckState.OK

    def limit(self, state: CheckState) -> float | None:
        """The threshold a reading in `state` has crossed."""
        return self.fail if state is CheckState.FAIL else self.warn if state is CheckState.WARN else None


def threshold(check: str, direction: Direction, raw: Any) -> Threshold:
    """Build one threshold from its `{warn, fail}` mapping; refuse what would judge nonsense."""
    if not isinstance(raw, dict) or set(raw) != {"warn", "fail"}:
        raise ProfileCheckError(f"{check}: expected {{warn: X, fail: Y}}, got {raw!r}")
    values: list[float] = []
    for name in ("warn", "fail"):
        v = raw[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ProfileCheckError(f"{check}.{name}: {v!r} is not a number")
        values.append(float(v))
    warn, fail = values
    if direction is Direction.HIGHER_IS_WORSE and warn > fail:
        raise ProfileCheckError(f"{check}: warn ({warn:g}) must not be above fail ({fail:g})")
    if direction is Direction.LOWER_IS_WORSE and warn < fail:
        raise ProfileCheckError(f"{check}: warn ({warn:g}) must not be below fail ({fail:g})")
    return Threshold(check, direction, warn, fail)


def thresholds(directions: dict[str, Direction], raw: Any, where: str) -> dict[str, Threshold]:
    """All thresholds of one check section (a peripheral's `checks` or the profile's `host`)."""
    if not isinstance(raw, dict):
        raise ProfileCheckError(f"{where}: expected a mapping of checks")
    unknown = sorted(set(raw) - set(directions))
    if unknown:
        raise ProfileCheckError(f"{where}: unknown checks {unknown}; known: {', '.join(directions)}")
    missing = sorted(set(directions) - set(raw))
    if missing:
        raise ProfileCheckError(f"{where}: missing checks {missing}")
    try:
        return {name: threshold(name, directions[name], value) for name, value in raw.items()}
    except ProfileCheckError as err:
        raise ProfileCheckError(f"{where}.{err}") from None
