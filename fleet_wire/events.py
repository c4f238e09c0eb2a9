"""Event types, their bodies and their priority class.

Bodies are validated in strict mode: a boolean is not a number, a string is not a number or a
boolean (`duration_s: true` or `"95"`, `face_login: "yes"` are refused, not coerced); an
integer is accepted where a float is expected, since JSON has one number type.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet_wire.errors import EnvelopeInvalid

ServiceCode = Field(pattern=r"^[A-Z]{2}[0-9]{2}$", description="catalogue code, e.g. TQ01")
SessionId = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")


class EventClass(IntEnum):
    """Priority class: when the outbox is full, lower classes are evicted first."""

    TELEMETRY = 0  # samples that the next sample supersedes
    OPERATIONAL = 1  # peripheral faults, face decisions, agent lifecycle
    BUSINESS = 2  # citizen transactions: never evicted silently


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ServiceStarted(_Body):
    session: str = SessionId
    service_code: str = ServiceCode
    face_login: bool = False


class ServiceCompleted(_Body):
    session: str = SessionId
    service_code: str = ServiceCode
    duration_s: float = Field(ge=0, le=24 * 3600)
    face_login: bool = False


class ServiceAbandoned(_Body):
    session: str = SessionId
    service_code: str = ServiceCode
    duration_s: float = Field(ge=0, le=24 * 3600)
    step: str | None = Field(default=None, max_length=64)
    face_login: bool = False


class PeripheralFault(_Body):
    peripheral: str = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")
    code: str = Field(min_length=1, max_length=64)
    message: str = Field(default="", max_length=500)


class PeripheralRecovered(_Body):
    peripheral: str = Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")


class FaceDecision(_Body):
    """Outcome of a face check. Never carries images, templates or citizen ids."""

    mode: Literal["verify", "compare_id", "identify", "enrol", "erase"]
    decision: Literal["match", "no_match", "rejected", "enrolled", "erased", "error"]
    score: float | None = Field(default=None, ge=0, le=10)
    reason: str = Field(default="ok", max_length=48, pattern=r"^[a-z_]+$")
    latency_ms: float = Field(ge=0, le=600_000)
    model_version: str = Field(max_length=64)


class TelemetrySample(_Body):
    cpu_pct: float = Field(ge=0, le=100)
    mem_pct: float = Field(ge=0, le=100)
    disk_pct: float = Field(ge=0, le=100)
    outbox_depth: int = Field(ge=0, le=10**9)


class AgentLifecycle(_Body):
    phase: Literal["started", "stopping", "updated", "rolled_back"]
    version: str = Field(max_length=64)
    detail: str = Field(default="", max_length=500)


class Tombstone(_Body):
    """Stands in for an event the outbox dropped by policy, so the server counts it, not loses it."""

    reason: Literal["evicted", "expired"]
    original_type: str = Field(max_length=64)
    original_class: int = Field(ge=0, le=2)


@dataclass(frozen=True, slots=True)
class EventSpec:
    type: str
    event_class: EventClass
    body: builtins.type[_Body]  # `type` alone would name the field above


TOMBSTONE = "outbox.tombstone"

EVENT_SPECS: dict[str, EventSpec] = {
    spec.type: spec
    for spec in (
        EventSpec("service.started", EventClass.BUSINESS, ServiceStarted),
        EventSpec("service.completed", EventClass.BUSINESS, ServiceCompleted),
        EventSpec("service.abandoned", EventClass.BUSINESS, ServiceAbandoned),
        EventSpec("peripheral.fault", EventClass.OPERATIONAL, PeripheralFault),
        EventSpec("peripheral.recovered", EventClass.OPERATIONAL, PeripheralRecovered),
        EventSpec("face.decision", EventClass.OPERATIONAL, FaceDecision),
        EventSpec("agent.lifecycle", EventClass.OPERATIONAL, AgentLifecycle),
        EventSpec("telemetry.sample", EventClass.TELEMETRY, TelemetrySample),
        EventSpec(TOMBSTONE, EventClass.TELEMETRY, Tombstone),
    )
}


def spec_for(event_type: str) -> EventSpec:
    """Look up an event type, raising EnvelopeInvalid(reason=unknown_type) if there is none."""
    try:
        return EVENT_SPECS[event_type]
    except (KeyError, TypeError):
        known = ", ".join(sorted(t for t in EVENT_SPECS if t != TOMBSTONE))
        raise EnvelopeInvalid(
            f"unknown event type {event_type!r}; known types: {known}", reason="unknown_type"
        ) from None


def validate_body(event_type: str, body: Any) -> dict[str, Any]:
    """Validate `body` for `event_type` and return it normalised, or raise EnvelopeInvalid."""
    spec = spec_for(event_type)
    try:
        return spec.body.model_validate(body).model_dump(mode="json")
    except ValidationError as err:
        raise EnvelopeInvalid(f"body of {event_type}: {describe(err)}", reason="bad_body", where="body") from err


def validate_body_json(event_type: str, body: Any) -> str:
    """Validate `body` for `event_type` and return its normalised compact JSON."""
    spec = spec_for(event_type)
    try:
        return spec.body.model_validate(body).model_dump_json()
    except ValidationError as err:
        raise EnvelopeInvalid(f"body of {event_type}: {describe(err)}", reason="bad_body", where="body") from err


def describe(err: ValidationError, limit: int = 3) -> str:
    """Turn a pydantic error into one short line: field path and what was wrong."""
    parts = []
    for item in err.errors()[:limit]:
        loc = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{loc}: {item['msg']}")
    more = len(err.errors()) - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
