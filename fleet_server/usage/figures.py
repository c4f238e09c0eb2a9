"""Pure usage arithmetic: percentiles, rates and office-local calendar buckets (no I/O).

Definitions (the console, the CSV and the tests all use these):

- median: the middle of the sorted values; for an even count the mean of the two middle values.
- p90: nearest rank, the smallest value with at least 90 % of the values at or below it, i.e.
  ``sorted[ceil(0.9 * n) - 1]``. It is always one of the observed durations.
- Durations are those of ``service.completed`` events (how long a successful session took).
- Over a range of days and offices both are exact: each day's sorted durations are stored and
  the ranks are selected out of all of them (``select_ranks``), never estimated from buckets.
- completion rate = completed / (completed + abandoned); abandon rate = abandoned / (same).
  Sessions still running at the end of a bucket are in neither, so the two rates add up to 1.
- face-login share = ``service.started`` events with ``face_login`` / all ``service.started``.
- An event counts in the office-local hour and day of its own timestamp (``ts``), never of the
  time it reached the server, so an offline terminal's events land where they happened.
"""

from __future__ import annotations

import math
import sys
from array import array
from bisect import bisect_left, bisect_right
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


# -- exact percentiles over many sorted runs ----------------------------------------------------------

SMALL_MERGE = 2048  # up to this many values a plain sort is cheaper than selecting
_BIG_ENDIAN = sys.byteorder == "big"


def pack_durations(sorted_values: Sequence[float]) -> bytes:
    """The stored form of a bucket's sorted durations: little-endian IEEE 754 doubles, exact."""
    packed = array("d", sorted_values)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def unpack_durations(blob: bytes) -> array[float]:
    """A bucket's sorted durations from their stored form (see `pack_durations`)."""
    values = array("d", blob)
    if _BIG_ENDIAN:
        values.byteswap()
    return values


def merged_median_p90(runs: Sequence[Sequence[float]]) -> tuple[float | None, float | None]:
    """`median` and `p90` of all the values of sorted runs together, exactly as if merged."""
    n = sum(len(r) for r in runs)
    if n == 0:
        return None, None
    p = (9 * n + 9) // 10 - 1
    middle, (p90_value,) = select_ranks(runs, [((n - 1) // 2, n // 2), (p, p)])
    # the same arithmetic as `median` on the merged list, so the figures are bit-identical
    return (middle[0] + middle[1]) / 2.0 if n % 2 == 0 else float(middle[0]), float(p90_value)


def select_ranks(
    runs: Sequence[Sequence[float]], spans: Sequence[tuple[int, int]], *, margin: int | None = None
) -> list[list[float]]:
    """For each (first, last) span of 0-based ranks, the values at those ranks of all the runs' values.

    Each run must be sorted ascending. Exact, as if every run were merged and sorted, without
    doing so: a span's neighbourhood is guessed from an evenly spaced sample of all the values,
    then every run is cut by binary search at the guessed bounds [lo, hi]; the values below lo
    are only counted, the few between lo and hi sorted. If the span turns out not to lie between
    lo and hi the bounds are widened (at worst to everything: a full sort). So the cost is a few
    binary searches per run and one small sort per span, instead of handling every value in Python.
    `margin` (samples either side of a guess) is for tests that need the widening to happen.
    """
    n = sum(len(r) for r in runs)
    for first, last in spans:
        if not 0 <= first <= last < n:
            raise IndexError(f"ranks {first}..{last} outside 0..{n - 1}")
    if len(runs) == 1:
        return [[float(v) for v in runs[0][first : last + 1]] for first, last in spans]
    joined = array("d")
    for r in runs:
        joined.extend(r)
    if n <= SMALL_MERGE:
        merged = sorted(joined)
        return [merged[first : last + 1] for first, last in spans]
    # A run holds one sample more or fewer than its share, so a rank's place in the sample is off
    # by about sqrt(runs) samples; the sample size balances its own sort against the slices' sort.
    if margin is None:
        margin = 8 + 2 * math.isqrt(len(runs))
    step = max(1, n // min(n, max(256, math.isqrt(4 * max(margin, 1) * n))))
    sample = sorted(joined[step // 2 :: step])
    m = len(sample)
    out = []
    for first, last in spans:
        i_first, i_last, width = first * m // n, last * m // n, margin
        while True:
            lo = sample[i_first - width] if i_first - width >= 0 else -math.inf
            hi = sample[i_last + width] if i_last + width < m else math.inf
            below = 0
            between: list[float] = []
            for r in runs:
                a = bisect_left(r, lo)
                b = bisect_right(r, hi, a)
                below += a
                between.extend(r[a:b])
            if below <= first and last < below + len(between):
                between.sort()
                out.append(between[first - below : last - below + 1])
                break
            width = max(1, width * 4)
    return out


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
