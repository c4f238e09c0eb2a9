"""HTTP for users and the audit log: thin; AuthService does the work and the audit."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.auth.deps import AdminUser, AuditorUser, CurrentUser, FleetDep
from fleet_server.auth.models import Role

NAME_PATTERN = r"^[a-z][a-z0-9._-]{1,63}$"
OFFICE_PATTERN = r"^[a-z][a-z0-9-]{1,31}$"


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    role: Role
    offices: list[Annotated[str, Field(pattern=OFFICE_PATTERN)]] | None = Field(default=None, max_length=100)


class PasswordSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=1, max_length=256, description="the console password (12+ characters)")


# ISO 8601 instants as the audit log stores them (UTC, e.g. 2026-12-01T08:00:00.000Z); prefixes work
AUDIT_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}(T[0-9:.]{2,12}Z?)?$"


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
        known = {o.id for o in fleet.registry.offices()}
        token = fleet.auth.add_user(user, body.name, body.role, body.offices, known)
        return {"name": body.name, "role": body.role.value, "token": token}

    @r.post("/users/{name}/password", status_code=204)
    def set_password(
        name: Annotated[str, Path(pattern=NAME_PATTERN)], body: PasswordSet, user: AdminUser, fleet: FleetDep
    ) -> None:
        """Set a user's console password (the console login; bearer tokens keep working)."""
        fleet.auth.set_password(user, name, body.password)

    @r.get("/users")
    def users(user: AdminUser, fleet: FleetDep) -> list[dict[str, Any]]:
        return [
            {"name": u.name, "role": u.role.value, "offices": None if u.offices is None else sorted(u.offices)}
            for u in fleet.auth.users()
        ]

    @r.get("/audit")
    def audit(
        user: AuditorUser,
        fleet: FleetDep,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        actor: Annotated[str | None, Query(max_length=64)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        target: Annotated[str | None, Query(max_length=200)] = None,
        since: Annotated[str | None, Query(pattern=AUDIT_TIME_PATTERN, description="from this UTC time on")] = None,
        until: Annotated[str | None, Query(pattern=AUDIT_TIME_PATTERN, description="before this UTC time")] = None,
    ) -> list[dict[str, Any]]:
        """Who changed what, when, with before and after (secrets redacted)."""
        return fleet.auth.audit_log(limit, actor, action, target, since, until)

    return r
