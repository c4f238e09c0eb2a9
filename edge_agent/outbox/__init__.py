"""The durable outbox: every event is on disk before anyone is told "ok"."""

from edge_agent.outbox.store import (
    Outbox, OutboxError, OutboxFull, OutboxStorageError, OutboxItem, OutboxLimits, OutboxStats, InvalidEvent,
)
from edge_agent.outbox.window import SendWindow, Batch

__all__ = [
    "Outbox", "OutboxError", "OutboxFull", "OutboxStorageError", "OutboxItem", "OutboxLimits", "OutboxStats",
    "InvalidEvent", "SendWindow", "Batch",
]
