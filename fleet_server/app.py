"""Composition root of the fleet server: `FleetServer` wires components, `create_app` serves them."""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_server import __version__
from fleet_server.auth.deps import ReaderUser
from fleet_server.auth.models import Role
from fleet_server.auth.routes import build_auth_router
from fleet_server.auth.service import AuthService
from fleet_server.broker.accounts import BrokerAccounts
from fleet_server.config import ConfigurationError, ServerSettings
from fleet_server.db import connect, migrate
from fleet_server.health import service as health_service
from fleet_server.health.routes import build_health_router
from fleet_server.health.service import HealthLimits, HealthService, OfficeInfo
from fleet_server.ingest.link import ServerLink, ServerLinkSettings
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.service import IngestService
from fleet_server.playbooks import store as playbook_store
from fleet_server.playbooks.routes import build_playbooks_router
from fleet_server.playbooks.service import PlaybookService
from fleet_server.registry.admin import RegistryAdmin
from fleet_server.registry.profiles import load_profiles
from fleet_server.registry.routes import build_registry_router, registry_error_status
from fleet_server.registry.service import RegistryService
from fleet_server.registry.store import RegistryError, RegistryStore
from fleet_server.usage.routes import build_usage_router
from fleet_server.usage.service import UsageService, load_item_names
from fleet_server.usage.store import migrations as usage_migrations

log = logging.getLogger(__name__)

HEALTH_SWEEP_S = 5.0


class FleetServer:
    """Everything the server runs, built from settings; nothing is built at import time."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: CollectorRegistry | None = None,
        *,
        alert_for_s: float = 120.0,
        alert_clear_s: float = 60.0,
        health_sweep_s: float = HEALTH_SWEEP_S,
        playbook_options: dict[str, Any] | None = None,
        broker_accounts: BrokerAccounts | None = None,
    ) -> None:
        self.settings = settings
        self.metrics_registry = registry or CollectorRegistry()
        settings.check_data()
        migrate(settings.db_path, health_service.migrations, usage_migrations, playbook_store.migrations)
        self._conn = connect(settings.db_path)
        # One shared writer connection for admin changes; this lock keeps two request threads from
        # interleaving statements inside each other's transaction. Readers open their own.
        self.lock = threading.RLock()
        self.registry = RegistryService(self._conn)
        self.registry.seed_offices(settings.offices_file)
        # Terminal models: a broken profile stops the start with file, line, field and reason.
        self.profiles = load_profiles(settings.profiles_dir)
        self._check_enrolled_profiles()
        self.auth = AuthService(self._conn)
        if settings.admin_token:
            self.auth.create_user("admin", Role.ADMIN, token=settings.admin_token)
        self.ingest_metrics = IngestMetrics(self.metrics_registry)
        self.ingest = IngestService(str(settings.db_path), self.ingest_metrics, self._enabled_terminals)
        self.health = HealthService(
            str(settings.db_path),
            self._enabled_terminals,
            self._office_infos,
            self.metrics_registry,
            alert_for_s=alert_for_s,
            alert_clear_s=alert_clear_s,
            limits=self._health_limits,
        )
        self.ingest.on_status.append(self.health.on_status)
        self.usage = UsageService(
            settings.db_path, self.metrics_registry, item_names=load_item_names(settings.catalog_file)
        )
        self.ingest.on_commit.append(self.usage.mark_dirty)
        self.link = ServerLink(
            ServerLinkSettings(
                settings.broker_host,
                settings.broker_port,
                settings.broker_username,
                settings.broker_password,
                settings.broker_client_id,
                settings.tls_ca,
            ),
            self.ingest,
        )
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            self._safe(self.health.sweep),
            "interval",
            seconds=health_sweep_s,
            id="health-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.usage.schedule(self.scheduler)
        options = dict(playbook_options or {})
        base = {
            "broker_host": settings.terminal_broker_host,
            "broker_port": settings.broker_port,
            **({"agent_wheel": settings.agent_wheel} if settings.agent_wheel else {}),
            **options.pop("base_extravars", {}),
        }
        self.playbooks = PlaybookService(
            settings.db_path,
            settings.playbooks_dir,
            registry=self.metrics_registry,
            inventory=options.pop("inventory", settings.playbooks_inventory),
            base_extravars=base,
            **options,
        )
        # Keeps the broker's accounts in step with the registry; None: managed by hand, elsewhere.
        self.broker_accounts: BrokerAccounts | None = broker_accounts
        self.admin = RegistryAdmin(
            self._conn,
            self.registry,
            self.auth,
            self.playbooks,
            self.profiles,
            lock=self.lock,
            broker=broker_accounts,
            on_change=[self.ingest.refresh_terminals, self.health.refresh_registry],
        )
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        if self.broker_accounts is not None:
            self.broker_accounts.reconcile(
                self.registry.broker_credentials(self.settings.broker_username, self.settings.broker_password)
            )
        self.ingest.start()
        self.link.start()
        self.scheduler.start()
        self._running = True

    def stop(self) -> None:
        if not self._running:
            return
        self.scheduler.shutdown(wait=True)
        self.link.stop()
        self.ingest.stop()
        self._running = False

    def close(self) -> None:
        self.stop()
        if self.broker_accounts is not None:
            self.broker_accounts.close()
        self.playbooks.close()
        self.usage.close()
        self.health.close()
        self._conn.close()

    def reader(self) -> Any:
        return connect(self.settings.db_path, readonly=True)

    @staticmethod
    def _safe(job: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            except Exception:
                log.exception("scheduled job %s failed", getattr(job, "__name__", job))

        return run

    def _enabled_terminals(self) -> dict[str, str]:
        # own read-only connection: called from the ingest and scheduler threads
        with connect(self.settings.db_path, readonly=True) as conn:
            return RegistryStore(conn).enabled_terminal_offices()

    def _health_limits(self) -> dict[str, HealthLimits]:
        """How to judge each terminal, from its device profile's heartbeat and host thresholds."""
        per_profile = {
            pid: HealthLimits(
                stale_after=p.stale_after_heartbeats,
                offline_after=p.offline_after_heartbeats,
                disk_fail_pct=p.host.disk_used_ratio.fail * 100,
                peripherals=frozenset(x.id for x in p.peripherals) or None,
                max_hb_interval_s=p.heartbeat_interval_s,
            )
            for pid, p in self.profiles.items()
        }
        with connect(self.settings.db_path, readonly=True) as conn:
            return {
                tid: per_profile[profile]
                for tid, profile in conn.execute("SELECT id, profile FROM terminals WHERE enabled=1")
                if profile in per_profile
            }

    def _office_infos(self) -> list[OfficeInfo]:
        with connect(self.settings.db_path, readonly=True) as conn:
            return [OfficeInfo(o.id, o.hours, o.timezone) for o in RegistryStore(conn).offices()]

    def _check_enrolled_profiles(self) -> None:
        """An enrolled terminal whose profile is not on disk would be judged by nothing: refuse."""
        missing = sorted(
            {t.profile for t in self.registry.store.terminals() if t.enabled and t.profile not in self.profiles}
        )
        if missing:
            raise ConfigurationError(
                f"FLEET_PROFILES_DIR={self.settings.profiles_dir}: enrolled terminals use"
                f" device profiles that are not there: {', '.join(missing)}"
            )


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

    app = FastAPI(
        title="kiosk-fleet server",
        version=__version__,
        lifespan=lifespan,
        description="Registry, health, usage and ingest of the self-service terminal fleet. "
        "Authenticate with `Authorization: Bearer <token>`.",
    )
    app.state.fleet = fleet

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=registry_error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")} for e in exc.errors()[:5]
        ]
        first = errors[0] if errors else {"where": "", "problem": "invalid request"}
        return JSONResponse({"detail": f"{first['where']}: {first['problem']}", "errors": errors}, status_code=422)

    api = APIRouter(prefix="/api/v1")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        return {
            "ok": fleet.link.connected.is_set(),
            "broker_connected": fleet.link.connected.is_set(),
            "ingest_queue": fleet.ingest.backlog,
            "version": __version__,
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(fleet.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/ingest/summary", tags=["ingest"])
    def ingest_summary(user: ReaderUser) -> dict[str, Any]:
        """Stored events by office and type, duplicates dropped, rejects by reason, streams with gaps."""
        return ingest_summary_doc(fleet, user.office_filter())

    @api.get("/ingest/rejects", tags=["ingest"])
    def ingest_rejects(user: ReaderUser, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """The most recent refused messages and events, with reasons."""
        with fleet.reader() as conn:
            cur = conn.execute(
                "SELECT at, terminal, topic, reason, detail, epoch, seq, size FROM rejects ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur]

    @api.get("/terminals/{terminal_id}/streams", tags=["ingest"])
    def terminal_streams(terminal_id: str, user: ReaderUser) -> list[dict[str, Any]]:
        """Per-epoch receipt marks of one terminal: stored, dropped by policy, quarantined, gaps."""
        t = fleet.registry.store.terminal(terminal_id)
        if t is None:
            raise HTTPException(404, f"terminal {terminal_id!r} is not enrolled")
        if not user.sees_office(t.office_id):
            raise HTTPException(403, f"you are not assigned to office {t.office_id!r}")
        rows = [r for (tid, _), r in fleet.ingest.streams().items() if tid == terminal_id]
        return [
            {
                "epoch": r.epoch,
                "upto": r.seqs.upto,
                "ranges": r.seqs.ranges,
                "gaps": r.seqs.missing(),
                "stored": r.stored,
                "dropped": r.dropped,
                "quarantined": r.quarantined,
                "duplicates": r.duplicates,
                "first_seen": r.first_seen,
                "last_seen": r.last_seen,
            }
            for r in rows
        ]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return render_home(ingest_summary_doc(fleet, None), fleet.health.offices())

    app.include_router(api)
    app.include_router(build_registry_router())
    app.include_router(build_health_router())
    app.include_router(build_auth_router())
    app.include_router(build_usage_router())
    app.include_router(build_playbooks_router())
    return app


def ingest_summary_doc(fleet: FleetServer, offices_filter: list[str] | None) -> dict[str, Any]:
    where, params = "", []
    if offices_filter is not None:
        where = f" WHERE office_id IN ({','.join('?' * len(offices_filter))})"
        params = list(offices_filter)
    with fleet.reader() as conn:
        by_office = dict(conn.execute(f"SELECT office_id, count(*) FROM events{where} GROUP BY office_id", params))
        by_type = dict(conn.execute(f"SELECT type, count(*) FROM events{where} GROUP BY type", params))
        rejects = dict(conn.execute("SELECT reason, count(*) FROM rejects GROUP BY reason"))
        offices = {
            r[0]: {"name": r[1], "pilot": bool(r[2])}
            for r in conn.execute("SELECT id, name, pilot FROM offices")
            if offices_filter is None or r[0] in offices_filter
        }
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
        "streams_with_gaps": sum(1 for s in streams if s.seqs.ranges),
    }


def render_home(doc: dict[str, Any], health: list[dict[str, Any]]) -> str:
    by_office = {h["office"]: h for h in health}
    rows = "".join(
        f"<tr><td>{html.escape(o['name'])}{' · 试点' if o['pilot'] else ''}</td>"
        f"<td style='text-align:right'>{doc['by_office'].get(oid, 0)}</td>"
        f"<td style='text-align:right'>{by_office.get(oid, {}).get('online', 0)}"
        f"/{by_office.get(oid, {}).get('terminals', 0)}</td></tr>"
        for oid, o in doc["offices"].items()
    )
    pretty = html.escape(json.dumps({k: v for k, v in doc.items() if k != "offices"}, ensure_ascii=False, indent=2))
    return (
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'><title>kiosk-fleet</title>"
        "<meta http-equiv='refresh' content='5'></head><body style='font-family:sans-serif;margin:2em'>"
        "<h1>kiosk-fleet · 智能服务终端</h1>"
        f"<p>{doc['events_stored']} events stored · duplicates dropped {doc['duplicates_dropped']}</p>"
        f"<table><tr><th>Office</th><th>Events</th><th>Online</th></tr>{rows}</table>"
        "<p><a href='/docs'>API</a> · <a href='/metrics'>metrics</a></p>"
        f"<pre>{pretty}</pre></body></html>"
    )
