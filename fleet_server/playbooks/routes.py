"""HTTP for playbook runs (admins only): thin; PlaybookService runs them, RegistryAdmin audits."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from fleet_server.auth.deps import AdminUser, FleetDep
from fleet_server.playbooks.schemas import PLAYBOOK_NAME_PATTERN, PlaybookInfo, RunCreate, RunDetail, RunPublic

# SQLite integers are signed 64-bit: a larger id can name no row, so it is refused as input.
SQLITE_INT_MAX = 2**63 - 1
PlaybookName = Annotated[str, Path(pattern=PLAYBOOK_NAME_PATTERN, description="playbook name, e.g. provision_terminal")]
RunId = Annotated[int, Path(ge=1, le=SQLITE_INT_MAX)]
Filter = Annotated[str | None, Query(min_length=1, max_length=200)]


def build_playbooks_router() -> APIRouter:
    """Routes under /api/v1/playbooks: list playbooks, start a run, read runs and their events."""
    router = APIRouter(prefix="/api/v1/playbooks", tags=["playbooks"])

    @router.get("", response_model=list[PlaybookInfo])
    def list_playbooks(user: AdminUser, fleet: FleetDep) -> list[PlaybookInfo]:
        """The playbooks this server can run."""
        return fleet.playbooks.playbooks()

    @router.get("/runs", response_model=list[RunPublic])
    def list_runs(
        user: AdminUser,
        fleet: FleetDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        playbook: Filter = None,
        target: Filter = None,
    ) -> list[RunPublic]:
        """Recent runs, newest first."""
        return fleet.playbooks.runs(limit, playbook, target)

    @router.get("/runs/{run_id}", response_model=RunDetail)
    def get_run(run_id: RunId, user: AdminUser, fleet: FleetDep) -> RunDetail:
        """One run with its per-task events."""
        return fleet.playbooks.get_run(run_id)

    @router.post("/{name}/runs", status_code=202, response_model=RunPublic)
    def start_run(name: PlaybookName, body: RunCreate, user: AdminUser, fleet: FleetDep) -> RunPublic:
        """Start a run; 202 with the queued run, to be followed at /runs/{id}."""
        return fleet.admin.start_playbook_run(
            name, user, target=body.target, extravars=body.extravars, limit=body.limit
        )

    return router
