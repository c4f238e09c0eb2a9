"""HTTP for usage statistics: admins see every office, managers only their own (read-only)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from fleet_server.auth.deps import FleetDep, ReaderUser
from fleet_server.auth.errors import NotAllowed
from fleet_server.auth.models import User
from fleet_server.registry.schemas import OFFICE_ID_PATTERN
from fleet_server.usage import charts
from fleet_server.usage.schemas import BusyHours, HourTable, ItemTable, OfficeComparison, PeriodComparison
from fleet_server.usage.service import UnknownOffice, UsageService

DEFAULT_RANGE_DAYS = 7


def get_usage(fleet: FleetDep) -> UsageService:
    """The server's usage service."""
    return fleet.usage


UsageDep = Annotated[UsageService, Depends(get_usage)]
OfficeQuery = Annotated[
    list[Annotated[str, Query(pattern=OFFICE_ID_PATTERN)]] | None,
    Query(
        alias="office",
        max_length=100,
        description="office id; repeat for several; default: every office you may see",
    ),
]
# Days the service can turn into UTC ranges without overflowing `date` (and no fleet is older).
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2099, 12, 31)
DateFrom = Annotated[
    date | None,
    Query(ge=FIRST_DAY, le=LAST_DAY, description="first office-local day (ISO), default: 6 days before date_to"),
]
DateTo = Annotated[
    date | None,
    Query(ge=FIRST_DAY, le=LAST_DAY, description="last office-local day (ISO), inclusive; default: today"),
]
Metric = Annotated[str, Query(pattern="^(" + "|".join(charts.OFFICE_METRICS) + ")$", description="figure to compare")]


def _offices(usage: UsageService, user: User, requested: list[str] | None) -> list[str] | None:
    """Offices the query covers: unknown ones are 404, ones the user may not see are 403."""
    if requested:
        known = {o.id for o in usage.offices()}
        unknown = [o for o in dict.fromkeys(requested) if o not in known]
        if unknown:
            raise UnknownOffice(unknown, sorted(known))
        hidden = [o for o in requested if not user.sees_office(o)]
        if hidden:
            raise NotAllowed(
                f"user {user.name!r} may not see usage of office "
                f"{', '.join(repr(o) for o in hidden)}; assigned: "
                f"{', '.join(sorted(user.offices or ()))}"
            )
    return user.office_filter(requested or None)


def _range(usage: UsageService, date_from: date | None, date_to: date | None) -> tuple[date, date]:
    if date_to is None:
        date_to = usage.default_range()[1] if date_from is None else max(date_from, usage.default_range()[1])
    if date_from is None:
        date_from = date_to - timedelta(days=DEFAULT_RANGE_DAYS - 1)
    return date_from, date_to


def build_usage_router() -> APIRouter:
    """Routes under /api/v1/usage; every one needs the admin or manager role."""
    router = APIRouter(prefix="/api/v1/usage", tags=["usage"])

    @router.get("/items", response_model=ItemTable)
    def items(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> ItemTable:
        """Per office x service item: started, completed, abandoned, rates, median and p90 duration."""
        offices = _offices(usage, user, office)
        return usage.item_table(offices, *_range(usage, date_from, date_to))

    @router.get("/hourly", response_model=HourTable)
    def hourly(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> HourTable:
        """The stored hour buckets per office x day x hour x service item."""
        offices = _offices(usage, user, office)
        return usage.hour_table(offices, *_range(usage, date_from, date_to))

    @router.get("/busy-hours", response_model=BusyHours)
    def busy_hours(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> BusyHours:
        """Share of sessions by office-local weekday x hour, and by hour of day."""
        offices = _offices(usage, user, office)
        return usage.busy_hours(offices, *_range(usage, date_from, date_to))

    @router.get("/offices", response_model=OfficeComparison)
    def compare_offices(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> OfficeComparison:
        """Offices side by side: completion and abandon rates, durations, sessions per terminal-day."""
        offices = _offices(usage, user, office)
        return usage.compare_offices(offices, *_range(usage, date_from, date_to))

    @router.get("/periods", response_model=PeriodComparison)
    def compare_periods(
        user: ReaderUser,
        usage: UsageDep,
        base_from: Annotated[
            date, Query(ge=FIRST_DAY, le=LAST_DAY, description="first day of the base period, e.g. the pilot")
        ],
        base_to: Annotated[date, Query(ge=FIRST_DAY, le=LAST_DAY, description="last day of the base period")],
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> PeriodComparison:
        """Each office in a base period (e.g. the pilot) next to another period, with the changes."""
        offices = _offices(usage, user, office)
        return usage.compare_periods(offices, base_from, base_to, *_range(usage, date_from, date_to))

    @router.get(
        "/export.csv",
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}, "description": "UTF-8 CSV with BOM"}},
    )
    def export_csv(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
        granularity: Literal["total", "day", "hour"] = "total",
    ) -> Response:
        """The rollups as CSV for Excel: one row per office x item (x day, x hour)."""
        offices = _offices(usage, user, office)
        first, last = _range(usage, date_from, date_to)
        text = usage.export_csv(offices, first, last, granularity)
        filename = f"usage-{granularity}-{first}-{last}.csv"
        return Response(
            text.encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @router.get("/charts/busy-hours.svg", response_class=Response)
    def busy_hours_chart(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> Response:
        """Bar chart of the busy-hour profile."""
        offices = _offices(usage, user, office)
        profile = usage.busy_hours(offices, *_range(usage, date_from, date_to))
        names = _office_names(usage, profile.offices)
        # a title line holds three names; beyond that, say how many offices are pooled
        label = ", ".join(names) if len(names) <= 3 else f"{len(names)} 个办事处 offices"
        title = "繁忙时段 busy hours · " + label
        return _svg(charts.busy_hours_svg(profile, title))

    @router.get("/charts/items.svg", response_class=Response)
    def items_chart(
        user: ReaderUser,
        usage: UsageDep,
        office: Annotated[str, Query(pattern=OFFICE_ID_PATTERN, description="one office id")],
        date_from: DateFrom = None,
        date_to: DateTo = None,
    ) -> Response:
        """Stacked completed / abandoned bars per service item of one office."""
        offices = _offices(usage, user, [office])
        table = usage.item_table(offices, *_range(usage, date_from, date_to))
        title = f"业务事项 service items · {_office_names(usage, [office])[0]} · {table.date_from} – {table.date_to}"
        return _svg(charts.items_svg(table, title))

    @router.get("/charts/offices.svg", response_class=Response)
    def offices_chart(
        user: ReaderUser,
        usage: UsageDep,
        office: OfficeQuery = None,
        date_from: DateFrom = None,
        date_to: DateTo = None,
        metric: Metric = "completion_rate",
    ) -> Response:
        """Bars comparing one figure across offices."""
        offices = _offices(usage, user, office)
        comparison = usage.compare_offices(offices, *_range(usage, date_from, date_to))
        return _svg(charts.offices_svg(comparison, metric, "网点对比 offices compared"))

    return router


def _office_names(usage: UsageService, office_ids: list[str]) -> list[str]:
    names = {o.id: o.name for o in usage.offices()}
    return [names.get(o, o) for o in office_ids]


def _svg(text: str) -> Response:
    return Response(text, media_type="image/svg+xml; charset=utf-8", headers={"Cache-Control": "private, max-age=60"})
