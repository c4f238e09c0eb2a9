"""fleetctl rollout …: see the commands below. Registered on the main app by fleet_server/cli.py."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleet_server.cli import EXIT_SERVER, EXIT_USAGE, Api, api, fail, out

app = typer.Typer(help="Rollouts (see `fleetctl rollout --help`).", no_args_is_help=True, add_completion=False)

STATE_STYLE = {
    "running": "cyan",
    "completed": "green",
    "halted": "bold red",
    "paused": "yellow",
    "waiting_approval": "yellow",
    "awaiting_approval": "yellow",
    "aborted": "red",
    "rolled_back": "magenta",
    "done": "green",
    "pending": "dim",
}
ENDED = ("completed", "aborted", "rolled_back")
STOPPED = ("halted", "paused", "waiting_approval", "awaiting_approval")
IN_PROGRESS = (
    "pending",
    "notified",
    "downloading",
    "downloaded",
    "waiting_window",
    "waiting_session",
    "installing",
    "on_trial",
)
FAILED = ("failed", "rolled_back", "rejected", "timed_out")

PlanFile = Annotated[
    Path | None, typer.Option("--plan", help="plan file (YAML or JSON): release, targets, waves, …", exists=True)
]
Release = Annotated[str | None, typer.Option("--release", help="a published release's target path")]
Waves = Annotated[
    list[str] | None,
    typer.Option("--wave", help="a wave's size: N terminals, N% or 'rest'; append '@pilot' for pilot offices only"),
]
Offices = Annotated[list[str] | None, typer.Option("--office", help="target this office (repeat); default: all")]
Now = Annotated[bool, typer.Option("--now", help="install at once, not in each office's maintenance window")]
WindowStart = Annotated[
    str | None,
    typer.Option(
        "--window-start",
        help="the rollout's install period starts then (ISO 8601 with zone, e.g. 2026-12-03T00:00+08:00):"
        " nothing is sent before",
    ),
]
WindowEnd = Annotated[
    str | None,
    typer.Option(
        "--window-end",
        help="the install period ends then (after --window-start); it acts as the deadline: after it the"
        " terminals install when idle",
    ),
]


def _moment(option: str, value: str | None) -> str | None:
    """An option's time as given, once it reads as an ISO 8601 time with its zone."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(f"{option} {value!r}: not a time; write it like 2026-12-03T00:00+08:00", EXIT_USAGE)
    if at.tzinfo is None:
        fail(f"{option} {value!r}: give the time zone too, e.g. 2026-12-03T00:00+08:00", EXIT_USAGE)
    return at.isoformat()


def _wave(spec: str) -> dict[str, Any]:
    size, _, where = spec.partition("@")
    wave: dict[str, Any] = {}
    size = size.strip()
    if size.endswith("%"):
        wave["size"] = {"percent": float(size[:-1])}
    elif size.isdigit():
        wave["size"] = {"count": int(size)}
    elif size not in ("rest", "all", ""):
        fail(f"--wave {spec!r}: a size is a number, a percent (25%) or 'rest'", EXIT_USAGE)
    if where == "pilot":
        wave["pilot_only"] = True
    elif where:
        wave["offices"] = where.split("+")
    return wave


def _plan(
    plan_file: Path | None,
    release: str | None,
    waves: list[str] | None,
    offices: list[str] | None,
    now: bool,
    window_start: str | None,
    window_end: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The plan document from a plan file and the options shared by preview and create."""
    extra["window_start"] = _moment("--window-start", window_start)
    extra["window_end"] = _moment("--window-end", window_end)
    doc: dict[str, Any] = {}
    if plan_file is not None:
        try:
            loaded = yaml.safe_load(plan_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            fail(f"{plan_file}: not a readable YAML or JSON plan: {e}", EXIT_USAGE)
        if not isinstance(loaded, dict):
            fail(f"{plan_file}: a plan is a mapping with release, targets and waves", EXIT_USAGE)
        doc.update(loaded)
    if release:
        doc["release"] = release
    if waves:
        doc["waves"] = [_wave(w) for w in waves]
    if offices:
        doc.setdefault("targets", {})["offices"] = offices
    if now:
        doc["window"] = "now"
    doc.update({k: v for k, v in extra.items() if v not in (None, False)})
    if "release" not in doc:
        fail("name the release: --release PATH or a plan file with 'release'", EXIT_USAGE)
    doc.setdefault("waves", [{"name": "everyone"}])
    return doc


def _show_preview(pv: dict[str, Any]) -> None:
    rel = pv["release"]
    out.print(
        f"[bold]{rel['path']}[/] ({rel['kind']} {rel['version']}, counter {rel['counter']})"
        f" → {pv['terminals']} terminals"
    )
    for w in pv["waves"]:
        t = Table(
            "terminal", "office", "profile", "flags", title=f"wave {w['wave']} {w['name']} — {w['size']} terminals"
        )
        for term in w["terminals"]:
            flags = ", ".join(term["flags"])
            t.add_row(term["terminal"], term["office_name"], term["profile"], f"[yellow]{flags}[/]" if flags else "")
        out.print(t)
    if pv["excluded"]:
        out.print(f"[dim]excluded: {', '.join(e['terminal'] + ' (' + e['why'] + ')' for e in pv['excluded'])}[/]")
    if pv["flagged"]:
        out.print(f"[yellow]{pv['flagged']} terminal(s) flagged[/] (offline, low disk or stale metadata)")


@app.command()
def preview(
    ctx: typer.Context,
    plan_file: PlanFile = None,
    release: Release = None,
    wave: Waves = None,
    office: Offices = None,
    now: Now = False,
    window_start: WindowStart = None,
    window_end: WindowEnd = None,
) -> None:
    """Show exactly which terminals each wave would hit, flagged; nothing is created."""
    doc = _plan(plan_file, release, wave, office, now, window_start, window_end)
    _show_preview(api(ctx).call("POST", "/api/v1/rollouts/preview", json=doc))


@app.command()
def create(
    ctx: typer.Context,
    plan_file: PlanFile = None,
    release: Release = None,
    wave: Waves = None,
    office: Offices = None,
    now: Now = False,
    rollout_id: Annotated[str | None, typer.Option("--id", help="rollout id (default: from the release)")] = None,
    approval: Annotated[bool, typer.Option("--approval", help="a second admin approves before it starts")] = False,
    rollback_on_halt: Annotated[bool, typer.Option("--rollback-on-halt", help="roll back instead of pausing")] = False,
    window_start: WindowStart = None,
    window_end: WindowEnd = None,
    watch: Annotated[bool, typer.Option("--watch", help="follow it live")] = False,
) -> None:
    """Create a rollout (its waves are fixed now, as the preview shows)."""
    doc = _plan(
        plan_file,
        release,
        wave,
        office,
        now,
        window_start,
        window_end,
        id=rollout_id,
        approval_required=approval,
        on_halt="rollback" if rollback_on_halt else None,
    )
    created = api(ctx).call("POST", "/api/v1/rollouts", json=doc)
    _show_preview(created["preview"])
    rid = created["rollout"]["id"]
    out.print(f"created rollout [bold]{rid}[/] ({created['rollout']['state']})")
    if watch:
        _watch(api(ctx), rid)


def _control(ctx: typer.Context, rollout_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = api(ctx).call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    _summary(doc)
    return doc


Note = Annotated[str, typer.Option("--note", help="why (goes to the audit log)")]


@app.command()
def approve(ctx: typer.Context, rollout_id: str, note: Note = "") -> None:
    """Approve the start or the next wave (not as the rollout's creator)."""
    _control(ctx, rollout_id, "approve", {"note": note})


@app.command()
def pause(ctx: typer.Context, rollout_id: str, note: Note = "") -> None:
    """Stop sending the release to more terminals."""
    _control(ctx, rollout_id, "pause", {"note": note})


@app.command()
def resume(ctx: typer.Context, rollout_id: str, note: Note = "") -> None:
    """Continue a paused or halted rollout (a halted wave's failures are then accepted)."""
    _control(ctx, rollout_id, "resume", {"note": note})


@app.command()
def abort(ctx: typer.Context, rollout_id: str, note: Note = "") -> None:
    """End the rollout: nothing more is sent (terminals keep what they committed)."""
    _control(ctx, rollout_id, "abort", {"note": note})


@app.command()
def retry(
    ctx: typer.Context,
    rollout_id: str,
    wave: Annotated[int | None, typer.Option("--wave", help="only this wave")] = None,
    note: Note = "",
) -> None:
    """Send the release again to the failed terminals only."""
    doc = _control(ctx, rollout_id, "retry", {"wave": wave, "note": note})
    out.print(
        f"retrying {len(doc.get('retried', []))} terminal(s): {', '.join(doc.get('retried', [])) or 'none failed'}"
    )


@app.command()
def rollback(
    ctx: typer.Context,
    rollout_id: str,
    to: Annotated[str | None, typer.Option("--to", help="release path (default: the rollback twin)")] = None,
    in_window: Annotated[bool, typer.Option("--in-window", help="install in maintenance windows, not now")] = False,
    note: Note = "",
    watch: Annotated[bool, typer.Option("--watch", help="follow the rollback live")] = False,
) -> None:
    """Roll the terminals this rollout reached back (a new rollout to the rollback release)."""
    body = {"release": to, "window": "office" if in_window else "now", "note": note}
    doc = _control(ctx, rollout_id, "rollback", body)
    if watch:
        _watch(api(ctx), doc["id"])


@app.command("list")
def list_(ctx: typer.Context, state: Annotated[str | None, typer.Option("--state")] = None) -> None:
    """Rollouts, newest first."""
    rows = api(ctx).call("GET", "/api/v1/rollouts", params={"state": state} if state else {})
    t = Table("rollout", "release", "state", "wave", "terminals", "committed", "failed", "why")
    for r in rows:
        failed = sum(r["states"].get(s, 0) for s in FAILED)
        colour = STATE_STYLE.get(r["state"], "")
        t.add_row(
            r["id"],
            r["release"],
            f"[{colour}]{r['state']}[/]" if colour else r["state"],
            f"{r['current_wave']}/{r['waves']}",
            str(r["terminals"]),
            str(r["states"].get("committed", 0)),
            str(failed),
            r["reason"],
        )
    out.print(t if rows else "no rollouts")


def _summary(doc: dict[str, Any]) -> None:
    colour = STATE_STYLE.get(doc["state"], "")
    out.print(f"rollout [bold]{doc['id']}[/] → {doc['release']}: [{colour or 'default'}]{doc['state']}[/]")
    if doc.get("reason"):
        out.print(f"  {doc['reason']}")
    if doc.get("window_start") or doc.get("window_end"):
        out.print(f"  install period: {doc.get('window_start') or '…'} – {doc.get('window_end') or '…'}")


def _line(states: dict[str, int], size: int) -> str:
    committed = states.get("committed", 0)
    failed = sum(states.get(s, 0) for s in FAILED)
    busy = sum(states.get(s, 0) for s in IN_PROGRESS)
    text = f"{committed}/{size} committed"
    if busy:
        text += f", {busy} in progress"
    if failed:
        text += f", [red]{failed} failed[/]"
    return text


@app.command()
def status(
    ctx: typer.Context,
    rollout_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="follow it live until it ends or stops")] = False,
    terminals: Annotated[bool, typer.Option("--terminals", help="list each terminal's state")] = False,
) -> None:
    """Where a rollout stands: each wave and office, and why it waits or halted."""
    a = api(ctx)
    if watch:
        _watch(a, rollout_id)
        return
    doc = a.call("GET", f"/api/v1/rollouts/{rollout_id}")
    _summary(doc)
    t = Table("wave", "office", "state", "progress", "note")
    for w in doc["waves"]:
        colour = STATE_STYLE.get(w["state"], "")
        t.add_row(
            f"{w['wave']} {w['name']}",
            "",
            f"[{colour or 'default'}]{w['state']}[/]",
            _line(w["states"], w["size"]),
            w["note"],
        )
        for o in w["offices"]:
            t.add_row("", o["name"], "", _line(o["states"], o["terminals"]), "")
    out.print(t)
    if terminals:
        rows = a.call("GET", f"/api/v1/rollouts/{rollout_id}/terminals")
        tt = Table("terminal", "wave", "office", "state", "reason", "attempts", "detail")
        for r in rows:
            tt.add_row(
                r["terminal"], str(r["wave"]), r["office"], r["state"], r["reason"], str(r["attempts"]), r["detail"]
            )
        out.print(tt)
    if doc["state"] == "halted":
        raise typer.Exit(EXIT_SERVER)


def _watch(a: Api, rollout_id: str, interval_s: float = 1.0, max_s: float | None = None) -> None:
    """A live progress display per wave and office, until the rollout ends or stops by itself."""
    started = time.monotonic()
    tasks: dict[tuple[int, str], TaskID] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[line]}"),
        TimeElapsedColumn(),
        console=out,
    ) as progress:
        last_reason = None
        while True:
            doc = a.call("GET", f"/api/v1/rollouts/{rollout_id}")
            for w in doc["waves"]:
                rows = [(w["wave"], "", f"wave {w['wave']} {w['name']} [{w['state']}]", w["states"], w["size"])]
                rows += [(w["wave"], o["office"], f"   {o['name']}", o["states"], o["terminals"]) for o in w["offices"]]
                for wave_no, office, label, states, size in rows:
                    key = (wave_no, office)
                    line = _line(states, size)
                    done = states.get("committed", 0) + sum(states.get(s, 0) for s in FAILED)
                    if key not in tasks:
                        tasks[key] = progress.add_task(label, total=max(size, 1), line=line)
                    progress.update(tasks[key], description=label, completed=done, total=max(size, 1), line=line)
            if doc["reason"] and doc["reason"] != last_reason:
                progress.console.print(
                    f"[{STATE_STYLE.get(doc['state'], 'default')}]{doc['state']}[/]: {doc['reason']}"
                )
                last_reason = doc["reason"]
            if doc["state"] in ENDED or doc["state"] in STOPPED:
                break
            if max_s is not None and time.monotonic() - started > max_s:
                break
            time.sleep(interval_s)
    _summary(doc)
    if doc["state"] == "halted":
        raise typer.Exit(EXIT_SERVER)


def _json(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, indent=2)
