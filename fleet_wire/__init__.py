"""The wire contract shared by the edge agent and the fleet server: topics, envelopes, receipts."""

from fleet_wire.errors import (
    CmdAckInvalid,
    EnvelopeInvalid,
    PayloadRefused,
    StatusInvalid,
    TimestampOutOfWindow,
    TopicError,
    WireError,
)

__all__ = [
    "CmdAckInvalid",
    "EnvelopeInvalid",
    "PayloadRefused",
    "StatusInvalid",
    "TimestampOutOfWindow",
    "TopicError",
    "WireError",
]
