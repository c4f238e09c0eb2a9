"""HTTP for playbook runs (admins only): thin; PlaybookService does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, HTTPException, Query

from fleet_server.auth.deps import AdminUser, FleetDep
from fleet_server.playbooks.redaction import redact, secret_values
from fleet_server.playbooks.schemas import PlaybookInfo, RunCreate, RunDetail, RunPublic
from fleet_server.playbooks.service import NoInventory, RunNotFound, UnknownPlaybook

if TYPE_CHECKING:
    from fleet_server.app import FleetServer
    from fleet_server.playbooks.service import PlaybookService


def _service(fleet: "FleetServer") -> "PlaybookService":
    service = getattr(fleet, "playbooks", None)
    if service is None:
        raise HTTPException(503, "playbook runs are not configured on this server")
    return service  # type: ignore[no-any-return]


def build_playbooks_router() -> APIRouter:
    """Routes under /api/v1/playbooks: list playbooks, start a run, read runs and their events."""
    router = APIRouter(prefix="/api/v1/playbooks", tags=["playbooks"])

    @router.get("", response_model=list[PlaybookInfo])
    def list_playbooks(user: AdminUser, fleet: FleetDep) -> list[PlaybookInfo]:
        """The playbooks this server can run."""
        return _service(fleet).playbooks()

    @router.get("/runs", response_model=list[RunPublic])
    def list_runs(
        user: AdminUser,
        fleet: FleetDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        playbook: str | None = None,
        target: str | None = None,
    ) -> list[RunPublic]:
        """Recent runs, newest first."""
        return _service(fleet).runs(limit, playbook, target)

    @router.get("/runs/{run_id}", response_model=RunDetail)
    def get_run(run_id: int, user: AdminUser, fleet: FleetDep) -> RunDetail:
        """One run with its per-task events."""
        try:
            return _service(fleet).get_run(run_id)
        except RunNotFound as err:
            raise HTTPException(404, str(err)) from err

    @router.post("/{name}/runs", status_code=202, response_model=RunPublic)
    def start_run(name: str, body: RunCreate, user: AdminUser, fleet: FleetDep) -> RunPublic:
        """Start a run; 202 with the queued run, to be followed at /runs/{id}."""
        service = _service(fleet)
        try:
            run_id = service.start_run(
                name, started_by=user.name, target=body.target, extravars=body.extravars, limit=body.limit
            )
        except UnknownPlaybook as err:
            raise HTTPException(404, str(err)) from err
        except NoInventory as err:
            raise HTTPException(409, str(err)) from err
        run = service.get_run(run_id)
        with fleet.lock:
            fleet.auth.audit(
                user,
                "playbook.run",
                run.target,
                before=None,
                after={
                    "run_id": run_id,
                    "playbook": run.playbook,
                    "limit": body.limit,
                    "extravars": redact(body.extravars, secret_values(body.extravars)),
                },
            )
        return RunPublic(**run.model_dump(exclude={"events"}))

    return router
