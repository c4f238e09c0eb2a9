"""The wire contract shared by the edge agent and the fleet server: topics, envelopes, receipts."""

from fleet_wire.errors import EnvelopeInvalid, TopicError, WireError

__all__ = ["EnvelopeInvalid", "TopicError", "WireError"]
