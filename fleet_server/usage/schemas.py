"""Usage response models (definitions of the figures: fleet_server.usage.figures)."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel, ConfigDict, Field


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class Figures(_Public):
    """Counts and derived figures of one bucket or one aggregate."""

    started: int = 0
    completed: int = 0
    abandoned: int = 0
    face_login_sessions: int = 0
    completion_rate: float | None = Field(None, description="completed / (completed + abandoned)")
    abandon_rate: float | None = Field(None, description="abandoned / (completed + abandoned)")
    face_login_share: float | None = Field(None, description="started with face login / started")
    median_duration_s: float | None = Field(
        None, description="median of completed durations (exact over any range: every stored duration counts)"
    )
    p90_duration_s: float | None = Field(
        None, description="nearest-rank p90 of completed durations (exact, always an observed duration)"
    )


class ItemRow(Figures):
    office_id: str
    service_code: str
    name: str = Field(description="item name from the catalogue (Chinese)")
    name_en: str


class ItemTable(_Public):
    date_from: date
    date_to: date
    offices: list[str]
    rows: list[ItemRow]


class HourRow(Figures):
    office_id: str
    day: date
    hour: int = Field(ge=0, le=23)
    service_code: str
    name: str
    name_en: str


class HourTable(_Public):
    date_from: date
    date_to: date
    offices: list[str]
    rows: list[HourRow]


class BusyCell(_Public):
    weekday: int = Field(ge=0, le=6, description="0 = Monday")
    hour: int = Field(ge=0, le=23)
    started: int
    share: float = Field(description="share of all started sessions in the range")


class BusyHour(_Public):
    hour: int = Field(ge=0, le=23)
    started: int
    share: float


class BusyHours(_Public):
    date_from: date
    date_to: date
    offices: list[str]
    started: int
    cells: list[BusyCell] = Field(description="weekday x hour, only cells with sessions")
    by_hour: list[BusyHour] = Field(description="all 24 office-local hours, weekdays summed")


class OfficeFigures(Figures):
    office_id: str
    name: str
    name_en: str
    pilot: bool
    terminal_days: int = Field(description="sum over days of terminals with any session that day")
    sessions_per_terminal_day: float | None


class OfficeComparison(_Public):
    date_from: date
    date_to: date
    offices: list[OfficeFigures]
    total: Figures


class PeriodFigures(_Public):
    office_id: str
    name: str
    base: OfficeFigures
    current: OfficeFigures
    started_change: float | None = Field(description="current / base started - 1")
    completion_rate_change: float | None = Field(description="current - base, in rate points")
    median_duration_change_s: float | None


class PeriodComparison(_Public):
    base_from: date
    base_to: date
    date_from: date
    date_to: date
    offices: list[PeriodFigures]
