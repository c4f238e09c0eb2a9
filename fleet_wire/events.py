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


# Terminal-side states, in the order a good update passes them; the last four end it.
UpdateState = Literal[
    "notified",  # the command arrived and was persisted
    "downloading",
    "downloaded",  # verified by TUF, staged; nothing installed yet
    "waiting_window",  # downloaded, outside the office's maintenance window
    "waiting_session",  # a citizen's session is open on the kiosk
    "installing",
    "on_trial",  # switched and restarted on the new version; health gate running
    "committed",  # the gate passed: the only success
    "failed",  # could not download or install; still on the old version
    "rolled_back",  # the new version failed its gate or crash-looped; back on the old one
    "rejected",  # refused before anything was installed (trust, counter, profile)
]
UPDATE_STATES: tuple[str, ...] = UpdateState.__args__  # type: ignore[attr-defined]
FINAL_UPDATE_STATES = frozenset({"committed", "failed", "rolled_back", "rejected"})

# Stable reason codes (metrics labels, console text). `ok` for progress without a problem.


class UpdateStatus(_Body):
    """Body of an `update.status` event: one step of one update on one terminal. `report` grows
    by one per report of the same (rollout, target): the server applies only a newer one."""

    rollout: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    cmd: str = Field(pattern=r"^[0-9a-f]{32}$")
    kind: Literal["agent", "config", "face_model"]
    target: str = Field(
        pattern=r"^(agent|config|models|wheels)/([A-Za-z0-9][A-Za-z0-9._+-]{0,99}/)?[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$"
    )
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
    counter: int = Field(ge=1, le=2**53)
    state: UpdateState
    report: int = Field(ge=1, le=2**53)
    reason: str = Field(default="ok", pattern=r"^[a-z_]{1,48}$")
    detail: str = Field(default="", max_length=500)
    running: str = Field(default="", max_length=64, description="the agent version running when reported")
    metadata_expires: str | None = Field(
        default=None, max_length=40
    )  # earliest expiry among the terminal's trusted metadata


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
        # a step of a release update: never evicted, the rollout counts on every report
        EventSpec("update.status", EventClass.BUSINESS, UpdateStatus),
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
