"""Build and parse every MQTT topic of the fleet; no other module spells a topic by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeGuard

from fleet_wire.errors import TopicError

PREFIX = "fleet/v1"
TERMINAL_ROOT = f"{PREFIX}/t"
# Terminal ids double as MQTT usernames and client ids, so they must never hold / + # or spaces.
# The pattern is for pydantic (Rust regex: `$` is the end of the text). Python's `$` also matches
# before a trailing newline, so Python code uses the compiled form with fullmatch only.
TERMINAL_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
_TERMINAL_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,62}")


class Channel(StrEnum):
    """What a topic under a terminal's subtree carries."""

    EVENTS = "events"  # up: batched events from the outbox
    STATUS = "status"  # up, retained: birth / heartbeat / Last Will
    CMD = "cmd"  # down: commands
    CMD_ACK = "cmd/ack"  # up: command progress and results
    RECEIPT = "receipt"  # down: "stored up to seq N" end-to-end receipts


UPLINK = (Channel.EVENTS, Channel.STATUS, Channel.CMD_ACK)
DOWNLINK = (Channel.CMD, Channel.RECEIPT)


@dataclass(frozen=True, slots=True)
class TopicRef:
    """A parsed terminal topic."""

    terminal_id: str
    channel: Channel


def is_terminal_id(value: object) -> TypeGuard[str]:
    """Tell whether `value` is a well-formed terminal id."""
    return isinstance(value, str) and _TERMINAL_ID_RE.fullmatch(value) is not None


def check_terminal_id(value: str) -> str:
    """Return `value` if it is a well-formed terminal id, else raise TopicError."""
    if not is_terminal_id(value):
        raise TopicError(
            f"terminal id {value!r} must be 2-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
            reason="bad_terminal_id",
        )
    return value


def topic(terminal_id: str, channel: Channel) -> str:
    """Build the topic of `channel` for one terminal."""
    return f"{TERMINAL_ROOT}/{check_terminal_id(terminal_id)}/{Channel(channel).value}"


def subscription(channel: Channel) -> str:
    """The wildcard filter that matches `channel` of every terminal."""
    return f"{TERMINAL_ROOT}/+/{Channel(channel).value}"


def parse(value: str) -> TopicRef:
    """Parse a terminal topic, raising TopicError with the reason when it is not one."""
    root = TERMINAL_ROOT + "/"
    if not value.startswith(root):
        raise TopicError(f"topic {value!r} is not under {root}")
    terminal_id, _, rest = value[len(root) :].partition("/")
    if not is_terminal_id(terminal_id):
        raise TopicError(f"topic {value!r} names no valid terminal id")
    try:
        channel = Channel(rest)
    except ValueError:
        raise TopicError(f"topic {value!r} has unknown channel {rest!r}") from None
    return TopicRef(terminal_id, channel)


def acl_patterns() -> list[str]:
    """Mosquitto ACL `pattern` lines confining each terminal (username = id) to its own subtree."""
    lines = [f"pattern write {TERMINAL_ROOT}/%u/{c.value}" for c in UPLINK]
    lines += [f"pattern read {TERMINAL_ROOT}/%u/{c.value}" for c in DOWNLINK]
    return lines
