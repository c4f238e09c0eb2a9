"""fleetctl: the admin CLI. It talks only to the server's HTTP API (FLEETCTL_URL, FLEETCTL_TOKEN)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Manage the kiosk fleet: offices, terminals, health, usage, playbooks.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

STATE_STYLE = {"online": "green", "stale": "yellow", "offline": "red", "missing": "dim"}
EXIT_USAGE, EXIT_AUTH, EXIT_SERVER, EXIT_UNREACHABLE = 2, 3, 4, 5


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(
            base_url=url.rstrip("/"), timeout=30.0, headers={"Authorization": f"Bearer {token}"} if token else {}
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        forbidden: Callable[[str], str] = "not allowed: {}".format,
        refused: Callable[[str], str] = str,
        **kw: Any,
    ) -> Any:
        """The answer's JSON (or text); any error ends the command with a plain line and its exit
        code. `forbidden` and `refused` word the server's detail of a 403 and of another 4xx."""
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            fail(f"cannot reach the fleet server at {self.client.base_url}: {e}", EXIT_UNREACHABLE)
        if r.status_code == 401:
            fail("the server did not accept the token (set FLEETCTL_TOKEN)", EXIT_AUTH)
        if r.status_code == 403:
            fail(forbidden(_detail(r)), EXIT_AUTH)
        if r.status_code == 429:
            fail(f"the server is refusing this address for a while: {_detail(r)}", EXIT_AUTH)
        if r.status_code >= 500:
            fail(f"the server failed ({r.status_code}): {_detail(r)}", EXIT_SERVER)
        if r.status_code >= 400:
            fail(refused(_detail(r)), EXIT_USAGE)
        if r.content and r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text  # also a 204's empty body, whatever its content-type says


def _detail(r: httpx.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return r.text[:300]
    return str(doc.get("detail", doc)) if isinstance(doc, dict) else str(doc)


def fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def api(ctx: typer.Context) -> Api:
    return ctx.obj  # type: ignore[no-any-return]


@app.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="FLEETCTL_URL", help="fleet server URL")] = "http://127.0.0.1:8080",
    token: Annotated[str, typer.Option(envvar="FLEETCTL_TOKEN", help="bearer token", show_default=False)] = "",
) -> None:
    ctx.obj = Api(url, token)


@app.command()
def offices(ctx: typer.Context) -> None:
    """List offices with how many terminals are online."""
    rows = api(ctx).call("GET", "/api/v1/offices")
    t = Table("office", "name", "district", "pilot", "terminals", "online", "offline")
    for o in rows:
        h = o.get("health") or {}
        t.add_row(
            o["id"],
            o["name"],
            o["district"],
            "✓" if o["pilot"] else "",
            str(h.get("terminals", 0)),
            f"[green]{h.get('online', 0)}[/]",
            f"[red]{h.get('offline', 0)}[/]" if h.get("offline") else "0",
        )
    out.print(t)


@app.command()
def terminals(ctx: typer.Context, office: Annotated[str | None, typer.Option(help="only this office")] = None) -> None:
    """List terminals with their health."""
    rows = api(ctx).call("GET", "/api/v1/terminals", params={"office": office} if office else None)
    t = Table("terminal", "office", "profile", "state", "since", "reason", "agent")
    for r in rows:
        h = r.get("health") or {}
        state = h.get("state", "revoked" if not r["enabled"] else "?")
        t.add_row(
            r["id"],
            r["office_id"],
            r["profile"],
            f"[{STATE_STYLE.get(state, 'white')}]{state}[/]",
            h.get("since") or "",
            h.get("reason") or "",
            h.get("agent_version") or "",
        )
    out.print(t)


@app.command()
def enrol(
    ctx: typer.Context,
    terminal_id: str,
    office: Annotated[str, typer.Option(help="office id")],
    profile: Annotated[str, typer.Option(help="device profile")] = "generic",
) -> None:
    """Enrol a terminal and print its broker credentials (shown once)."""
    doc = api(ctx).call("POST", "/api/v1/terminals", json={"id": terminal_id, "office_id": office, "profile": profile})
    out.print(f"enrolled [bold]{terminal_id}[/] in {office}")
    out.print(f"mqtt username: {doc['mqtt_username']}\nmqtt password: {doc['mqtt_password']}")
    out.print("[dim]the password is shown once; the server keeps only its hash[/]")


@app.command()
def revoke(ctx: typer.Context, terminal_id: str) -> None:
    """Revoke a terminal: its broker account goes and its connection is cut."""
    api(ctx).call("DELETE", f"/api/v1/terminals/{terminal_id}")
    out.print(f"revoked {terminal_id}")


@app.command()
def onboard(
    ctx: typer.Context,
    office: str,
    count: Annotated[int, typer.Option(min=1, max=200, help="number of terminals")] = 1,
    profile: Annotated[str, typer.Option()] = "generic",
    run_playbook: Annotated[bool, typer.Option("--run-playbook/--no-playbook")] = False,
) -> None:
    """Onboard an office: enrol its terminals (all or none) and optionally provision them."""
    terms = [{"id": f"{office}-{i:02d}", "office_id": office, "profile": profile} for i in range(1, count + 1)]
    doc = api(ctx).call(
        "POST", f"/api/v1/offices/{office}/onboard", json={"terminals": terms, "run_playbook": run_playbook}
    )
    t = Table("terminal", "mqtt password (shown once)")
    for x in doc["terminals"]:
        t.add_row(x["id"], x["mqtt_password"])
    out.print(t)
    run = doc.get("playbook_run")
    if run:
        _follow_run(api(ctx), run["id"] if isinstance(run, dict) else run)


@app.command("run-playbook")
def run_playbook(
    ctx: typer.Context, name: str, extra: Annotated[list[str] | None, typer.Option("--var", help="key=value")] = None
) -> None:
    """Run a playbook on the server and follow it with a progress display."""
    variables = dict(v.split("=", 1) for v in (extra or []) if "=" in v)
    doc = api(ctx).call("POST", f"/api/v1/playbooks/{name}/runs", json={"extravars": variables})
    _follow_run(api(ctx), doc["id"])


def _follow_run(a: Api, run_id: Any) -> None:
    seen = 0
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} tasks"),
        TimeElapsedColumn(),
        console=out,
    ) as progress:
        task = progress.add_task(f"playbook run {run_id}", total=None)
        while True:
            run = a.call("GET", f"/api/v1/playbooks/runs/{run_id}")
            events = run.get("events") or []
            for e in events[seen:]:
                status = e.get("status", "")
                colour = {"failed": "red", "changed": "yellow", "ok": "green"}.get(status, "dim")
                progress.console.print(f"  [{colour}]{status:8}[/] {e.get('host', '')}: {e.get('task', '')}")
            seen = len(events)
            progress.update(task, completed=seen)
            if run.get("status") in ("successful", "failed", "canceled", "timeout"):
                break
            time.sleep(0.5)
    colour = "green" if run.get("status") == "successful" else "red"
    out.print(f"[{colour}]{run.get('status')}[/] — changed {run.get('changed', '?')}, failed {run.get('failed', '?')}")
    if run.get("status") != "successful":
        raise typer.Exit(EXIT_SERVER)


@app.command()
def alerts(ctx: typer.Context, all_: Annotated[bool, typer.Option("--all", help="include resolved")] = False) -> None:
    """Alerts firing now."""
    rows = api(ctx).call("GET", "/api/v1/health/alerts", params={"active": str(not all_).lower()})
    t = Table("since", "severity", "kind", "office", "message", "resolved")
    for r in rows:
        t.add_row(r["fired_at"], r["severity"], r["kind"], r["office"], r["message"], r["resolved_at"] or "")
    out.print(t if rows else "[green]no alerts[/]")


@app.command()
def usage(
    ctx: typer.Context,
    office: Annotated[str | None, typer.Option()] = None,
    date_from: Annotated[str | None, typer.Option("--from", help="YYYY-MM-DD")] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="YYYY-MM-DD")] = None,
) -> None:
    """Usage per service item: sessions, completed, abandoned, durations."""
    params = {k: v for k, v in {"office": office, "date_from": date_from, "date_to": date_to}.items() if v}
    doc = api(ctx).call("GET", "/api/v1/usage/items", params=params)
    t = Table(
        "office",
        "item",
        "started",
        "completed",
        "abandoned",
        "face login",
        "median s",
        "p90 s",
        title=f"usage {doc['date_from']} – {doc['date_to']}",
    )
    for r in sorted(doc["rows"], key=lambda r: (r["office_id"], -r["started"])):
        share = f"{r['face_login_share']:.0%}" if r.get("face_login_share") is not None else ""
        t.add_row(
            r["office_id"],
            f"{r['service_code']} {r['name']}",
            str(r["started"]),
            str(r["completed"]),
            str(r["abandoned"]),
            share,
            _num(r.get("median_duration_s")),
            _num(r.get("p90_duration_s")),
        )
    out.print(t if doc["rows"] else "no sessions in this period")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


@app.command()
def whoami(ctx: typer.Context) -> None:
    """Show who the token belongs to."""
    me = api(ctx).call("GET", "/api/v1/me")
    out.print(f"{me['name']} ({me['role']}){' · offices: ' + ', '.join(me['offices']) if me['offices'] else ''}")


# -- users ------------------------------------------------------------------------------------------

user_app = typer.Typer(help="Console users: set a user's console password.", no_args_is_help=True)
app.add_typer(user_app, name="user")


def _read_new_password(name: str, from_stdin: bool) -> str:
    """The new password: one line of standard input, or asked twice without echo. Never from argv."""
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            fail("no password on standard input (send it as one line)", EXIT_USAGE)
        return line.rstrip("\r\n")
    first = typer.prompt(f"New console password for {name}", hide_input=True, default="", show_default=False)
    again = typer.prompt("The same password again", hide_input=True, default="", show_default=False)
    if first != again:
        fail("the two passwords are not the same; nothing was changed", EXIT_USAGE)
    return str(first)


@user_app.command("password")
def user_password(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the user whose console password to set")],
    from_stdin: Annotated[
        bool, typer.Option("--stdin", help="read the password from standard input (one line) instead of asking")
    ] = False,
) -> None:
    """Set a user's console password (admins only). Their open console sessions end; tokens keep working."""
    from fleet_server.auth.passwords import WeakPassword, check_policy
    from fleet_server.auth.routes import NAME_PATTERN

    if not re.fullmatch(NAME_PATTERN, name):
        fail(f"{name[:64]!r} is not a user name (2-64 lower-case letters, digits, '.', '_' or '-')", EXIT_USAGE)
    password = _read_new_password(name, from_stdin)
    try:
        check_policy(password)
    except WeakPassword as e:
        fail(f"that password is too weak: {e}; nothing was changed", EXIT_USAGE)
    api(ctx).call(
        "POST",
        f"/api/v1/users/{name}/password",
        json={"password": password},
        forbidden=lambda d: f"only an admin may set console passwords, and this token's user is not one ({d})",
        # 422: e.g. "there is no user 'x'; create it first", or the password policy
        refused=lambda d: d if "nothing" in d else f"{d}; nothing was changed",
    )
    out.print(f"console password of {name} set; their open console sessions have ended (tokens keep working)")


def _register_subcommands() -> None:
    # each group lives in its own module; they import Api, api, fail, out from here
    from fleet_server import cli_release, cli_rollout

    app.add_typer(cli_release.app, name="release", help="Build, sign, publish and list TUF-signed releases.")
    app.add_typer(cli_rollout.app, name="rollout", help="Plan, preview, run and control staged rollouts.")


def main() -> None:
    _register_subcommands()
    app()


if __name__ == "__main__":
    main()
