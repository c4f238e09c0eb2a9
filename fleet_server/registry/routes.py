"""HTTP for offices and terminals: thin; rules live in RegistryService and RegistryAdmin."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.auth.deps import AdminUser, FleetDep, ReaderUser
from fleet_server.registry.schemas import OFFICE_ID_PATTERN, Office, TerminalCreate
from fleet_wire.topics import TERMINAL_ID_PATTERN

TerminalId = Annotated[str, Path(pattern=TERMINAL_ID_PATTERN, description="terminal id")]
OfficeId = Annotated[str, Path(pattern=OFFICE_ID_PATTERN, description="office id")]


class TerminalEnrolled(BaseModel):
    terminal: dict[str, Any]
    mqtt_username: str
    mqtt_password: str = Field(description="shown once; stored only as a hash")


class OnboardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    terminals: list[TerminalCreate] = Field(min_length=1, max_length=200)
    run_playbook: bool = False


def build_registry_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["registry"])

    @r.get("/offices")
    def offices(user: ReaderUser, fleet: FleetDep) -> list[dict[str, Any]]:
        """Offices the caller may see, with health counts."""
        allowed = user.office_filter()
        health = {o["office"]: o for o in fleet.health.offices(allowed)}
        return [
            {**o.model_dump(), "health": health.get(o.id)}
            for o in fleet.registry.offices()
            if allowed is None or o.id in allowed
        ]

    @r.post("/offices", status_code=201)
    def add_office(office: Office, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Add or update an office (data, not code)."""
        fleet.admin.upsert_office(office, user)
        return office.model_dump()

    @r.get("/profiles")
    def profiles(user: ReaderUser, fleet: FleetDep) -> list[dict[str, Any]]:
        """Terminal models (device profiles) with their peripherals and health thresholds."""
        return [p.model_dump(mode="json") for p in fleet.profiles.values()]

    @r.get("/terminals")
    def terminals(
        user: ReaderUser,
        fleet: FleetDep,
        office: Annotated[str | None, Query(pattern=OFFICE_ID_PATTERN)] = None,
    ) -> list[dict[str, Any]]:
        """Terminals with their health, for the offices the caller may see."""
        allowed = user.office_filter([office] if office else None)
        health = {h["terminal"]: h for h in fleet.health.terminals(allowed)}
        return [
            {**t.model_dump(), "health": health.get(t.id)}
            for t in fleet.registry.terminals()
            if allowed is None or t.office_id in allowed
        ]

    @r.post("/terminals", status_code=201, response_model=TerminalEnrolled)
    def enrol(body: TerminalCreate, user: AdminUser, fleet: FleetDep) -> Any:
        """Enrol a terminal: registry entry + its own broker credentials (password shown once)."""
        terminal, password = fleet.admin.enrol_terminal(body, user)
        return TerminalEnrolled(terminal=terminal.model_dump(), mqtt_username=terminal.id, mqtt_password=password)

    @r.delete("/terminals/{terminal_id}", status_code=200)
    def revoke(terminal_id: TerminalId, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Revoke a terminal: its broker account goes and its connection is cut."""
        fleet.admin.revoke_terminal(terminal_id, user)
        return {"terminal": terminal_id, "revoked": True}

    @r.post("/terminals/{terminal_id}/credentials")
    def rotate(terminal_id: TerminalId, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Issue new broker credentials for a terminal (the old password stops working)."""
        password = fleet.admin.rotate_credentials(terminal_id, user)
        return {"terminal": terminal_id, "mqtt_username": terminal_id, "mqtt_password": password}

    @r.post("/offices/{office_id}/onboard", status_code=201)
    def onboard(office_id: OfficeId, body: OnboardRequest, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Onboard an office: enrol all its terminals (all or none), then optionally run the playbook."""
        return fleet.admin.onboard_office(office_id, body.terminals, user, run_playbook=body.run_playbook)

    return r
