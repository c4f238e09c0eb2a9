"""Pure health rules: a terminal's state from its last heartbeat, opening hours, alert hysteresis."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time
from enum import StrEnum
from zoneinfo import ZoneInfo

STALE_AFTER_INTERVALS = 1.5  # one heartbeat late: stale
OFFLINE_AFTER_INTERVALS = 3.0  # three missed: offline, even without a Last Will
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class State(StrEnum):
    ONLINE = "online"
    STALE = "stale"
    OFFLINE = "offline"
    MISSING = "missing"  # enrolled, never heard from


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    reason: str


def judge(
    last_seen_s: float | None,
    reported: str | None,
    reported_reason: str,
    hb_interval_s: float,
    now_s: float,
    stale_after: float = STALE_AFTER_INTERVALS,
    offline_after: float = OFFLINE_AFTER_INTERVALS,
) -> Verdict:
    """The state of one terminal from what it last said and when (limits in heartbeat intervals)."""
    if last_seen_s is None:
        return Verdict(State.MISSING, "never connected since enrolment")
    if reported == "offline":
        why = {"connection_lost": "connection lost (Last Will)", "shutdown": "agent shut down"}.get(
            reported_reason, reported_reason or "reported offline"
        )
        return Verdict(State.OFFLINE, why)
    silent = now_s - last_seen_s
    if silent >= offline_after * hb_interval_s:
        return Verdict(State.OFFLINE, f"no heartbeat for {silent:.0f} s (expected every {hb_interval_s:g} s)")
    if silent >= stale_after * hb_interval_s:
        return Verdict(State.STALE, f"heartbeat {silent:.0f} s late (expected every {hb_interval_s:g} s)")
    return Verdict(State.ONLINE, "heartbeat on time")


def _day_set(spec: str) -> set[str]:
    out: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            i, j = _DAYS.index(a), _DAYS.index(b)
            out.update(_DAYS[i : j + 1])
        elif part:
            out.add(part)
    return out


def is_open(hours: dict[str, str], timezone: str, moment: datetime) -> bool:
    """Whether an office with these opening hours is open at `moment` (aware datetime)."""
    local = moment.astimezone(ZoneInfo(timezone))
    day = _DAYS[local.weekday()]
    for days, span in hours.items():
        if day not in _day_set(days):
            continue
        start, end = (time.fromisoformat(x) for x in span.split("-"))
        if start <= local.time() < end:
            return True
    return False


@dataclass(slots=True)
class Hysteresis:
    """Fire only after a condition held for `for_s`; resolve only after it was false for `clear_s`.

    A terminal that flaps faster than that never raises a new alert per flap.
    """

    for_s: float
    clear_s: float
    firing: bool = False
    since: float | None = None  # when the condition last changed in the direction that matters
    raised: int = 0
    _pending: dict[str, float] = field(default_factory=dict)

    def update(self, condition: bool, now_s: float) -> str | None:
        """Feed the condition; returns 'fire', 'resolve' or None."""
        if condition and not self.firing:
            self._pending.pop("clear", None)
            start = self._pending.setdefault("fire", now_s)
            if now_s - start >= self.for_s:
                self.firing = True
                self.raised += 1
                self._pending.clear()
                return "fire"
        elif not condition and self.firing:
            self._pending.pop("fire", None)
            start = self._pending.setdefault("clear", now_s)
            if now_s - start >= self.clear_s:
                self.firing = False
                self._pending.clear()
                return "resolve"
        else:
            self._pending.clear()
        return None
