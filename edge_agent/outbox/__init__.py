"""The durable outbox: every event is on disk before anyone is told "ok"."""

from edge_agent.outbox.store import (
    InvalidEvent,
    Outbox,
    OutboxError,
    OutboxFull,
    OutboxItem,
    OutboxLimits,
    OutboxStats,
    OutboxStorageError,
)
from edge_agent.outbox.window import Batch, SendWindow

__all__ = [
    "Batch",
    "InvalidEvent",
    "Outbox",
    "OutboxError",
    "OutboxFull",
    "OutboxItem",
    "OutboxLimits",
    "OutboxStats",
    "OutboxStorageError",
    "SendWindow",
]
