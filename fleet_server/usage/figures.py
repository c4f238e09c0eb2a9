"""Pure usage arithmetic: percentiles, rates and office-local calendar buckets (no I/O).

Definitions (the console, the CSV and the tests all use these):

- median: the middle of the sorted values; for an even count the mean of the two middle values.
- p90: nearest rank, the smallest value with at least 90 % of the values at or below it, i.e.
  ``sorted[ceil(0.9 * n) - 1]``. It is always one of the observed durations.
- Durations are those of ``service.completed`` events (how long a successful session took).
- completion rate = completed / (completed + abandoned); abandon rate = abandoned / (same).
  Sessions still running at the end of a bucket are in neither, so the two rates add up to 1.
- face-login share = ``service.started`` events with ``face_login`` / all ``service.started``.
- An event counts in the office-local hour and day of its own timestamp (``ts``), never of the
  time it reached the server, so an offline terminal's events land where they happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo

from fleet_wire.envelope import format_ts as format_ts  # the one timestamp format (string order is time order)

OUTCOMES = ("started", "completed", "abandoned")
SERVICE_TYPES = {f"service.{o}": o for o in OUTCOMES}


def median(sorted_values: Sequence[float]) -> float | None:
    """Median of already sorted values (mean of the two middle ones for an even count)."""
    n = len(sorted_values)
    if n == 0:
        return None
    mid = n // 2
    if n % 2:
        return float(sorted_values[mid])
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def p90(sorted_values: Sequence[float]) -> float | None:
    """90th percentile of already sorted values by nearest rank."""
    n = len(sorted_values)
    if n == 0:
        return None
    # ceil(0.9 * n) in integers, so float rounding can never pick the neighbouring rank
    return float(sorted_values[(9 * n + 9) // 10 - 1])


def ratio(part: int, whole: int) -> float | None:
    """part / whole, or None when there is nothing to divide by."""
    return part / whole if whole else None


def parse_ts(ts: str) -> datetime:
    """Parse a stored UTC timestamp ('2026-11-23T01:02:03.456Z')."""
    return datetime.fromisoformat(ts)


def local_day(ts: str, tz: tzinfo) -> date:
    """The office-local calendar day of a stored UTC timestamp."""
    return parse_ts(ts).astimezone(tz).date()


def day_bounds_utc(day: date, tz: tzinfo) -> tuple[str, str]:
    """[start, end) of an office-local day as stored-timestamp strings (23 or 25 h on DST days)."""
    start = datetime.combine(day, time(0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return format_ts(start), format_ts(end)


@dataclass(slots=True)
class Tally:
    """Counts and completed durations of one bucket while it is being rebuilt."""

    started: int = 0
    completed: int = 0
    abandoned: int = 0
    face_login_sessions: int = 0
    durations: list[float] = field(default_factory=list)

    def add(self, outcome: str, face_login: bool, duration_s: float | None) -> None:
        """Count one service event."""
        if outcome == "started":
            self.started += 1
            self.face_login_sessions += int(face_login)
        elif outcome == "completed":
            self.completed += 1
            if duration_s is not None:
                self.durations.append(float(duration_s))
        else:
            self.abandoned += 1

    def sorted_durations(self) -> list[float]:
        """The completed durations in ascending order."""
        return sorted(self.durations)
