"""Errors raised while building or parsing anything that crosses the wire."""

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


class EnvelopeInvalid(WireError):
    """An event envelope or batch failed validation; drop it and count the reason."""

    reason = "schema"
