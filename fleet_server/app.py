"""Composition root of the fleet server: `FleetServer` wires components, `create_app` serves them."""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_server import __version__
from fleet_server.config import ServerSettings
from fleet_server.db import connect, migrate
from fleet_server.ingest.link import ServerLink, ServerLinkSettings
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.service import IngestService
from fleet_server.auth.deps import ReaderUser
from fleet_server.auth.models import Role
from fleet_server.auth.service import AuthService
from fleet_server.registry.service import RegistryService

log = logging.getLogger(__name__)


class FleetServer:
    """Everything the server runs, built from settings; nothing is built at import time."""

    def __init__(self, settings: ServerSettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics_registry = registry or CollectorRegistry()
        migrate(settings.db_path)
        self._conn = connect(settings.db_path)
        # One shared writer connection for admin changes; this lock keeps two request threads from
        # interleaving statements inside each other's transaction. Readers open their own.
        self.lock = threading.RLock()
        self.registry = RegistryService(self._conn)
        self.auth = AuthService(self._conn)
        if settings.admin_token:
            self.auth.create_user("admin", Role.ADMIN, token=settings.admin_token)
        self.registry.seed_offices(settings.offices_file)
        self.ingest_metrics = IngestMetrics(self.metrics_registry)
        self.ingest = IngestService(str(settings.db_path), self.ingest_metrics,
                                    self.registry.store.enabled_terminal_offices)
        self.link = ServerLink(ServerLinkSettings(
            settings.broker_host, settings.broker_port, settings.broker_username,
            settings.broker_password, settings.broker_client_id, settings.tls_ca), self.ingest)
        self._running = False

    def start(self) -> None:
        if self._running:
            return
        self.ingest.start()
        self.link.start()
        self._running = True

    def stop(self) -> None:
        if not self._running:
            return
        self.link.stop()
        self.ingest.stop()
        self._running = False

    def close(self) -> None:
        self.stop()
        self._conn.close()

    def reader(self) -> Any:
        return connect(self.settings.db_path, readonly=True)


def create_app(settings: ServerSettings, server: FleetServer | None = None) -> FastAPI:
    """The HTTP app; it starts and stops the server's components with its own lifespan."""
    fleet = server or FleetServer(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        fleet.start()
        try:
            yield
        finally:
            fleet.stop()

    app = FastAPI(title="kiosk-fleet server", version=__version__, lifespan=lifespan)
    app.state.fleet = fleet
    api = APIRouter(prefix="/api/v1")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {"ok": fleet.link.connected.is_set(), "broker_connected": fleet.link.connected.is_set(),
                "ingest_queue": fleet.ingest._queue.qsize(), "version": __version__}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(fleet.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/ingest/summary")
    def ingest_summary(user: ReaderUser) -> dict[str, Any]:
        """Stored events by office and type, duplicates dropped, rejects by reason, streams with gaps."""
        return ingest_summary_doc(fleet)

    @api.get("/ingest/rejects")
    def ingest_rejects(user: ReaderUser, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """The most recent refused messages and events, with reasons."""
        with fleet.reader() as conn:
            cur = conn.execute("SELECT at, terminal, topic, reason, detail, epoch, seq, size FROM rejects"
                               " ORDER BY id DESC LIMIT ?", (limit,))
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur]

    @api.get("/terminals")
    def terminals(user: ReaderUser) -> list[dict[str, Any]]:
        """Enrolled terminals with their last reported status."""
        with fleet.reader() as conn:
            status = {r[0]: {"state": r[1], "reason": r[2], "since": r[3], "last_seen": r[4]}
                      for r in conn.execute("SELECT terminal, state, reason, since, last_seen FROM terminal_status")}
        return [{**t.model_dump(), "status": status.get(t.id)} for t in fleet.registry.store.terminals()]

    @api.get("/terminals/{terminal_id}/streams")
    def terminal_streams(terminal_id: str, user: ReaderUser) -> list[dict[str, Any]]:
        """Per-epoch receipt marks of one terminal: stored, dropped by policy, quarantined, gaps."""
        rows = [r for (t, _), r in fleet.ingest.streams().items() if t == terminal_id]
        if not rows and terminal_id not in {t.id for t in fleet.registry.store.terminals()}:
            raise HTTPException(404, f"terminal {terminal_id!r} is not enrolled")
        return [{"epoch": r.epoch, "upto": r.seqs.upto, "ranges": r.seqs.ranges,
                 "gaps": r.seqs.missing(), "stored": r.stored, "dropped": r.dropped,
                 "quarantined": r.quarantined, "duplicates": r.duplicates,
                 "first_seen": r.first_seen, "last_seen": r.last_seen} for r in rows]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return render_home(ingest_summary_doc(fleet))

    app.include_router(api)
    return app


def ingest_summary_doc(fleet: FleetServer) -> dict[str, Any]:
    with fleet.reader() as conn:
        by_office = dict(conn.execute("SELECT office_id, count(*) FROM events GROUP BY office_id"))
        by_type = dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type"))
        rejects = dict(conn.execute("SELECT reason, count(*) FROM rejects GROUP BY reason"))
        online = dict(conn.execute("SELECT state, count(*) FROM terminal_status GROUP BY state"))
        offices = {r[0]: {"name": r[1], "pilot": bool(r[2])}
                   for r in conn.execute("SELECT id, name, pilot FROM offices")}
    streams = fleet.ingest.streams().values()
    return {
        "events_stored": sum(by_type.values()),
        "by_office": by_office,
        "by_type": by_type,
        "offices": offices,
        "duplicates_dropped": sum(s.duplicates for s in streams),
        "dropped_by_terminals": sum(s.dropped for s in streams),
        "quarantined": sum(s.quarantined for s in streams),
        "rejects_recent_by_reason": rejects,
        "terminals_by_state": online,
        "streams_with_gaps": sum(1 for s in streams if s.seqs.ranges),
    }


def render_home(doc: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(o['name'])}{' · 试点' if o['pilot'] else ''}</td>"
        f"<td style='text-align:right'>{doc['by_office'].get(oid, 0)}</td></tr>"
        for oid, o in doc["offices"].items())
    pretty = html.escape(json.dumps({k: v for k, v in doc.items() if k != "offices"},
                                    ensure_ascii=False, indent=2))
    return (
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>kiosk-fleet</title>"
        "<meta http-equiv='refresh' content='5'></head><body style='font-family:sans-serif;margin:2em'>"
        "<h1>kiosk-fleet · 智能服务终端</h1>"
        f"<p>{doc['events_stored']} events stored · terminals {html.escape(str(doc['terminals_by_state']))}"
        f" · duplicates dropped {doc['duplicates_dropped']}</p>"
        f"<table><tr><th>Office</th><th>Events</th></tr>{rows}</table>"
        "<p><a href='/docs'>API</a> · <a href='/metrics'>metrics</a></p>"
        f"<pre>{pretty}</pre></body></html>")
