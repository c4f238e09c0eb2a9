"""`GET /v1/update`: what the updater is doing, read-only (the kiosk app may show "updating
tonight"; a technician sees the trial and the failed releases)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

if TYPE_CHECKING:
    from edge_agent.update.updater import Updater


def build_update_router(updater: Updater) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/update")
    def update_status() -> dict[str, Any]:
        """Running release, committed releases per kind, the job in progress, the trial, failed releases."""
        return updater.status()

    return router
