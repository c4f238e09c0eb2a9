"""The status document a terminal keeps retained on its status topic (birth, heartbeat, will).

Decoded bounded and strictly typed like every wire input: a retained poison is refused with a
reason each time it is delivered and never stops other terminals' statuses from being applied.
Unknown fields are dropped (a newer agent may add some); known ones must have their type.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticSerializationError

from fleet_wire import limits
from fleet_wire.codec import loads_bounded
from fleet_wire.envelope import OptionalWireTs
from fleet_wire.errors import PayloadRefused, StatusInvalid, WireError
from fleet_wire.events import describe

MAX_PERIPHERALS = 64  # entries in one status document's peripherals map
MAX_HEARTBEAT_INTERVAL_S = 24 * 3600  # the wire's bound; the server caps it further per device profile


class OutboxSummary(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    depth: int = Field(default=0, ge=0, le=10**9)
    oldest_age_s: float = Field(default=0.0, ge=0, le=10**10)
    refused: int = Field(default=0, ge=0, le=10**12)


class PeripheralStatus(BaseModel):
    """One peripheral (or the host) as the terminal judged it by its device profile."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    state: Literal["ok", "warn", "fail", "stale", "unknown"]
    check: str | None = Field(default=None, max_length=64)  # the check that set the state, or "fault"
    reading: dict[str, float] = Field(default_factory=dict, max_length=32)  # check -> latest value
    limit: float | None = None  # the threshold `check` crossed
    since: str | None = Field(default=None, max_length=40)  # when the state began
    error: str | None = Field(default=None, max_length=200)  # a fault or why nothing is measured

    @field_validator("reading")
    @classmethod
    def _short_checks(cls, value: dict[str, float]) -> dict[str, float]:
        if any(len(k) > 64 for k in value):
            raise ValueError("check names are at most 64 characters")
        return value


class StatusDoc(BaseModel):
    """One terminal's reported state."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    state: Literal["online", "offline"]
    reason: str | None = Field(default=None, max_length=64)
    ts: OptionalWireTs = None
    version: str | None = Field(default=None, max_length=64)
    office: str | None = Field(default=None, max_length=64)
    uptime_s: float | None = Field(default=None, ge=0, le=10**10)
    hb_interval_s: float | None = Field(default=None, gt=0, le=MAX_HEARTBEAT_INTERVAL_S)
    outbox: OutboxSummary | None = None
    # An older agent sends a bare state string per peripheral.
    peripherals: dict[str, PeripheralStatus | str] | None = Field(default=None, max_length=MAX_PERIPHERALS)
    host: PeripheralStatus | None = None
    profile: str | None = Field(default=None, max_length=64)  # the device profile the agent judges by
    disk_pct: float | None = Field(default=None, ge=0, le=100)
    # decode_status checks the document serialises; the ingest then stores that same text
    _json: str | None = PrivateAttr(default=None)

    @field_validator("peripherals")
    @classmethod
    def _short_names(cls, value: dict[str, PeripheralStatus | str] | None) -> dict[str, PeripheralStatus | str] | None:
        if value is not None and any(len(k) > 32 or (isinstance(v, str) and len(v) > 16) for k, v in value.items()):
            raise ValueError("peripheral names are at most 32 characters and states at most 16")
        return value

    def to_json(self) -> str:
        """The normalised document as stored: only known fields, valid UTF-8 (made once: the model is frozen)."""
        if self._json is None:
            # pydantic-core writes the JSON in one call, a third of model_dump + json.dumps per
            # heartbeat (the server decodes 333 a second at 10,000 terminals); its strict str
            # fields already refused lone surrogates on the way in, so the text is valid UTF-8
            try:
                self._json = self.model_dump_json(exclude_none=True)
            except PydanticSerializationError as err:
                raise PayloadRefused(f"status cannot be stored: {err}", reason="bad_text") from err
        return self._json


CLEARED = StatusDoc(state="offline", reason="cleared")  # an empty retained payload clears the topic


def decode_status(payload: bytes) -> StatusDoc:
    """Decode a status payload, raising StatusInvalid (reason `bad_status` or `oversized`)."""
    if not payload:
        return CLEARED
    try:
        doc: Any = loads_bounded(payload, max_bytes=limits.MAX_STATUS_BYTES, what="status")
        status = StatusDoc.model_validate(doc)
        status.to_json()  # refuse text that cannot be stored here, not in the writer
    except ValidationError as err:
        raise StatusInvalid(f"status document: {describe(err)}") from err
    except WireError as err:
        reason = "oversized" if err.reason == "oversized" else "bad_status"
        raise StatusInvalid(f"status document: {err}", reason=reason) from err
    return status
