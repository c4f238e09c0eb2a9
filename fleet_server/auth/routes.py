"""HTTP for users and the audit log."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.auth.deps import AdminUser, AuditorUser, CurrentUser, FleetDep
from fleet_server.auth.models import Role


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9._-]{1,63}$")
    role: Role
    offices: list[str] | None = None


def build_auth_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["users"])

    @r.get("/me")
    def me(user: CurrentUser) -> dict[str, Any]:
        """Who am I, and what may I see."""
        return {
            "name": user.name,
            "role": user.role.value,
            "offices": None if user.offices is None else sorted(user.offices),
        }

    @r.post("/users", status_code=201)
    def create_user(body: UserCreate, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Create (or re-issue) a user; the bearer token is shown once."""
        known = {o.id for o in fleet.registry.store.offices()}
        unknown = sorted(set(body.offices or []) - known)
        if unknown:
            raise HTTPException(404, f"unknown office(s): {', '.join(unknown)}")
        with fleet.lock:
            before = fleet.auth.store.get_user(body.name)
            try:
                token = fleet.auth.create_user(body.name, body.role, body.offices)
            except ValueError as err:
                raise HTTPException(422, str(err)) from err
            fleet.auth.audit(
                user,
                "user.create",
                body.name,
                None if before is None else {"role": before.role.value},
                {"role": body.role.value, "offices": body.offices},
            )
        return {"name": body.name, "role": body.role.value, "token": token}

    @r.get("/users")
    def users(user: AdminUser, fleet: FleetDep) -> list[dict[str, Any]]:
        return [
            {"name": u.name, "role": u.role.value, "offices": None if u.offices is None else sorted(u.offices)}
            for u in fleet.auth.store.users()
        ]

    @r.get("/audit")
    def audit(
        user: AuditorUser,
        fleet: FleetDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        actor: str | None = None,
        action: str | None = None,
    ) -> list[dict[str, Any]]:
        """Who changed what, when, with before and after (secrets redacted)."""
        with fleet.lock:
            return fleet.auth.store.audit(limit, actor, action)

    return r
