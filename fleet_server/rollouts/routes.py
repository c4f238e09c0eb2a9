"""HTTP for rollouts under /api/v1/rollouts, and a terminal's update timeline.

Admins plan and act; managers and auditors may read, never act (403 from the server itself)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query

from fleet_server.auth.deps import AdminUser, FleetDep, require_role
from fleet_server.auth.errors import NotAllowed
from fleet_server.auth.models import Role, User
from fleet_server.registry.store import UnknownTerminal
from fleet_server.rollouts.schemas import SERVER_STATES, ControlNote, RetryRequest, RollbackRequest, RolloutPlan
from fleet_server.rollouts.service import RolloutService
from fleet_wire.release import ROLLOUT_ID_PATTERN
from fleet_wire.topics import TERMINAL_ID_PATTERN

ReadUser = Annotated[User, Depends(require_role(Role.ADMIN, Role.MANAGER, Role.AUDITOR))]
RolloutId = Annotated[str, Path(pattern=ROLLOUT_ID_PATTERN, description="rollout id")]
TerminalId = Annotated[str, Path(pattern=TERMINAL_ID_PATTERN, description="terminal id")]
NoteBody = Annotated[ControlNote | None, Body()]


def get_rollouts(fleet: FleetDep) -> RolloutService:
    return fleet.rollouts


RolloutsDep = Annotated[RolloutService, Depends(get_rollouts)]


def build_rollouts_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["rollouts"])

    @router.get("/rollouts")
    def list_rollouts(
        user: ReadUser,
        rollouts: RolloutsDep,
        state: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
    ) -> list[dict[str, Any]]:
        """Rollouts, newest first (or those in one state, oldest first)."""
        return rollouts.list_rollouts(state)

    @router.post("/rollouts/preview")
    def preview(user: ReadUser, rollouts: RolloutsDep, plan: RolloutPlan) -> dict[str, Any]:
        """Which terminals each wave would hit, flagged; nothing is created."""
        return rollouts.preview(plan)

    @router.post("/rollouts", status_code=201)
    def create(user: AdminUser, rollouts: RolloutsDep, plan: RolloutPlan) -> dict[str, Any]:
        """Create a rollout: its waves are fixed now (the preview it returns is what it will do)."""
        return rollouts.create(plan, user)

    @router.get("/rollouts/{rollout_id}")
    def get(user: ReadUser, rollouts: RolloutsDep, rollout_id: RolloutId) -> dict[str, Any]:
        """A rollout: its waves, counts per state per wave and office, and why it stands as it does.
        A manager sees the office breakdowns of their own offices only."""
        doc = rollouts.get(rollout_id)
        if user.offices is not None:
            doc["offices"] = [o for o in doc["offices"] if user.sees_office(o["office"])]
            for w in doc["waves"]:
                w["offices"] = [o for o in w["offices"] if user.sees_office(o["office"])]
        return doc

    @router.get("/rollouts/{rollout_id}/terminals")
    def terminals(
        user: ReadUser,
        rollouts: RolloutsDep,
        rollout_id: RolloutId,
        wave: Annotated[int | None, Query(ge=1, le=20)] = None,
        state: Annotated[str | None, Query(pattern="^(" + "|".join(SERVER_STATES) + ")$")] = None,
    ) -> list[dict[str, Any]]:
        """Each terminal's state in the rollout with its history (a manager: their offices' only)."""
        return [t for t in rollouts.terminals(rollout_id, wave, state) if user.sees_office(t["office"])]

    @router.post("/rollouts/{rollout_id}/approve")
    def approve(user: AdminUser, rollouts: RolloutsDep, rollout_id: RolloutId, body: NoteBody = None) -> dict[str, Any]:
        """Approve the start or the next wave; the creator cannot approve their own rollout."""
        return rollouts.approve(rollout_id, user, body.note if body else "")

    @router.post("/rollouts/{rollout_id}/pause")
    def pause(user: AdminUser, rollouts: RolloutsDep, rollout_id: RolloutId, body: NoteBody = None) -> dict[str, Any]:
        return rollouts.pause(rollout_id, user, body.note if body else "")

    @router.post("/rollouts/{rollout_id}/resume")
    def resume(user: AdminUser, rollouts: RolloutsDep, rollout_id: RolloutId, body: NoteBody = None) -> dict[str, Any]:
        return rollouts.resume(rollout_id, user, body.note if body else "")

    @router.post("/rollouts/{rollout_id}/abort")
    def abort(user: AdminUser, rollouts: RolloutsDep, rollout_id: RolloutId, body: NoteBody = None) -> dict[str, Any]:
        return rollouts.abort(rollout_id, user, body.note if body else "")

    @router.post("/rollouts/{rollout_id}/retry")
    def retry(
        user: AdminUser,
        rollouts: RolloutsDep,
        rollout_id: RolloutId,
        body: Annotated[RetryRequest | None, Body()] = None,
    ) -> dict[str, Any]:
        """Send the release again to the failed terminals only."""
        req = body or RetryRequest()
        return rollouts.retry(rollout_id, user, req.wave, req.note)

    @router.post("/rollouts/{rollout_id}/rollback", status_code=201)
    def rollback(
        user: AdminUser,
        rollouts: RolloutsDep,
        rollout_id: RolloutId,
        body: Annotated[RollbackRequest | None, Body()] = None,
    ) -> dict[str, Any]:
        """A new rollout over the same terminals to the rollback twin (or a named release)."""
        return rollouts.rollback(rollout_id, user, body or RollbackRequest())

    @router.get("/terminals/{terminal_id}/updates")
    def terminal_updates(
        user: ReadUser, fleet: FleetDep, rollouts: RolloutsDep, terminal_id: TerminalId
    ) -> dict[str, Any]:
        """That terminal's update timeline over every rollout."""
        terminal = fleet.registry.terminal(terminal_id)
        if terminal is None:
            raise UnknownTerminal(f"no terminal {terminal_id!r} is enrolled")
        if not user.sees_office(terminal.office_id):
            raise NotAllowed(
                f"user {user.name!r} may not see terminal {terminal_id!r} of office {terminal.office_id!r}"
            )
        return rollouts.terminal_updates(terminal_id)

    return router
