"""Judging one peripheral's latest readings against its profile thresholds. Pure: no I/O, no clock.

A peripheral's state is the worst of its fresh readings (fail > warn > ok); the check that gave it
and the limit it crossed travel with the state, so the centre can say *why* without a copy of the
profile. A fault (a probe that could not open the device, an SDK error the kiosk app passed on)
fails the peripheral outright. Readings older than the stale limit do not count: when none is
fresh the state is `stale`, which says "we do not know any more", not "broken".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet_wire.profile_checks import CheckState, Direction, Threshold

_RANK = {CheckState.OK: 0, CheckState.WARN: 1, CheckState.FAIL: 2}


@dataclass(frozen=True, slots=True)
class Reading:
    value: float
    at: float  # seconds since the epoch, when it was measured or reported


@dataclass(slots=True)
class PeripheralRecord:
    """What is known about one peripheral: its latest reading per check, its latest fault."""

    readings: dict[str, Reading] = field(default_factory=dict)
    fault: str | None = None
    fault_at: float = 0.0
    unavailable: str | None = None  # why it cannot be measured at all (no camera source configured)


@dataclass(frozen=True, slots=True)
class Judgement:
    state: CheckState
    check: str | None = None  # the check that set the state (None for ok, stale, unknown)
    reading: dict[str, float] = field(default_factory=dict)
    limit: float | None = None  # the threshold `check` crossed
    error: str | None = None  # plain words for a fault or why nothing is measured
    age_s: float | None = None  # age of the newest reading (for stale)


def judge(
    checks: dict[str, Threshold],
    record: PeripheralRecord,
    now: float,
    stale_after_s: float,
    known_since: float,
) -> Judgement:
    """The state of one peripheral at `now`; `known_since` is when the agent started listening."""
    if record.unavailable is not None:
        return Judgement(CheckState.UNKNOWN, error=record.unavailable)
    fresh = {name: r for name, r in record.readings.items() if now - r.at <= stale_after_s}
    values = {name: r.value for name, r in fresh.items()}
    if record.fault is not None and now - record.fault_at <= stale_after_s:
        return Judgement(CheckState.FAIL, "fault", values, error=record.fault)
    if not fresh:
        newest = max((r.at for r in record.readings.values()), default=None)
        if newest is None and (record.fault is None and now - known_since <= stale_after_s):
            return Judgement(CheckState.UNKNOWN, error="no reading yet")
        last = newest if newest is not None else record.fault_at if record.fault is not None else known_since
        old = {name: r.value for name, r in record.readings.items()}
        return Judgement(CheckState.STALE, reading=old, age_s=round(now - last, 1))
    worst, worst_check = CheckState.OK, None
    for name, threshold in checks.items():  # profile order breaks ties
        if name not in fresh:
            continue
        state = threshold.state(fresh[name].value)
        if _RANK[state] > _RANK[worst]:
            worst, worst_check = state, name
    limit = checks[worst_check].limit(worst) if worst_check else None
    return Judgement(worst, worst_check, values, limit)


def describe(
    peripheral_id: str, required: bool, j: Judgement, checks: dict[str, Threshold], stale_after_s: float
) -> str:
    """One line in plain words for a technician: what is wrong with this peripheral, and why."""
    who = f"{peripheral_id} ({'required' if required else 'optional'})"
    if j.state is CheckState.OK:
        return f"{who} is fine"
    if j.state is CheckState.UNKNOWN:
        return f"{who} is not measured: {j.error}"
    if j.state is CheckState.STALE:
        age = f"{j.age_s:.0f} s" if j.age_s is not None else "a while"
        return f"{who}: no fresh reading for {age} (readings count for {stale_after_s:g} s); is the kiosk app running?"
    if j.check == "fault":
        return f"{who} failed: {j.error}"
    assert j.check is not None and j.limit is not None
    t = checks[j.check]
    side = "at or above" if t.direction is Direction.HIGHER_IS_WORSE else "at or below"
    word = "failed" if j.state is CheckState.FAIL else "needs attention"
    return f"{who} {word}: {j.check} is {j.reading[j.check]:g}, {side} the {j.state.value} limit {j.limit:g}"
