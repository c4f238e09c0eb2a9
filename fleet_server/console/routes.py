"""Console pages: login and sessions, then overview, office, terminal, usage and audit pages.

Thin: `views` gathers what a page shows from the services the JSON API uses, templates show it.
Every page needs a console login (a session cookie); the JSON API keeps its bearer tokens and
never accepts the cookie, so no API call can be forged from another site. Every form carries a
CSRF token; the login form a double-submit one (there is no session yet).
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import jinja2
from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from markupsafe import Markup

from fleet_server.auth.deps import client_address, get_fleet
from fleet_server.auth.errors import NotAuthenticated
from fleet_server.auth.models import Role, User
from fleet_server.auth.throttle import LoginThrottle
from fleet_server.config import ServerSettings
from fleet_server.console import views
from fleet_server.console.i18n import DEFAULT_LANGUAGE, LANGUAGES, translate
from fleet_server.console.sessions import Session, SessionStore, same_token
from fleet_server.registry.schemas import OFFICE_ID_PATTERN
from fleet_server.usage.service import MAX_RANGE_DAYS, SafeCsvWriter
from fleet_wire.topics import TERMINAL_ID_PATTERN

if TYPE_CHECKING:
    from fleet_server.app import FleetServer

log = logging.getLogger(__name__)

SESSION_COOKIE = "fleet_session"
LOGIN_CSRF_COOKIE = "fleet_login_csrf"
LANG_COOKIE = "fleet_lang"
HERE = Path(__file__).resolve().parent
LOGIN_WINDOW_S = 600.0
LOGIN_MAX_BLOCK_S = 900.0
AUDIT_LIMIT = 200
DEFAULT_DAYS = 7
BASE_WEEKS_BACK = 4  # the default base period: the same week four weeks earlier
DISPLAY_TZ = "Asia/Shanghai"
# No script at all; styles inline (one <style> block, SVG attributes); images only from here.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'"
)
_OFFICE_RE = re.compile(OFFICE_ID_PATTERN)
_TERMINAL_RE = re.compile(TERMINAL_ID_PATTERN)
_AUDIT_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}(:\d{2}(\.\d{1,3})?)?)?Z?)?$")
MAX_FIELD_CHARS = 200
CSRF_REFUSED = "The form could not be checked (it is missing its security token). Reload the page and send it again."


class LoginRequired(Exception):
    """No live console session: go to the login page (and come back to `path`)."""

    def __init__(self, path: str, expired: bool) -> None:
        self.path = path
        self.expired = expired
        super().__init__(path)


class PageRefused(Exception):
    """A page answers with an error page: `status`, a title and a plain-language message."""

    def __init__(self, status: int, title: str, message: str) -> None:
        self.status = status
        self.title = title
        self.message = message
        super().__init__(message)


@dataclass
class Console:
    settings: ServerSettings
    sessions: SessionStore
    throttle: LoginThrottle
    env: jinja2.Environment
    css: str
    secure_cookies: bool
    # the rollout pages, when the server has a rollout service (see fleet_server.console.rollouts)
    extra_nav: list[tuple[str, str, frozenset[Role]]]
    rollout_summary: Callable[[FleetServer], list[dict[str, Any]]] | None = None
    usage_figures: views.UsageFigures | None = None

    def figures(self, fleet: FleetServer) -> views.UsageFigures:
        """The usage answers of this server (made on first use: the app may get its server late)."""
        if self.usage_figures is None or self.usage_figures.usage is not fleet.usage:
            self.usage_figures = views.UsageFigures(fleet.usage, fleet.metrics_registry)
        return self.usage_figures


def install_console(app: FastAPI, settings: ServerSettings, *, clock: Callable[[], float] = time.time) -> Console:
    """Serve the console on `app`: its pages, its error pages, its session store."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["localtime"] = localtime
    env.filters["pct"] = pct
    env.filters["num"] = num
    env.filters["pretty"] = pretty_json
    console = Console(
        settings,
        SessionStore(settings.session_idle_s, settings.session_max_s, clock=clock),
        LoginThrottle(
            clock,
            free_failures=settings.login_free_failures,
            window_s=LOGIN_WINDOW_S,
            base_block_s=settings.login_block_s,
            max_block_s=LOGIN_MAX_BLOCK_S,
        ),
        env,
        (HERE / "static" / "console.css").read_text("utf-8"),
        secure_cookies=settings.environment != "development",
        extra_nav=[],
    )
    app.state.console = console

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        target = "/login?next=" + quote(exc.path, safe="/")
        if exc.expired:
            target += "&expired=1"
        response = RedirectResponse(target, status_code=303)
        if exc.expired:
            response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def page_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageRefused)
        return render(
            console, request, "error.html", None, None, status=exc.status, title=exc.title, message=exc.message
        )

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(PageRefused, page_refused)
    fleet = getattr(app.state, "fleet", None)
    if getattr(fleet, "rollouts", None) is not None:
        # the rollout pages exist where the server runs a rollout service (routes before the
        # generic ones below, so /rollouts/… is theirs)
        from fleet_server.console.rollouts import in_progress, install_rollout_pages

        console.rollout_summary = in_progress
        app.include_router(install_rollout_pages(console))
    app.include_router(build_console_router(console))
    return console


# -- filters -------------------------------------------------------------------------------------------


def localtime(ts: str | None, tz: str = DISPLAY_TZ, seconds: bool = True) -> str:
    """A stored UTC timestamp in an office's local time ('' for none)."""
    if not ts:
        return ""
    try:
        moment = datetime.fromisoformat(ts.replace("Z", "+00:00"))
        zone = ZoneInfo(tz)
    except (ValueError, KeyError):
        return ts
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f}%"


def num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def pretty_json(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True, default=str)


# -- rendering -----------------------------------------------------------------------------------------


def language(request: Request) -> str:
    lang = request.cookies.get(LANG_COOKIE, DEFAULT_LANGUAGE)
    return lang if lang in LANGUAGES else DEFAULT_LANGUAGE


_R = TypeVar("_R", bound=Response)


def security_headers(response: _R) -> _R:
    """The headers every console answer carries: no scripts, no framing, no caching, no sniffing."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def render(
    console: Console,
    request: Request,
    template: str,
    user: User | None,
    session: Session | None,
    *,
    status: int = 200,
    refresh: bool = False,
    **ctx: Any,
) -> HTMLResponse:
    lang = language(request)

    def _(text: str, **values: Any) -> str:
        out = translate(text, lang)
        return out.format(**values) if values else out

    nav = []
    if user is not None:
        if user.role in (Role.ADMIN, Role.MANAGER):
            nav += [("/", "Overview"), ("/usage", "Usage")]
        nav += [(href, label) for href, label, roles in console.extra_nav if user.role in roles]
        if user.role in (Role.ADMIN, Role.AUDITOR):
            nav.append(("/audit", "Audit log"))
    html = console.env.get_template(template).render(
        _=_,
        lang=lang,
        user=user,
        csrf=session.csrf if session else "",
        path=request.url.path,
        here=_here(request),
        nav=nav,
        refresh=refresh,
        css=Markup(console.css),
        rollout_pages=bool(console.extra_nav),
        **ctx,
    )
    return security_headers(HTMLResponse(html, status_code=status))


def _here(request: Request) -> str:
    q = request.url.query
    return request.url.path + (f"?{q}" if q else "")


def safe_next(target: str | None) -> str:
    """A local path to go back to after logging in (never another site)."""
    if not target or len(target) > 2000:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


# -- who is asking ------------------------------------------------------------------------------------


def who(request: Request, console: Console, *roles: Role) -> tuple[User, Session]:
    """The logged-in user of this request, or LoginRequired; PageRefused when their role may not."""
    token = request.cookies.get(SESSION_COOKIE)
    session = console.sessions.get(token)
    back = _here(request) if request.method == "GET" else "/"
    if session is None:
        raise LoginRequired(back, expired=bool(token))
    found = get_fleet(request).auth.login_stamp(session.user)
    if found is None or found[1] != session.stamp:  # disabled, removed or a new password since
        console.sessions.drop(token)
        raise LoginRequired(back, expired=True)
    user = found[0]
    if roles and user.role not in roles:
        raise PageRefused(403, "Not allowed", "Your role may not open this page.")
    return user, session


def check_csrf(request: Request, session: Session, token: str) -> None:
    """Refuse a console form without this session's CSRF token or from another origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise PageRefused(403, "Not allowed", CSRF_REFUSED)
    if not same_token(session.csrf, token):
        log.warning("console form without a valid CSRF token: %s %s", request.method, request.url.path)
        raise PageRefused(403, "Not allowed", CSRF_REFUSED)


FormText = Annotated[str, Form()]


@dataclass(frozen=True)
class UsageAsk:
    """One usage request (page or CSV): who asks, what they asked, and the offices it may cover."""

    user: User
    session: Session
    fleet: FleetServer
    q: views.UsageQuery
    offices: list[str] | None  # User.office_filter of the chosen office; None: every office


def build_console_router(console: Console) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    # -- login ------------------------------------------------------------------------------------

    def login_page(
        request: Request,
        *,
        status: int = 200,
        error: str = "",
        name: str = "",
        notice: str = "",
        errors: dict[str, str] | None = None,
        wait_s: float = 0.0,
    ) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(
            console,
            request,
            "login.html",
            None,
            None,
            status=status,
            login_csrf=token,
            error=error,
            wait_s=max(1, round(wait_s)),
            notice=notice,
            name=name,
            errors=errors or {},
            next_path=safe_next(request.query_params.get("next")),
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=console.secure_cookies, path="/login"
        )
        return response

    @r.get("/login")
    def login_form(request: Request) -> Response:
        if console.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        notice = ""
        if request.query_params.get("expired"):
            notice = "Your session has ended. Please log in again."
        elif request.query_params.get("bye"):
            notice = "You have logged out."
        return login_page(request, notice=notice)

    @r.post("/login")
    def login(
        request: Request,
        name: FormText = "",
        password: FormText = "",
        csrf: FormText = "",
        next_path: Annotated[str, Form(alias="next")] = "/",
    ) -> Response:
        fleet = get_fleet(request)
        name = name.strip()[:64]
        password = password[: MAX_FIELD_CHARS + 100]
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not expected or not same_token(expected, csrf):
            return login_page(request, status=403, error="The form has expired. Please try again.", name=name)
        errors = {}
        if not name:
            errors["name"] = "Enter your user name."
        if not password:
            errors["password"] = "Enter your password."
        if errors:
            return login_page(request, status=422, name=name, errors=errors)
        address = client_address(request)
        wait = max(console.throttle.wait_s(address, ""), console.throttle.wait_s("user:" + name, ""))
        if wait > 0:
            log.warning("console login refused for %.0f s more: too many failures (from %s)", wait, address)
            response = login_page(
                request, status=429, error="Too many failed logins. Wait {s} s, then try again.", name=name, wait_s=wait
            )
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        user = fleet.auth.check_password(name, password)
        if user is None:
            a = console.throttle.failed(address)
            u = console.throttle.failed("user:" + name)
            fleet.auth.failures_total.labels(reason="console_password").inc()
            log.warning(
                "failed console login from %s: %d recent from there, %d for that name", address, a.recent, u.recent
            )
            return login_page(request, status=401, error="Wrong user name or password.", name=name)
        stamp = fleet.auth.login_stamp(user.name)
        console.sessions.drop(request.cookies.get(SESSION_COOKIE))  # a fresh session, never the old one
        token, _session = console.sessions.create(user.name, stamp[1] if stamp else "")
        fleet.auth.audit(user, "console.login", user.name, None, {"from": address})
        target = safe_next(next_path)
        if user.role == Role.AUDITOR and target == "/":
            target = "/audit"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE, token, httponly=True, samesite="strict", secure=console.secure_cookies, path="/"
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @r.post("/logout")
    def logout(request: Request, csrf: FormText = "") -> Response:
        _user, session = who(request, console)
        check_csrf(request, session, csrf)
        console.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login?bye=1", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @r.get("/lang/{code}")
    def switch_language(request: Request, code: str) -> Response:
        response = RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
        if code in LANGUAGES:
            response.set_cookie(LANG_COOKIE, code, samesite="lax", secure=console.secure_cookies, path="/")
        return response

    # -- pages ------------------------------------------------------------------------------------

    @r.get("/")
    def home(request: Request) -> Response:
        fleet = get_fleet(request)
        authorization = request.headers.get("authorization")
        if authorization:  # a script with a bearer token: where things are, as before the console
            api_user = fleet.auth.login(authorization, client_address(request))
            return JSONResponse(
                {"service": "kiosk-fleet server", "user": api_user.name, "api": "/api/v1", "schema": "/openapi.json"}
            )
        if console.sessions.get(request.cookies.get(SESSION_COOKIE)) is None and "text/html" not in request.headers.get(
            "accept", ""
        ):
            raise NotAuthenticated("log in to the console, or send a bearer token")
        user, session = who(request, console)
        if user.role == Role.AUDITOR:
            return RedirectResponse("/audit", status_code=303)
        data = views.overview(fleet, user)
        rollouts = console.rollout_summary(fleet) if console.rollout_summary else None
        return render(console, request, "overview.html", user, session, refresh=True, rollouts=rollouts, **data)

    @r.get("/offices/{office_id}")
    def office(request: Request, office_id: str) -> Response:
        user, session = who(request, console, Role.ADMIN, Role.MANAGER)
        if not _OFFICE_RE.match(office_id):
            raise PageRefused(404, "Not found", "Unknown office.")
        if not user.sees_office(office_id):
            raise PageRefused(403, "Not allowed", "You are not assigned to this office.")
        data = views.office_page(get_fleet(request), user, office_id)
        if data is None:
            raise PageRefused(404, "Not found", "Unknown office.")
        return render(console, request, "office.html", user, session, refresh=True, **data)

    @r.get("/terminals/{terminal_id}")
    def terminal(request: Request, terminal_id: str) -> Response:
        user, session = who(request, console, Role.ADMIN, Role.MANAGER)
        fleet = get_fleet(request)
        found = fleet.registry.terminal(terminal_id) if _TERMINAL_RE.match(terminal_id) else None
        if found is None:
            raise PageRefused(404, "Not found", "Not found")
        if not user.sees_office(found.office_id):
            raise PageRefused(403, "Not allowed", "You are not assigned to this office.")
        data = views.terminal_page(fleet, terminal_id, rollouts=bool(console.extra_nav))
        assert data is not None
        office_row = fleet.registry.office(found.office_id)
        return render(console, request, "terminal.html", user, session, refresh=True, office=office_row, **data)

    # -- usage ------------------------------------------------------------------------------------

    def usage_query(request: Request, user: User) -> views.UsageQuery:
        fleet = get_fleet(request)
        p = request.query_params
        errors: dict[str, str] = {}
        today = fleet.usage.default_range()[1]

        def day(key: str, default: date) -> date:
            raw = (p.get(key) or "").strip()
            if not raw:
                return default
            try:
                return date.fromisoformat(raw[:10])
            except ValueError:
                errors[key] = "Not a date (use YYYY-MM-DD)."
                return default

        date_to = day("date_to", today)
        date_from = day("date_from", date_to - timedelta(days=DEFAULT_DAYS - 1))
        base_to = day("base_to", date_to - timedelta(weeks=BASE_WEEKS_BACK))
        base_from = day("base_from", base_to - timedelta(days=DEFAULT_DAYS - 1))
        for a, b in (("date_from", "date_to"), ("base_from", "base_to")):
            if a in errors or b in errors:
                continue
            first, last = (date_from, date_to) if a == "date_from" else (base_from, base_to)
            if last < first:
                errors[b] = "The end date is before the start date."
            elif (last - first).days + 1 > MAX_RANGE_DAYS:
                errors[a] = "The range is longer than 366 days."
        office_id = (p.get("office") or "").strip() or None
        if office_id is not None:
            known = {o.id for o in fleet.registry.offices()}
            if office_id not in known:
                errors["office"] = "Unknown office."
            elif not user.sees_office(office_id):
                errors["office"] = "You are not assigned to this office."
        return views.UsageQuery(office_id, date_from, date_to, base_from, base_to, errors)

    def usage_ask(request: Request, *, refuse_errors: bool) -> UsageAsk:
        """Who asks (an admin or a manager), their usage query and the offices it may cover.

        `refuse_errors`: a query error ends the request with a 422 page naming the first one
        (the CSV downloads); otherwise the caller shows the errors in its form (the usage page).
        """
        user, session = who(request, console, Role.ADMIN, Role.MANAGER)
        fleet = get_fleet(request)
        q = usage_query(request, user)
        if refuse_errors and q.errors:
            raise PageRefused(422, "Something went wrong", next(iter(q.errors.values())))
        offices = user.office_filter([q.office] if q.office else None)
        return UsageAsk(user, session, fleet, q, offices)

    @r.get("/usage")
    def usage(request: Request) -> Response:
        ask = usage_ask(request, refuse_errors=False)
        user, q = ask.user, ask.q
        offices = [o for o in ask.fleet.registry.offices() if user.sees_office(o.id)]
        data: dict[str, Any] = {}
        status = 200
        if q.errors:
            status = 403 if q.errors.get("office") == "You are not assigned to this office." else 422
        else:
            data = views.usage_page(console.figures(ask.fleet), user, q, language(request))
        return render(
            console,
            request,
            "usage.html",
            user,
            ask.session,
            status=status,
            q=q,
            offices=offices,
            data=data,
            raw={k: v[:20] for k, v in request.query_params.items()},
        )

    def csv_response(rows: list[list[Any]], name: str) -> Response:
        buf = io.StringIO()
        writer = SafeCsvWriter(buf)
        for row in rows:
            writer.writerow(row)
        response = Response(
            ("\ufeff" + buf.getvalue()).encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
        return security_headers(response)

    @r.get("/usage/items.csv")
    def usage_items_csv(request: Request) -> Response:
        ask = usage_ask(request, refuse_errors=True)
        q = ask.q
        table = console.figures(ask.fleet).item_table(ask.offices, q.date_from, q.date_to)
        items = views.rank_items(table.rows, q.office is not None)
        return csv_response(views.item_csv_rows(items), f"items-{q.office or 'all'}-{q.date_from}-{q.date_to}.csv")

    @r.get("/usage/offices.csv")
    def usage_offices_csv(request: Request) -> Response:
        ask = usage_ask(request, refuse_errors=True)
        q = ask.q
        comparison = console.figures(ask.fleet).compare_offices(ask.offices, q.date_from, q.date_to)
        return csv_response(views.office_csv_rows(comparison), f"offices-{q.date_from}-{q.date_to}.csv")

    # -- audit ------------------------------------------------------------------------------------

    @r.get("/audit")
    def audit(request: Request) -> Response:
        user, session = who(request, console, Role.ADMIN, Role.AUDITOR)
        p = request.query_params
        f = {k: (p.get(k) or "").strip()[:MAX_FIELD_CHARS] for k in ("actor", "action", "target", "since", "until")}
        errors = {
            k: "Use a time like 2026-12-01 or 2026-12-01T08:00:00Z." for k in ("since", "until") if not _is_time(f[k])
        }
        entries: list[dict[str, Any]] = []
        if not errors:
            entries = get_fleet(request).auth.audit_log(
                AUDIT_LIMIT,
                f["actor"] or None,
                f["action"] or None,
                f["target"] or None,
                _utc_bound(f["since"]),
                _utc_until(f["until"]),
            )
        return render(
            console,
            request,
            "audit.html",
            user,
            session,
            status=422 if errors else 200,
            f=f,
            errors=errors,
            entries=entries,
        )

    return r


def _is_time(value: str) -> bool:
    """An empty filter, a day (2026-12-01) or a UTC time (2026-12-01T08:00:00Z)."""
    if not value:
        return True
    if not _AUDIT_TIME_RE.match(value):
        return False
    try:
        datetime.fromisoformat(value.rstrip("Z"))
    except ValueError:
        return False
    return True


def _utc_bound(value: str) -> str | None:
    """A filter time as the audit log stores times (UTC ISO), comparable as a string."""
    if not value:
        return None
    return value.rstrip("Z")


def _utc_until(value: str) -> str | None:
    """The upper bound: a bare day counts whole (up to the next day), a time is exclusive."""
    if len(value) == 10:
        return (date.fromisoformat(value) + timedelta(days=1)).isoformat()
    return _utc_bound(value)
