"""Errors raised while building or parsing anything that crosses the wire.

Every failure to read a wire input is a `WireError` with a short stable `reason` code for
metrics; a receiver drops (or quarantines) that one message, counts the reason and carries on.
"""

from __future__ import annotations


class WireError(ValueError):
    """Root of every wire-contract error; `reason` is a short stable code for metrics."""

    reason = "invalid"

    def __init__(self, message: str, *, reason: str | None = None, where: str | None = None):
        if reason is not None:
            self.reason = reason
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class TopicError(WireError):
    """A topic does not follow the fleet/v1 layout; drop the message."""

    reason = "bad_topic"


class PayloadRefused(WireError):
    """A payload was refused before or while parsing it (size, nesting, number length, not JSON).

    Reasons: `oversized`, `too_deep`, `number_too_long`, `non_finite_number`, `malformed_json`,
    `bad_text`. Drop the message and count the reason; re-sending the same bytes cannot help.
    """

    reason = "malformed_json"


class EnvelopeInvalid(WireError):
    """An event envelope or batch failed validation; drop it and count the reason."""

    reason = "schema"


class TimestampOutOfWindow(EnvelopeInvalid):
    """An event's time is implausible against the receiver's clock (`ts_future`, `ts_too_old`).

    Quarantine the event (its seq can still be receipted): the sender's clock needs fixing.
    """

    reason = "ts_future"


class StatusInvalid(WireError):
    """A status document (birth, heartbeat, will) is unreadable; keep the terminal's last state."""

    reason = "bad_status"


class CmdAckInvalid(WireError):
    """A command acknowledgement is unreadable; the command stays unconfirmed (re-send it)."""

    reason = "bad_cmd_ack"
