"""Rollout pages: create with a preview, approve, pause/resume/abort/retry/rollback, the gate panel
per wave, progress per wave and office, the maintenance calendar and the trust chain.

Everything a page shows or does goes through the server's RolloutService and ReleaseService, the
same calls the JSON API makes; the console only turns a form into a `RolloutPlan` and puts the
service's answers (and its refusals) next to the fields they concern.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from fleet_server.auth.deps import get_fleet
from fleet_server.auth.errors import AuthError, NotAllowed
from fleet_server.auth.models import Role, User
from fleet_server.console.routes import Console, PageRefused, check_csrf, render, who
from fleet_server.rollouts.errors import RolloutError, UnknownRollout
from fleet_server.rollouts.schemas import FAILED, FINAL, LIVE, RollbackRequest, RolloutPlan
from fleet_wire.release import REASONS, ROLLOUT_ID_PATTERN

if TYPE_CHECKING:
    from fleet_server.app import FleetServer

log = logging.getLogger(__name__)

READERS = (Role.ADMIN, Role.MANAGER, Role.AUDITOR)
WAVE_ROWS = 4
ACTIONS = ("approve", "pause", "resume", "abort", "retry", "rollback")
# what a terminal reports when its trusted TUF metadata, not the release itself, is the problem
METADATA_REASONS = frozenset({"bad_signature", "expired", "metadata_rollback", "unknown_target", "counter_downgrade"})
_ROLLOUT_RE = re.compile(ROLLOUT_ID_PATTERN)
_WAVE_MSG = re.compile(r"^wave (\d+)\b")
MAX_TERMINALS_SHOWN = 300
PERIOD_ENDS_BEFORE_START = "The install period must end after it starts."

DEFAULT_WAVES: list[dict[str, str]] = [
    {"name": "canary", "size_kind": "count", "size": "1", "pilot_only": "on", "soak_s": "60", "fail_kind": "count",
     "fail": "0", "min_sample": "1", "on_success": "advance"},
    {"name": "pilots", "size_kind": "rest", "size": "", "pilot_only": "on", "soak_s": "300", "fail_kind": "count",
     "fail": "0", "min_sample": "1", "on_success": "wait_for_approval"},
    {"name": "everyone", "size_kind": "rest", "size": "", "pilot_only": "", "soak_s": "0", "fail_kind": "percent",
     "fail": "5", "min_sample": "20", "on_success": "advance"},
    {"name": "", "size_kind": "unused", "size": "", "pilot_only": "", "soak_s": "0", "fail_kind": "count", "fail": "0",
     "min_sample": "1", "on_success": "advance"},
]  # fmt: skip


def install_rollout_pages(console: Console) -> APIRouter:
    """The rollout pages' routes; the console's nav gains 'Rollouts' for every role that may read them."""
    console.extra_nav.append(("/rollouts", "Rollouts", frozenset(READERS)))
    return build_rollout_router(console)


def in_progress(fleet: FleetServer) -> list[dict[str, Any]]:
    """Live rollouts with their wave, for the overview."""
    out = []
    for r in fleet.rollouts.list_rollouts():
        if r["state"] in LIVE:
            out.append(
                {
                    "id": r["id"],
                    "release": f"{r['kind']} {r['version']}",
                    "state": r["state"],
                    "wave": f"{r['current_wave']}/{r['waves']}",
                    "reason": r["reason"],
                }
            )
    return out


# -- the form -> a plan ----------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [p for p in re.split(r"[\s,，;；]+", text.strip()) if p]


def form_to_plan(form: dict[str, Any], offices: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The plan a create form asks for, and the field errors the console finds before the service."""
    errors: dict[str, str] = {}

    def number(key: str, *, integer: bool = False, default: str = "0") -> float | None:
        raw = str(form.get(key) or default).strip()
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            errors[key] = "Enter a number."
            return None
        if value < 0:
            errors[key] = "Enter a number of 0 or more."
            return None
        return value

    release = str(form.get("release") or "").strip()
    if not release:
        errors["release"] = "Choose the release to roll out."
    targets = {
        "offices": [o for o in form.get("target_office", []) if o in offices],
        "profiles": _split(str(form.get("target_profiles") or "")),
        "tags": _split(str(form.get("target_tags") or "")),
        "terminals": _split(str(form.get("target_terminals") or "")),
    }
    if not any(targets.values()) and not form.get("targets_all"):
        errors["targets"] = "Choose offices, profiles, tags or terminals, or tick the whole fleet."
    waves = []
    for i in range(1, WAVE_ROWS + 1):
        p = f"w{i}_"
        kind = str(form.get(p + "size_kind") or "unused")
        if kind == "unused":
            continue
        size: dict[str, Any] = {}
        if kind in ("count", "percent"):
            n = number(p + "size", integer=kind == "count", default="")
            if n is not None:
                if n <= 0 or (kind == "percent" and n > 100):
                    errors[p + "size"] = "A wave takes at least one terminal (a percent: more than 0, at most 100)."
                size[kind] = n
        fail_kind = str(form.get(p + "fail_kind") or "count")
        fail = number(p + "fail", integer=fail_kind == "count")
        wave: dict[str, Any] = {
            "name": str(form.get(p + "name") or "").strip()[:64],
            "size": size,
            "pilot_only": bool(form.get(p + "pilot_only")),
            "soak_s": number(p + "soak_s") or 0.0,
            "failures": {fail_kind if fail_kind in ("count", "percent") else "count": fail or 0,
                         "min_sample": number(p + "min_sample", integer=True, default="1") or 1},
            "on_success": "wait_for_approval" if form.get(p + "on_success") == "wait_for_approval" else "advance",
        }  # fmt: skip
        waves.append(wave)
    if not waves:
        errors["waves"] = "Plan at least one wave."
    plan: dict[str, Any] = {
        "release": release,
        "targets": targets,
        "waves": waves,
        "window": "now" if form.get("window") == "now" else "office",
        "gate_s": number("gate_s", default="120") or 0.0,
        "approval_required": bool(form.get("approval_required")),
        "on_halt": "rollback" if form.get("on_halt") == "rollback" else "pause",
        "note": str(form.get("note") or "")[:500],
    }
    rid = str(form.get("id") or "").strip()
    if rid:
        if not _ROLLOUT_RE.match(rid):
            errors["id"] = "Lower-case letters, digits and '-' only, starting with a letter or digit."
        plan["id"] = rid
    moments: dict[str, datetime] = {}
    for key in ("deadline", "window_start", "window_end"):
        text = str(form.get(key) or "").strip()
        if not text:
            continue
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            errors[key] = "Use a time like 2026-12-03T02:00."
            continue
        moments[key] = at if at.tzinfo else at.replace(tzinfo=ZoneInfo("Asia/Shanghai"))
        plan[key] = moments[key].isoformat()
    start, end = moments.get("window_start"), moments.get("window_end")
    if start is not None and end is not None and end <= start:
        errors["window_end"] = PERIOD_ENDS_BEFORE_START
    return plan, errors


def field_of(message: str) -> str:
    """Which form field a service refusal concerns, from how the message starts."""
    m = _WAVE_MSG.match(message)
    if m:
        return f"w{m.group(1)}_size"
    for prefix, key in (("targets", "targets"), ("waves", "waves"), ("release", "release"), ("a rollout", "id")):
        if message.startswith(prefix):
            return key
    return "form"


def validation_errors(err: ValidationError) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ())]
        if loc[:1] == ["waves"] and len(loc) > 1 and loc[1].isdigit():
            key = f"w{int(loc[1]) + 1}_size"
        elif loc[:1] == ["targets"]:
            key = "targets"
        elif loc[:1] in (["release"], ["id"], ["deadline"], ["gate_s"], ["window_start"], ["window_end"]):
            key = loc[0]
        else:
            key = "form"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if key == "window_end" and msg.startswith("the install period must end after it starts"):
            msg = PERIOD_ENDS_BEFORE_START  # the same refusal as the form's own check, in the console's words
        out.setdefault(key, msg)
    return out


# -- reading a rollout ------------------------------------------------------------------------------------


def gate_panel(doc: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Per wave: each gate's current value next to its threshold, the soak countdown, the engine's words."""
    out = []
    for w in doc["waves"]:
        plan = w["plan"]
        states = w["states"]
        failed = sum(n for s, n in states.items() if s in FAILED)
        finished = sum(n for s, n in states.items() if s in FINAL)
        committed = states.get("committed", 0)
        limit = plan.get("failures") or {}
        if limit.get("percent") is not None:
            threshold = f"> {limit['percent']:g}% (≥ {limit.get('min_sample', 1)})"
        else:
            threshold = f"> {limit.get('count', 0)}"
        soak_left = None
        if w["soak_since"] and w["state"] == "running":
            since = datetime.fromisoformat(w["soak_since"].replace("Z", "+00:00")).timestamp()
            soak_left = max(0.0, float(plan.get("soak_s", 0)) - (now - since))
        out.append(
            {
                **w,
                "failed": failed,
                "finished": finished,
                "committed": committed,
                "threshold": threshold,
                "soak_s": plan.get("soak_s", 0),
                "soak_left": soak_left,
                "progress": round(100 * committed / w["size"]) if w["size"] else 0,
            }
        )
    return out


def next_window(maintenance: str, tz: str, now: datetime) -> tuple[bool, datetime]:
    """Whether the office's maintenance window is open now, and when it (next) opens, local time."""
    zone = ZoneInfo(tz)
    local = now.astimezone(zone)
    start_s, _, end_s = maintenance.partition("-")
    start = local.replace(hour=int(start_s[:2]), minute=int(start_s[3:5]), second=0, microsecond=0)
    end = local.replace(hour=int(end_s[:2]), minute=int(end_s[3:5]), second=0, microsecond=0)
    if end <= start:  # wraps past midnight
        open_now = local >= start or local < end
    else:
        open_now = start <= local < end
    upcoming = start if start > local else start + timedelta(days=1)
    return open_now, upcoming


def calendar(fleet: FleetServer, user: User, now: datetime) -> list[dict[str, Any]]:
    """Each office's window in its local time, open or when it next opens, and its waiting terminals."""
    waiting: dict[str, list[dict[str, Any]]] = {}
    for r in fleet.rollouts.list_rollouts():
        if r["state"] not in LIVE:
            continue
        for t in fleet.rollouts.terminals(r["id"], state="waiting_window"):
            waiting.setdefault(t["office"], []).append({"terminal": t["terminal"], "rollout": r["id"]})
    out = []
    for o in fleet.registry.offices():
        if not user.sees_office(o.id):
            continue
        open_now, upcoming = next_window(o.maintenance, o.timezone, now)
        out.append(
            {
                "office": o,
                "local_now": now.astimezone(ZoneInfo(o.timezone)).strftime("%Y-%m-%d %H:%M"),
                "open_now": open_now,
                "next_open": upcoming.strftime("%Y-%m-%d %H:%M"),
                "waiting": waiting.get(o.id, []),
            }
        )
    return out


def install_periods(fleet: FleetServer, now: datetime) -> list[dict[str, Any]]:
    """Live rollouts whose plan has its own install period: its start and end, and whether it is
    still to come, open or over (the office windows above apply inside it)."""
    out = []
    for r in fleet.rollouts.list_rollouts():
        if r["state"] not in LIVE or not (r.get("window_start") or r.get("window_end")):
            continue
        start = datetime.fromisoformat(r["window_start"]) if r.get("window_start") else None
        end = datetime.fromisoformat(r["window_end"]) if r.get("window_end") else None
        if start is not None and now < start:
            phase = "not started"
        elif end is not None and now >= end:
            phase = "ended"
        else:
            phase = "open"
        out.append(
            {
                "rollout": r["id"],
                "release": f"{r['kind']} {r['version']}",
                "start": r.get("window_start"),
                "end": r.get("window_end"),
                "phase": phase,
            }
        )
    return out


def trust(fleet: FleetServer) -> dict[str, Any]:
    """The TUF roles' expiry (release service) and terminals reporting metadata errors, by kind."""
    releases = getattr(fleet, "releases", None)
    chain = releases.trust() if releases is not None else {"initialised": False, "roles": []}
    errors: dict[str, list[dict[str, Any]]] = {}
    for r in fleet.rollouts.list_rollouts():
        for t in fleet.rollouts.terminals(r["id"]):
            if t["reason"] in METADATA_REASONS:
                errors.setdefault(t["reason"], []).append(
                    {"terminal": t["terminal"], "office": t["office"], "rollout": r["id"], "detail": t["detail"]}
                )
    groups = [
        {"reason": k, "words": REASONS.get(k, k), "terminals": v}
        for k, v in sorted(errors.items(), key=lambda kv: -len(kv[1]))
    ]
    return {"chain": chain, "groups": groups}


# -- routes ---------------------------------------------------------------------------------------------


def build_rollout_router(console: Console, clock: Callable[[], float] = time.time) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    def release_choices(fleet: FleetServer) -> list[dict[str, Any]]:
        releases = getattr(fleet, "releases", None)
        try:
            return [rec.to_dict() for rec in releases.list()] if releases is not None else []
        except Exception:
            log.exception("listing releases for the rollout form failed")
            return []

    def new_form(
        request: Request,
        user: User,
        session: Any,
        values: dict[str, Any],
        waves: list[dict[str, str]],
        *,
        errors: dict[str, str] | None = None,
        preview: dict[str, Any] | None = None,
        status: int = 200,
    ) -> Response:
        fleet = get_fleet(request)
        return render(
            console,
            request,
            "rollout_new.html",
            user,
            session,
            status=status,
            v=values,
            waves=waves,
            errors=errors or {},
            preview=preview,
            releases=release_choices(fleet),
            office_list=fleet.registry.offices(),
        )

    @r.get("/rollouts")
    def rollouts(request: Request) -> Response:
        user, session = who(request, console, *READERS)
        fleet = get_fleet(request)
        return render(
            console, request, "rollouts.html", user, session, refresh=True, rollouts=fleet.rollouts.list_rollouts()
        )

    @r.get("/rollouts/new")
    def new(request: Request) -> Response:
        user, session = who(request, console, Role.ADMIN)
        values: dict[str, Any] = {"window": "office", "gate_s": "120", "on_halt": "pause", "target_office": []}
        return new_form(request, user, session, values, [dict(w) for w in DEFAULT_WAVES])

    @r.post("/rollouts/new")
    async def create(request: Request) -> Response:
        user, session = who(request, console, Role.ADMIN)
        raw = await request.form()
        check_csrf(request, session, str(raw.get("csrf") or ""))
        fleet = get_fleet(request)
        values: dict[str, Any] = {k: str(v)[:2000] for k, v in raw.items() if k != "target_office"}
        values["target_office"] = [str(v) for v in raw.getlist("target_office")]
        waves = [{k: values.get(f"w{i}_{k}", "") for k in DEFAULT_WAVES[0]} for i in range(1, WAVE_ROWS + 1)]
        plan_doc, errors = form_to_plan(values, [o.id for o in fleet.registry.offices()])
        if errors:
            return new_form(request, user, session, values, waves, errors=errors, status=422)
        try:
            plan = RolloutPlan.model_validate(plan_doc)
        except ValidationError as err:
            return new_form(request, user, session, values, waves, errors=validation_errors(err), status=422)
        try:
            if values.get("action") == "create":
                created = await run_in_threadpool(fleet.rollouts.create, plan, user)
                return RedirectResponse(f"/rollouts/{created['rollout']['id']}", status_code=303)
            preview = await run_in_threadpool(fleet.rollouts.preview, plan)
        except (RolloutError, AuthError) as err:
            msg = str(err)
            return new_form(request, user, session, values, waves, errors={field_of(msg): msg}, status=422)
        return new_form(request, user, session, values, waves, preview=preview)

    def detail(
        request: Request, rollout_id: str, *, action_error: tuple[str, str] | None = None, status: int = 200
    ) -> Response:
        user, session = who(request, console, *READERS)
        fleet = get_fleet(request)
        if not _ROLLOUT_RE.match(rollout_id):
            raise PageRefused(404, "Not found", "Not found")
        try:
            doc = fleet.rollouts.get(rollout_id)
        except UnknownRollout as err:
            raise PageRefused(404, "Not found", "Not found") from err
        terminals = fleet.rollouts.terminals(rollout_id)
        not_done = [t for t in terminals if t["state"] != "committed"]
        for t in not_done:
            t["words"] = (
                REASONS.get(t["reason"], t["reason"].replace("_", " ")) if t["reason"] not in ("", "ok") else ""
            )
        return render(
            console,
            request,
            "rollout.html",
            user,
            session,
            status=status,
            refresh=doc["state"] in LIVE and action_error is None,
            r=doc,
            gates=gate_panel(doc, clock()),
            not_done=not_done[:MAX_TERMINALS_SHOWN],
            not_done_total=len(not_done),
            action_error=action_error,
        )

    @r.get("/rollouts/calendar")
    def calendar_page(request: Request) -> Response:
        user, session = who(request, console, *READERS)
        fleet, now = get_fleet(request), datetime.fromtimestamp(clock(), UTC)
        rows = calendar(fleet, user, now)
        periods = install_periods(fleet, now)
        return render(
            console, request, "rollout_calendar.html", user, session, refresh=True, rows=rows, periods=periods
        )

    @r.get("/rollouts/trust")
    def trust_page(request: Request) -> Response:
        user, session = who(request, console, *READERS)
        return render(console, request, "rollout_trust.html", user, session, **trust(get_fleet(request)))

    @r.get("/rollouts/{rollout_id}")
    def rollout(request: Request, rollout_id: str) -> Response:
        return detail(request, rollout_id)

    @r.post("/rollouts/{rollout_id}/{action}")
    async def act(request: Request, rollout_id: str, action: str) -> Response:
        user, session = who(request, console, Role.ADMIN)  # managers and auditors: 403 from here
        raw = await request.form()
        check_csrf(request, session, str(raw.get("csrf") or ""))
        if action not in ACTIONS or not _ROLLOUT_RE.match(rollout_id):
            raise PageRefused(404, "Not found", "Not found")
        fleet = get_fleet(request)
        note = str(raw.get("note") or "")[:500]
        service = fleet.rollouts
        try:
            if action == "retry":
                await run_in_threadpool(service.retry, rollout_id, user, None, note)
            elif action == "rollback":
                done = await run_in_threadpool(service.rollback, rollout_id, user, RollbackRequest(note=note))
                return RedirectResponse(f"/rollouts/{done['id']}", status_code=303)
            else:
                await run_in_threadpool(getattr(service, action), rollout_id, user, note)
        except UnknownRollout as err:
            raise PageRefused(404, "Not found", "Not found") from err
        except (RolloutError, AuthError) as err:
            status = 403 if isinstance(err, NotAllowed) else 409
            refused = (action, str(err))
            return await run_in_threadpool(lambda: detail(request, rollout_id, action_error=refused, status=status))
        return RedirectResponse(f"/rollouts/{rollout_id}", status_code=303)

    return r
