"""What an admin sends to plan a rollout: the release, the targets, the waves and the policies."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fleet_server.registry.schemas import OFFICE_ID_PATTERN
from fleet_wire.release import PROFILE_ID_PATTERN, ROLLOUT_ID_PATTERN, TARGET_PATH_PATTERN
from fleet_wire.topics import TERMINAL_ID_PATTERN

# Server-side states of one terminal in one rollout: "pending" until the terminal reports on the
# command, then what it reports, and "timed_out" when a state lasted longer than its limit.
SERVER_STATES = (
    "pending",
    "notified",
    "downloading",
    "downloaded",
    "waiting_window",
    "waiting_session",
    "installing",
    "on_trial",
    "committed",
    "failed",
    "rolled_back",
    "rejected",
    "timed_out",
)
FINAL = frozenset({"committed", "failed", "rolled_back", "rejected", "timed_out"})
FAILED = frozenset({"failed", "rolled_back", "rejected", "timed_out"})
# failures worth another try without anyone asking (a network blip, a terminal that went quiet)
TRANSIENT_REASONS = frozenset({"download_failed", "timed_out"})
# ends that are nobody's failure: a newer release replaced it, or the terminal was revoked
NOT_COUNTED = frozenset({"superseded", "revoked"})

# Rollout states. live ones are ticked by the engine.
ROLLOUT_STATES = (
    "awaiting_approval",  # the plan asks for a second admin's approval before it starts
    "running",
    "waiting_approval",  # a wave passed and asks for approval before the next one
    "paused",  # by an admin
    "halted",  # by itself: a wave failed its gate (the reason says why)
    "completed",
    "aborted",
    "rolled_back",  # replaced by a rollback rollout (named in `superseded_by`)
)
LIVE = frozenset({"awaiting_approval", "running", "waiting_approval", "paused", "halted"})

# How long a terminal may stay in a state before the server calls it timed_out (seconds).
DEFAULT_TIMEOUTS: dict[str, float] = {
    "pending": 24 * 3600.0,  # sent, never heard of: an offline terminal gets a day to come back
    "notified": 3600.0,
    "downloading": 3600.0,
    "downloaded": 3600.0,
    "waiting_window": 26 * 3600.0,  # the next maintenance window is at most a day away
    "waiting_session": 4 * 3600.0,
    "installing": 1800.0,
    "on_trial": 1800.0,  # on top of the plan's gate_s
}


class Size(BaseModel):
    """How many terminals a wave takes: a count, a percent of the rollout's targets, or (neither)
    everything that is left."""

    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(default=None, ge=1, le=1_000_000)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one(self) -> Size:
        if self.count is not None and self.percent is not None:
            raise ValueError("give a count or a percent, not both")
        return self


class FailureLimit(BaseModel):
    """How many failed terminals a wave tolerates before the rollout halts: more than `count`, or
    more than `percent` of the finished ones once at least `min_sample` have finished (the whole
    wave counts once it has finished, whatever its size)."""

    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(default=None, ge=0, le=1_000_000)
    percent: float | None = Field(default=None, ge=0, le=100)
    min_sample: int = Field(default=1, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one(self) -> FailureLimit:
        if self.count is not None and self.percent is not None:
            raise ValueError("give a count or a percent, not both")
        if self.count is None and self.percent is None:
            self.count = 0
        return self


class WavePlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=64)
    size: Size = Field(default_factory=Size)
    offices: list[str] | None = Field(default=None, max_length=200, description="only these offices")
    pilot_only: bool = Field(default=False, description="only pilot offices")
    soak_s: float = Field(default=0.0, ge=0, le=30 * 24 * 3600)
    failures: FailureLimit = Field(default_factory=FailureLimit)
    on_success: Literal["advance", "wait_for_approval"] = "advance"

    @field_validator("offices")
    @classmethod
    def _office_ids(cls, value: list[str] | None) -> list[str] | None:
        import re

        for o in value or ():
            if not re.fullmatch(OFFICE_ID_PATTERN[1:-1], o):
                raise ValueError(f"{o!r} is not an office id")
        return value


class Targets(BaseModel):
    """Which terminals: the union of the lists given (none given: the whole fleet), then only
    those whose device profile the release lists."""

    model_config = ConfigDict(extra="forbid")

    offices: list[str] = Field(default_factory=list, max_length=200)
    profiles: list[str] = Field(default_factory=list, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)
    terminals: list[str] = Field(default_factory=list, max_length=100_000)

    @field_validator("offices")
    @classmethod
    def _offices(cls, value: list[str]) -> list[str]:
        import re

        for o in value:
            if not re.fullmatch(OFFICE_ID_PATTERN[1:-1], o):
                raise ValueError(f"{o!r} is not an office id")
        return value

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, value: list[str]) -> list[str]:
        import re

        for p in value:
            if not re.fullmatch(PROFILE_ID_PATTERN[1:-1], p):
                raise ValueError(f"{p!r} is not a device profile id")
        return value

    @field_validator("terminals")
    @classmethod
    def _terminals(cls, value: list[str]) -> list[str]:
        import re

        for t in value:
            if not re.fullmatch(TERMINAL_ID_PATTERN[1:-1], t):
                raise ValueError(f"{t!r} is not a terminal id")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for t in value:
            if not 1 <= len(t) <= 64:
                raise ValueError("a tag is 1-64 characters")
        return value

    def everything(self) -> bool:
        return not (self.offices or self.profiles or self.tags or self.terminals)


class RolloutPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=ROLLOUT_ID_PATTERN, description="default: made from the release")
    release: str = Field(pattern=TARGET_PATH_PATTERN, description="a published release's target path")
    targets: Targets = Field(default_factory=Targets)
    waves: list[WavePlan] = Field(min_length=1, max_length=20)
    # "office": each office's maintenance window from the registry; "now": install at once
    window: Literal["office", "now"] = "office"
    deadline: datetime | None = Field(default=None, description="after this the terminals install when idle")
    # the rollout's own install period, inside which the office windows (or "now") still apply
    window_start: datetime | None = Field(
        default=None, description="no install command is sent before this (an aware time); default: at once"
    )
    window_end: datetime | None = Field(
        default=None,
        description="the end of the install period, after window_start; it acts as the deadline (the earlier of"
        " the two applies): after it the terminals install when idle, even outside their office's window",
    )
    gate_s: float = Field(default=120.0, ge=0, le=7 * 24 * 3600)
    approval_required: bool = Field(default=False, description="a second admin approves before it starts")
    on_halt: Literal["pause", "rollback"] = "pause"
    max_retries: int = Field(default=3, ge=0, le=20, description="automatic retries of a transient failure")
    timeouts: dict[str, float] = Field(default_factory=dict, description="seconds per state, overriding defaults")
    note: str = Field(default="", max_length=500)

    @field_validator("timeouts")
    @classmethod
    def _timeouts(cls, value: dict[str, float]) -> dict[str, float]:
        for state, seconds in value.items():
            if state not in DEFAULT_TIMEOUTS:
                raise ValueError(f"no timeout for state {state!r}; states: {', '.join(DEFAULT_TIMEOUTS)}")
            if not 0 < seconds <= 30 * 24 * 3600:
                raise ValueError(f"timeout of {state!r} must be between 0 and 30 days, in seconds")
        return value

    @field_validator("deadline", "window_start", "window_end")
    @classmethod
    def _aware(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"{info.field_name} needs a time zone (e.g. 2026-12-01T02:00:00Z)")
        return value

    @field_validator("window_end")
    @classmethod
    def _end_after_start(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        start = info.data.get("window_start")
        if value is not None and isinstance(start, datetime) and value <= start:
            raise ValueError(
                f"the install period must end after it starts: window_end {value.isoformat()}"
                f" is not after window_start {start.isoformat()}"
            )
        return value


class ControlNote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(default="", max_length=500)


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wave: int | None = Field(default=None, ge=1, le=20, description="only this wave (1-based)")
    note: str = Field(default="", max_length=500)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    release: str | None = Field(
        default=None, pattern=TARGET_PATH_PATTERN, description="default: the release's published rollback twin"
    )
    id: str | None = Field(default=None, pattern=ROLLOUT_ID_PATTERN)
    window: Literal["office", "now"] = "now"
    note: str = Field(default="", max_length=500)
