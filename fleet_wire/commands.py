"""Command acknowledgements a terminal sends on its cmd/ack topic (progress and results)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet_wire import limits
from fleet_wire.codec import dumps_checked, loads_bounded
from fleet_wire.envelope import EVENT_ID_PATTERN, SCHEMA_VERSION, OptionalWireTs
from fleet_wire.errors import CmdAckInvalid, WireError
from fleet_wire.events import describe


class CmdAck(BaseModel):
    """Where one command stands on the terminal."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1] = SCHEMA_VERSION
    cmd: str = Field(pattern=EVENT_ID_PATTERN, description="the command's id")
    state: Literal["accepted", "running", "done", "failed", "rejected"]
    detail: str = Field(default="", max_length=500)
    ts: OptionalWireTs = None

    @field_validator("v", mode="before")
    @classmethod
    def _no_bool_version(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("schema version must be the number 1, not a boolean")
        return value


def decode_cmd_ack(payload: bytes) -> CmdAck:
    """Decode a cmd/ack payload, raising CmdAckInvalid (reason `bad_cmd_ack` or `oversized`)."""
    try:
        doc: Any = loads_bounded(payload, max_bytes=limits.MAX_CMD_ACK_BYTES, what="cmd/ack")
        ack = CmdAck.model_validate(doc)
        dumps_checked(ack.model_dump(), what="cmd/ack")
    except ValidationError as err:
        raise CmdAckInvalid(f"cmd/ack: {describe(err)}") from err
    except WireError as err:
        raise CmdAckInvalid(
            f"cmd/ack: {err}", reason="oversized" if err.reason == "oversized" else "bad_cmd_ack"
        ) from err
    return ack
