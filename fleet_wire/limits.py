"""Sizes and bounds both sides agree on; the receiver refuses anything beyond them and says so.

Every wire input is measured against these before it is parsed (see `fleet_wire.codec`), so a
hostile payload costs a bounded amount of CPU and memory and can never escape the decoder.
"""

MAX_MESSAGE_BYTES = 256 * 1024  # one MQTT payload on an events topic
MAX_STATUS_BYTES = 16 * 1024  # one status document (birth, heartbeat, will)
MAX_CMD_ACK_BYTES = 16 * 1024  # one command acknowledgement
MAX_CMD_BYTES = 16 * 1024  # one command to a terminal (a desired release)
MAX_RECEIPT_BYTES = 16 * 1024  # one receipt (64 ranges of two 16-digit seqs fit in ~2.3 KiB)
MAX_EVENT_BODY_BYTES = 8 * 1024  # one event's JSON body
MAX_BATCH_EVENTS = 500  # events in one batch message
MAX_RECEIPT_RANGES = 64  # stored ranges above the contiguous mark carried in one receipt

# Nesting: a batch is {events: [{body: {...}}]} = 4 levels, a status document 3. Python's json
# recurses in C for each level and raises RecursionError near 1000; we refuse long before that.
MAX_JSON_DEPTH = 8
# Digits in one run of a number (a seq is at most 16 digits, a float's repr at most 17
# significant ones). int() refuses > 4300 digits with a plain ValueError; we refuse far earlier.
MAX_NUMBER_DIGITS = 32

MAX_SEQ = 2**53  # seqs stay exact in every JSON implementation (IEEE double)

# Event timestamps against the receiver's clock. Newer than now + 1 day: a clock gone wrong,
# refused. Older than 30 days: an offline terminal's backlog, stored (and counted as late);
# older than 400 days: a clock reset, refused (the usage rollups look back a year at most).
TS_MAX_FUTURE_S = 24 * 3600
TS_LATE_AFTER_S = 30 * 24 * 3600
TS_MAX_PAST_S = 400 * 24 * 3600
