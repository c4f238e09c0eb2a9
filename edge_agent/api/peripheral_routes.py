"""Local HTTP for peripheral readings: the kiosk app, which drives the printers, the ID-card reader
and the QR scanner through their vendors' SDKs, reports what they tell it here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, params
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from edge_agent.health.monitor import MAX_READINGS_PER_REPORT, HealthMonitor, ReadingRefused


class ReadingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peripheral: str = Field(
        min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]{0,31}$", examples=["receipt_printer"]
    )
    readings: dict[str, StrictInt | StrictFloat] = Field(
        default_factory=dict,
        max_length=MAX_READINGS_PER_REPORT,
        examples=[{"paper_left_pct": 8, "cutter_errors_per_day": 0}],
        description="check name (from the device profile) -> measured value",
    )
    fault: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="what the vendor SDK reports as broken right now, in plain words; omit when fine",
    )


def build_peripheral_router(monitor: HealthMonitor, dependencies: Sequence[params.Depends] | None = None) -> APIRouter:
    """Routes for the kiosk app's peripheral reports (add the API's auth through `dependencies`)."""
    r = APIRouter(prefix="/v1/peripherals", tags=["peripherals"], dependencies=list(dependencies or []))

    @r.post("/readings")
    def post_readings(report: ReadingsIn) -> Any:
        """Report a peripheral's latest readings; answers its state as judged by the device profile.

        Readings are named after the profile's checks (`paper_left_pct`, `read_ms`, …); each one
        counts until a newer one arrives or it grows stale. A report without `fault` clears an
        earlier fault.
        """
        try:
            return {
                "peripheral": report.peripheral,
                **monitor.report(report.peripheral, dict(report.readings), report.fault),
            }
        except ReadingRefused as err:
            return JSONResponse({"error": err.code, "detail": str(err), "where": "body"}, status_code=422)

    @r.get("")
    def peripherals() -> dict[str, Any]:
        """The profile's peripherals (kind, required, checks) and each one's state, and the host's."""
        profile = monitor.profile
        return {
            "profile": {
                "id": profile.id,
                "peripherals": {
                    p.id: {"kind": p.kind, "required": p.required, "checks": list(p.checks)}
                    for p in profile.peripherals
                },
            },
            "host": monitor.host(),
            "peripherals": monitor.peripherals(),
        }

    return r
