"""HTTP for health and alerts (managers see only their offices)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet_server.auth.deps import FleetDep, ReaderUser
from fleet_server.auth.errors import NotAllowed
from fleet_server.registry.store import UnknownTerminal


def build_health_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1/health", tags=["health"])

    @r.get("/terminals")
    def terminals(user: ReaderUser, fleet: FleetDep, office: str | None = None) -> list[dict[str, Any]]:
        """Every visible terminal's state, reason and time of the last transition."""
        if office and not user.sees_office(office):
            raise NotAllowed(f"you are not assigned to office {office!r}")
        return fleet.health.terminals(user.office_filter([office] if office else None))

    @r.get("/terminals/{terminal_id}")
    def terminal(terminal_id: str, user: ReaderUser, fleet: FleetDep) -> dict[str, Any]:
        """One terminal's health with its recent transitions."""
        doc = fleet.health.terminal(terminal_id)
        if doc is None:
            raise UnknownTerminal(f"terminal {terminal_id!r} is not enrolled")
        if not user.sees_office(doc["office"]):
            raise NotAllowed(f"you are not assigned to office {doc['office']!r}")
        return doc

    @r.get("/offices")
    def offices(user: ReaderUser, fleet: FleetDep) -> list[dict[str, Any]]:
        """Counts of online / stale / offline / missing terminals per office."""
        return fleet.health.offices(user.office_filter())

    @r.get("/alerts")
    def alerts(
        user: ReaderUser, fleet: FleetDep, active: bool = True, limit: Annotated[int, Query(ge=1, le=1000)] = 200
    ) -> list[dict[str, Any]]:
        """Alerts firing now (or all, with active=false)."""
        return fleet.health.alerts(active, user.office_filter(), limit)

    return r
