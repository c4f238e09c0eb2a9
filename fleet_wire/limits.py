"""Sizes both sides agree on; the server refuses anything larger and says so."""

MAX_MESSAGE_BYTES = 256 * 1024  # one MQTT payload on an events topic
MAX_EVENT_BODY_BYTES = 8 * 1024  # one event's JSON body
MAX_BATCH_EVENTS = 500  # events in one batch message
MAX_RECEIPT_RANGES = 64  # stored ranges above the contiguous mark carried in one receipt
