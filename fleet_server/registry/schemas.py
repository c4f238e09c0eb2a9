"""Registry models: what an office and a terminal are, validated."""

from __future__ import annotations

import re
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet_wire.topics import TERMINAL_ID_PATTERN

OFFICE_ID_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"
_DAY = r"(mon|tue|wed|thu|fri|sat|sun)"
# "mon-fri", "sat", "mon,wed,fri-sun": what the health rules read as opening days
_DAYS_RE = re.compile(rf"^{_DAY}(-{_DAY})?(,{_DAY}(-{_DAY})?)*$")
_HOURS_RE = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")


class Office(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=OFFICE_ID_PATTERN)
    name: str = Field(min_length=1, max_length=64)
    name_en: str = Field(min_length=1, max_length=64)
    district: str = Field(min_length=1, max_length=64)
    pilot: bool = False
    timezone: str = Field(default="Asia/Shanghai", min_length=1, max_length=64)
    hours: dict[Annotated[str, Field(min_length=1, max_length=16)], str] = Field(
        default_factory=lambda: {"mon-fri": "08:30-17:00"}, max_length=14
    )
    maintenance: str = "01:00-05:00"

    @field_validator("maintenance")
    @classmethod
    def _window(cls, value: str) -> str:
        if not _HOURS_RE.match(value):
            raise ValueError(f"maintenance window {value!r} must look like 01:00-05:00")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"timezone {value!r} is not an IANA time zone (e.g. Asia/Shanghai)") from err
        return value

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: dict[str, str]) -> dict[str, str]:
        for day, span in value.items():
            if not _DAYS_RE.match(day):
                raise ValueError(f"opening days {day!r} must look like mon-fri, sat or mon,wed")
            if not _HOURS_RE.match(span):
                raise ValueError(f"opening hours for {day!r}: {span!r} must look like 08:30-17:00")
        return value


class TerminalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TERMINAL_ID_PATTERN)
    office_id: str = Field(min_length=1, max_length=64)
    profile: str = Field(default="generic", min_length=1, max_length=64)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=32)


class TerminalPublic(BaseModel):
    id: str
    office_id: str
    profile: str
    tags: list[str]
    enabled: bool
    created_at: str
    revoked_at: str | None = None


def load_offices_yaml(doc: Any, source: str = "offices.yaml") -> list[Office]:
    """Validate the offices seed document (defaults merged into each office)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("offices"), list):
        raise ValueError(f"{source}: expected a mapping with an 'offices' list")
    defaults = doc.get("defaults") or {}
    out: list[Office] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["offices"]):
        try:
            office = Office(**{**defaults, **raw})
        except Exception as err:
            raise ValueError(f"{source}: offices[{i}]: {err}") from err
        if office.id in seen:
            raise ValueError(f"{source}: offices[{i}]: duplicate office id {office.id!r}")
        seen.add(office.id)
        out.append(office)
    return out
