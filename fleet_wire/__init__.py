"""The wire contract shared by the edge agent and the fleet server: topics, envelopes, receipts."""

from fleet_wire.errors import WireError, TopicError, EnvelopeInvalid

__all__ = ["WireError", "TopicError", "EnvelopeInvalid"]
