"""The server's one way to write a timestamp: UTC ISO 8601, milliseconds, `Z` (as the wire has it).

Stored timestamps are compared as strings, so every store must write them the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fleet_wire.envelope import format_ts


def utc_iso(moment: datetime | float) -> str:
    """Format an aware datetime, or a Unix time in seconds, as the server stores timestamps."""
    if isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    return format_ts(moment)


def utc_now_iso() -> str:
    """The current time as the server stores timestamps."""
    return format_ts(datetime.now(UTC))
