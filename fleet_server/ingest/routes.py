"""HTTP for what the ingest stored and refused: thin; reads in IngestQueries, streams from the
ingest service. Managers see only their offices' terminals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Path, Query

from fleet_server.auth.deps import FleetDep, ReaderUser
from fleet_server.auth.errors import NotAllowed
from fleet_server.ingest.queries import IngestQueries
from fleet_server.registry.store import UnknownTerminal
from fleet_wire.topics import TERMINAL_ID_PATTERN

if TYPE_CHECKING:
    from fleet_server.app import FleetServer

TerminalId = Annotated[str, Path(pattern=TERMINAL_ID_PATTERN, description="terminal id")]


def ingest_summary_doc(fleet: FleetServer, offices: list[str] | None) -> dict[str, Any]:
    """Stored events by office and type, rejects by reason and stream counts, for `offices` (None: all)."""
    with fleet.reader() as conn:
        q = IngestQueries(conn)
        by_office = q.events_by_office(offices)
        by_type = q.events_by_type(offices)
        rejects = q.rejects_by_reason(offices)
        office_docs = q.offices(offices)
    streams = list(fleet.ingest.streams().items())
    if offices is not None:
        visible = {t.id for t in fleet.registry.terminals() if t.office_id in offices}
        streams = [(key, s) for key, s in streams if key[0] in visible]
    rows = [s for _, s in streams]
    return {
        "events_stored": sum(by_type.values()),
        "by_office": by_office,
        "by_type": by_type,
        "offices": office_docs,
        "duplicates_dropped": sum(s.duplicates for s in rows),
        "dropped_by_terminals": sum(s.dropped for s in rows),
        "quarantined": sum(s.quarantined for s in rows),
        "rejects_recent_by_reason": rejects,
        "streams_with_gaps": sum(1 for s in rows if s.seqs.ranges),
    }


def build_ingest_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1", tags=["ingest"])

    @r.get("/ingest/summary")
    def ingest_summary(user: ReaderUser, fleet: FleetDep) -> dict[str, Any]:
        """Stored events by office and type, duplicates dropped, rejects by reason, streams with gaps."""
        return ingest_summary_doc(fleet, user.office_filter())

    @r.get("/ingest/rejects")
    def ingest_rejects(
        user: ReaderUser, fleet: FleetDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[dict[str, Any]]:
        """The most recent refused messages and events, with reasons (managers: their terminals' only)."""
        with fleet.reader() as conn:
            return IngestQueries(conn).recent_rejects(user.office_filter(), limit)

    @r.get("/terminals/{terminal_id}/streams")
    def terminal_streams(terminal_id: TerminalId, user: ReaderUser, fleet: FleetDep) -> list[dict[str, Any]]:
        """Per-epoch receipt marks of one terminal: stored, dropped by policy, quarantined, gaps."""
        t = fleet.registry.terminal(terminal_id)
        if t is None:
            raise UnknownTerminal(f"terminal {terminal_id!r} is not enrolled")
        if not user.sees_office(t.office_id):
            raise NotAllowed(f"you are not assigned to office {t.office_id!r}")
        rows = [s for (tid, _), s in fleet.ingest.streams().items() if tid == terminal_id]
        return [
            {
                "epoch": s.epoch,
                "upto": s.seqs.upto,
                "ranges": s.seqs.ranges,
                "gaps": s.seqs.missing(),
                "stored": s.stored,
                "dropped": s.dropped,
                "quarantined": s.quarantined,
                "duplicates": s.duplicates,
                "first_seen": s.first_seen,
                "last_seen": s.last_seen,
            }
            for s in rows
        ]

    return r
