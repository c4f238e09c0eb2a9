"""Composition root of the fleet server: `FleetServer` wires components, `create_app` serves them."""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any

from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_server import __version__
from fleet_server.auth.deps import CurrentUser, client_address
from fleet_server.auth.errors import AuthError, NotAllowed, NotAuthenticated, TooManyFailures, UserRefused
from fleet_server.auth.models import Role
from fleet_server.auth.routes import build_auth_router
from fleet_server.auth.service import AuthService
from fleet_server.auth.store import migrations as auth_migrations
from fleet_server.broker import build_broker_accounts
from fleet_server.broker.accounts import (
    BrokerAccounts,
    BrokerAccountsError,
    BrokerAccountsUnavailable,
    BrokerCommandRefused,
)
from fleet_server.config import ConfigurationError, ServerSettings
from fleet_server.console.routes import install_console
from fleet_server.db import ClosingConnection, connect, migrate
from fleet_server.health import service as health_service
from fleet_server.health.routes import build_health_router
from fleet_server.health.service import HealthLimits, HealthService, OfficeInfo
from fleet_server.ingest.link import ServerLink, ServerLinkSettings
from fleet_server.ingest.metrics import IngestMetrics
from fleet_server.ingest.routes import build_ingest_router
from fleet_server.ingest.service import IngestService
from fleet_server.playbooks import store as playbook_store
from fleet_server.playbooks.routes import build_playbooks_router
from fleet_server.playbooks.service import NoInventory, PlaybookError, PlaybookService, RunNotFound, UnknownPlaybook
from fleet_server.registry.admin import RegistryAdmin
from fleet_server.registry.profiles import load_profiles
from fleet_server.registry.routes import build_registry_router
from fleet_server.registry.service import RegistryService
from fleet_server.registry.store import (
    DuplicateTerminal,
    OfficeMismatch,
    RegistryError,
    UnknownOffice,
    UnknownProfile,
    UnknownTerminal,
)
from fleet_server.releases import errors as release_errors
from fleet_server.releases.repository import TufRepository
from fleet_server.releases.routes import build_releases_router, build_tuf_router
from fleet_server.releases.service import ReleaseService
from fleet_server.releases.store import migrations as release_migrations
from fleet_server.rollouts import store as rollout_store
from fleet_server.rollouts.engine import EngineSettings, TerminalCondition
from fleet_server.rollouts.errors import BadPlan, RolloutConflict, RolloutError, UnknownRollout
from fleet_server.rollouts.planner import OfficeRef, TerminalInfo
from fleet_server.rollouts.routes import build_rollouts_router
from fleet_server.rollouts.service import RolloutService
from fleet_server.usage.routes import build_usage_router
from fleet_server.usage.service import BadQuery, UsageError, UsageService, load_item_names
from fleet_server.usage.service import UnknownOffice as UsageUnknownOffice
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
        rollout_tick_s: float | None = None,
        rollout_settings: EngineSettings | None = None,
    ) -> None:
        self.settings = settings
        self.metrics_registry = registry or CollectorRegistry()
        settings.check_data()
        migrate(
            settings.db_path,
            auth_migrations,
            health_service.migrations,
            usage_migrations,
            playbook_store.migrations,
            rollout_store.migrations,
            release_migrations,
        )
        self._conn = connect(settings.db_path)
        # One shared writer connection for admin changes; this lock keeps two request threads from
        # interleaving statements inside each other's transaction. Readers open their own.
        self.lock = threading.RLock()
        self.registry = RegistryService(self._conn, self.reader)
        self.registry.seed_offices(settings.offices_file)
        # Terminal models: a broken profile stops the start with file, line, field and reason.
        self.profiles = load_profiles(settings.profiles_dir)
        self._check_enrolled_profiles()
        self.auth = AuthService(self._conn, lock=self.lock, registry=self.metrics_registry)
        if settings.admin_token:
            self.auth.create_user("admin", Role.ADMIN, token=settings.admin_token)
            if settings.admin_password:
                self.auth.bootstrap_password("admin", settings.admin_password)
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
        # TUF releases: the repository under /tuf; snapshot/timestamp re-signed before they expire
        tuf_dir, online_key = settings.tuf_paths()
        self.releases = ReleaseService(
            TufRepository(
                tuf_dir,
                online_key,
                timestamp_expiry=timedelta(seconds=settings.tuf_timestamp_expiry_s),
                snapshot_expiry=timedelta(seconds=settings.tuf_snapshot_expiry_s),
                max_target_bytes=settings.tuf_max_target_bytes,
            ),
            settings.db_path,
            self.metrics_registry,
            audit=self.auth.audit,
        )
        self.scheduler.add_job(
            self._safe(self.releases.resign_due),
            "interval",
            seconds=settings.tuf_resign_check_s,
            id="tuf-resign",
            max_instances=1,
            coalesce=True,
        )
        # Rollouts: desired state in their tables, a level-triggered tick sends and judges.
        self._health_sweep_s = health_sweep_s
        self._rollout_health_cache: tuple[float, dict[str, TerminalCondition]] | None = None
        self.rollouts = RolloutService(
            str(settings.db_path),
            releases=lambda: getattr(self, "releases", None),
            terminals=self._rollout_terminals,
            offices=self._rollout_offices,
            health=self._rollout_health,
            publish=self.link.publish,
            audit=self.auth.audit,
            registry=self.metrics_registry,
            settings=rollout_settings,
            low_disk_pct=settings.rollout_low_disk_pct,
        )
        self.scheduler.add_job(
            self._safe(self.rollouts.tick),
            "interval",
            seconds=rollout_tick_s or settings.rollout_tick_s,
            id="rollout-tick",
            max_instances=1,
            coalesce=True,
        )
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
        # Without an argument, FLEET_BROKER_ACCOUNTS chooses (fleet_server/broker/__init__.py).
        self.broker_accounts: BrokerAccounts | None = (
            broker_accounts
            if broker_accounts is not None
            else build_broker_accounts(
                settings,
                lambda: self.registry.broker_credentials(settings.broker_username, settings.broker_password),
                self.metrics_registry,
            )
        )
        self.admin = RegistryAdmin(
            self._conn,
            self.registry,
            self.auth,
            self.playbooks,
            self.profiles,
            lock=self.lock,
            broker=self.broker_accounts,
            on_change=[self.ingest.refresh_terminals, self.health.refresh_registry, self.rollouts.registry_changed],
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
        self.rollouts.close()
        self.usage.close()
        self.health.close()
        self.releases.close()
        self._conn.close()

    def reader(self) -> ClosingConnection:
        """A read-only connection of its own, closed by `with`: for request, ingest and scheduler threads."""
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
        return self.registry.enabled_terminal_offices()

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
        return {
            tid: per_profile[profile]
            for tid, profile in self.registry.enabled_terminal_profiles().items()
            if profile in per_profile
        }

    def _rollout_terminals(self) -> list[TerminalInfo]:
        return [TerminalInfo(t.id, t.office_id, t.profile, tuple(t.tags), t.enabled) for t in self.registry.terminals()]

    def _rollout_offices(self) -> dict[str, OfficeRef]:
        return {o.id: OfficeRef(o.id, o.name, o.pilot, o.timezone, o.maintenance) for o in self.registry.offices()}

    def _rollout_health(self) -> dict[str, TerminalCondition]:
        """Each terminal as a rollout's gate sees it: online with no failing peripheral is healthy.
        Rebuilt at most once per health sweep, where states change (~0.1 s at 10,000 terminals)."""
        cached = self._rollout_health_cache
        if cached is not None and time.monotonic() - cached[0] < self._health_sweep_s:
            return cached[1]
        out = {}
        for h in self.health.terminals():
            failing = [
                name
                for name, p in h["peripherals"].items()
                if p["state"] not in health_service.PERIPHERAL_OK | health_service.PERIPHERAL_WARN
            ]
            online = h["state"] == "online"
            why = h["state"] if not online else (", ".join(f"{p} failing" for p in failing) if failing else "")
            since = h.get("since")
            out[h["terminal"]] = TerminalCondition(
                healthy=online and not failing,
                why=why,
                online_since=_epoch(since) if online and since else None,
                state=h["state"],
                disk_pct=h.get("disk_pct") if h.get("last_seen") else None,
            )
        self._rollout_health_cache = (time.monotonic(), out)
        return out

    def _office_infos(self) -> list[OfficeInfo]:
        return [OfficeInfo(o.id, o.hours, o.timezone) for o in self.registry.offices()]

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


# Domain errors of every feature -> HTTP status; the app's one handler answers with these. A class
# not listed answers with its nearest listed ancestor's status.
HTTP_STATUS: dict[type[Exception], int] = {
    AuthError: 400,
    NotAuthenticated: 401,
    NotAllowed: 403,
    TooManyFailures: 429,
    UserRefused: 422,
    RegistryError: 400,
    UnknownOffice: 404,
    UnknownTerminal: 404,
    UnknownProfile: 422,
    DuplicateTerminal: 409,
    OfficeMismatch: 422,
    UsageError: 400,
    UsageUnknownOffice: 404,
    BadQuery: 422,
    PlaybookError: 400,
    UnknownPlaybook: 404,
    RunNotFound: 404,
    NoInventory: 409,
    # the broker could not be told of an account change, so nothing changed: retry later
    BrokerAccountsUnavailable: 503,
    BrokerCommandRefused: 502,
    RolloutError: 400,
    UnknownRollout: 404,
    BadPlan: 422,
    RolloutConflict: 409,
    release_errors.ReleaseError: 400,
    release_errors.PublishRefused: 422,
    release_errors.VersionConflict: 409,
    release_errors.UnknownRelease: 404,
    release_errors.RepositoryNotReady: 409,
    release_errors.OnlineKeyUnusable: 503,
}
DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    AuthError,
    RegistryError,
    UsageError,
    PlaybookError,
    BrokerAccountsError,
    RolloutError,
    release_errors.ReleaseError,
)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def http_status(err: Exception) -> int:
    """The HTTP status a domain error answers with."""
    for cls in type(err).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def create_app(settings: ServerSettings, server: FleetServer | None = None) -> FastAPI:
    """The HTTP app; it starts and stops the server's components with its own lifespan.

    Nothing but the liveness probe `/healthz` answers without a login: the API and `/openapi.json`
    need a user's bearer token; `/metrics` needs `FLEET_METRICS_TOKEN` as a bearer, or, when that is
    not set, a client on the loopback interface (a Prometheus next to the server).
    """
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
        # the schema is served below, behind a login; no public documentation pages
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.fleet = fleet

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        headers = {}
        if isinstance(exc, NotAuthenticated):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, TooManyFailures):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc), headers=headers)

    for root in DOMAIN_ERRORS:
        app.add_exception_handler(root, domain_error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg")} for e in exc.errors()[:5]
        ]
        first = errors[0] if errors else {"where": "", "problem": "invalid request"}
        return JSONResponse({"detail": f"{first['where']}: {first['problem']}", "errors": errors}, status_code=422)

    def metrics_access(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        address = client_address(request)
        if settings.metrics_token:
            fleet.auth.check_metrics_token(authorization, address, settings.metrics_token)
        elif not is_loopback(address):
            raise NotAllowed(
                "metrics are served to the loopback interface only; set FLEET_METRICS_TOKEN to scrape from elsewhere"
            )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        """Liveness: ok while the server is connected to the broker. No counts, no version."""
        return {"ok": fleet.link.connected.is_set()}

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_access)])
    def metrics() -> Response:
        return Response(generate_latest(fleet.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(user: CurrentUser) -> dict[str, Any]:
        return app.openapi()

    app.include_router(build_ingest_router())
    app.include_router(build_registry_router())
    app.include_router(build_health_router())
    app.include_router(build_auth_router())
    app.include_router(build_usage_router())
    app.include_router(build_playbooks_router())
    app.include_router(build_rollouts_router())
    app.include_router(build_releases_router())
    app.include_router(build_tuf_router())
    # the console's pages; `/` is its overview (a bearer-token caller still gets the JSON pointer)
    install_console(app, settings)
    return app
