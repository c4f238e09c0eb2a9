"""fleetctl release …: see the commands below. Registered on the main app by fleet_server/cli.py.

The keystore (`--keystore DIR`) stays on the release manager's machine: root, release and
face-model keys never go to the server. Signing reads the server's current metadata (checked
against the keystore's own keys) and its highest release counter per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from fleet_server.cli import EXIT_AUTH, EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE, api, fail, out
from fleet_server.releases import bundle as bundles
from fleet_server.releases.client import ReleaseClient, ReleaseClientError
from fleet_server.releases.errors import ReleaseError
from fleet_server.releases.keystore import Keystore
from fleet_server.releases.signing import SignedRelease, resign_targets, sign_bundle, sign_republish

app = typer.Typer(help="Releases (see `fleetctl release --help`).", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="The offline keystore: make keys, rotate root, add and retire keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

KeystoreOpt = Annotated[Path, typer.Option("--keystore", help="the offline keystore folder")]
T = TypeVar("T")


def _client(ctx: typer.Context) -> ReleaseClient:
    return ReleaseClient(api(ctx).client)


def _run(action: Callable[[], T]) -> T:
    """Domain errors -> plain words and an exit code (the CLI's one translation point)."""
    try:
        return action()
    except ReleaseClientError as err:
        if err.status == 0:
            fail(str(err), EXIT_UNREACHABLE)
        if err.status in (401, 403):
            fail(f"not allowed: {err}", EXIT_AUTH)
        if err.status >= 500:
            fail(f"the server failed ({err.status}): {err}", EXIT_SERVER)
        fail(str(err), EXIT_USAGE)
    except ReleaseError as err:
        fail(str(err), EXIT_USAGE)


def _profiles(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()] or ["*"]


# -- keys ------------------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    keystore: KeystoreOpt,
    root_keys: Annotated[int, typer.Option(min=1, max=9, help="number of root keys")] = 2,
    root_threshold: Annotated[int, typer.Option(min=1, max=9, help="root signatures needed")] = 1,
    release_keys: Annotated[int, typer.Option(min=1, max=9, help="number of release (targets) keys")] = 1,
    face_threshold: Annotated[int, typer.Option(min=1, max=2, help="face-model signatures needed (of 2)")] = 2,
) -> None:
    """Make a new keystore: root, release and face-model keys, the first root, the online key."""
    ks = _run(
        lambda: Keystore.init(
            keystore,
            root_keys=root_keys,
            root_threshold=root_threshold,
            release_keys=release_keys,
            face_threshold=face_threshold,
        )
    )
    out.print(f"keystore made in [bold]{keystore}[/] (root {root_threshold} of {root_keys} keys)")
    out.print(
        f"copy [bold]{ks.online_key_file}[/] to the server (mode 0600, FLEET_TUF_ONLINE_KEY), then run"
        " `fleetctl release init-server --keystore …`"
    )
    out.print("[dim]keep the rest of this folder offline; root keys never go to the server[/]")


@keys_app.command("list")
def keys_list(keystore: KeystoreOpt) -> None:
    """The keystore's keys and the roles root gives them."""
    ks = _run(lambda: Keystore(keystore))
    root = ks.root().signed
    t = Table("key id", "role", "file", "in root", "retired")
    for e in sorted(ks.keys.values(), key=lambda e: (e.role, e.file)):
        roles = [r for r, role in root.roles.items() if e.keyid in role.keyids]
        t.add_row(e.keyid[:16], e.role, e.file, ", ".join(roles), "yes" if e.retired else "")
    out.print(t)
    out.print(f"root version {root.version}, expires {root.expires:%Y-%m-%d}")


def _publish_root(ctx: typer.Context, ks: Keystore, md: Any, resign: bool) -> None:
    _run(lambda: _client(ctx).publish_root(ks, md, resign=resign))
    out.print(f"root version {md.signed.version} signed by the old and the new keys and published")


@keys_app.command("rotate-root")
def keys_rotate_root(ctx: typer.Context, keystore: KeystoreOpt) -> None:
    """Replace every root key with a new one; publish the new root version."""
    ks = _run(lambda: Keystore(keystore))
    md = _run(ks.rotate_root)
    _publish_root(ctx, ks, md, resign=False)


@keys_app.command("add-key")
def keys_add_key(
    ctx: typer.Context, keystore: KeystoreOpt, role: Annotated[str, typer.Option(help="root or targets")]
) -> None:
    """Add a new key to a role; publish the new root version."""
    ks = _run(lambda: Keystore(keystore))
    keyid, md = _run(lambda: ks.add_key(role))
    out.print(f"added {role} key {keyid[:16]}")
    _publish_root(ctx, ks, md, resign=role == "targets")


@keys_app.command("retire-key")
def keys_retire_key(
    ctx: typer.Context, keystore: KeystoreOpt, keyid: Annotated[str, typer.Argument(help="key id (or a prefix)")]
) -> None:
    """Remove a key from root; publish the new root version (targets re-signed if it was a release key)."""
    ks = _run(lambda: Keystore(keystore))
    role, md = _run(lambda: ks.retire_key(keyid))
    out.print(f"retired {role} key {keyid[:16]}")
    _publish_root(ctx, ks, md, resign=role == "targets")


# -- server set-up ---------------------------------------------------------------------------------


@app.command("init-server")
def init_server(ctx: typer.Context, keystore: KeystoreOpt) -> None:
    """Set up the server's TUF repository from the keystore (its root and first targets)."""
    ks = _run(lambda: Keystore(keystore))
    doc = _run(lambda: _client(ctx).init_server(ks))
    out.print(f"TUF repository set up: {', '.join(f'{r} v{v}' for r, v in sorted(doc['versions'].items()))}")


# -- releases --------------------------------------------------------------------------------------


@app.command()
def build(
    out_dir: Annotated[Path, typer.Option("--out", help="new bundle folder")],
    kind: Annotated[str, typer.Option(help="agent, config or face_model")] = "agent",
    dist: Annotated[Path, typer.Option(help="./run.sh dist output (agent)")] = Path("dist"),
    settings: Annotated[Path | None, typer.Option(help="agent settings YAML (config)")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="model files folder (face_model)")] = None,
    threshold: Annotated[float | None, typer.Option(help="face decision threshold, e.g. 0.62")] = None,
    version: Annotated[str | None, typer.Option(help="release version (config, face_model)")] = None,
    profiles: Annotated[str, typer.Option(help="device profiles, comma-separated; * = all")] = "*",
    notes: Annotated[str, typer.Option(help="release notes")] = "",
) -> None:
    """Write a local release bundle to sign and publish."""
    prof = _profiles(profiles)
    if kind == "agent":
        doc = _run(lambda: bundles.build_agent(dist, out_dir, profiles=prof, notes=notes))
    elif kind == "config":
        if settings is None or version is None:
            fail("--kind config needs --settings FILE.yaml and --version", EXIT_USAGE)
        doc = _run(lambda: bundles.build_config(settings, out_dir, version=version, profiles=prof, notes=notes))
    elif kind == "face_model":
        if model_dir is None or threshold is None or version is None:
            fail("--kind face_model needs --model-dir, --threshold and --version", EXIT_USAGE)
        doc = _run(
            lambda: bundles.build_face_model(
                model_dir, out_dir, version=version, threshold=threshold, profiles=prof, notes=notes
            )
        )
    else:
        fail(f"--kind must be agent, config or face_model, not {kind!r}", EXIT_USAGE)
    out.print(f"bundle {out_dir}: {doc['kind']} {doc['version']}, {len(doc['files'])} file(s)")


@app.command()
def sign(ctx: typer.Context, bundle: Path, keystore: KeystoreOpt) -> None:
    """Sign the bundle under the next release counter (reads the server's current metadata)."""
    ks = _run(lambda: Keystore(keystore))
    client = _client(ctx)
    signed = _run(lambda: sign_bundle(bundle, ks, _run(lambda: client.current(ks))))
    for path in signed.new_targets:
        out.print(f"signed {path}")


@app.command()
def publish(ctx: typer.Context, bundle: Path) -> None:
    """Upload the bundle's files the server lacks and publish its signed metadata."""
    doc = _run(lambda: _client(ctx).publish_bundle(bundle))
    _print_published(doc)


@app.command()
def republish(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="target path of the earlier release")],
    keystore: KeystoreOpt,
    notes: Annotated[str, typer.Option(help="why (default: says which release it repeats)")] = "",
) -> None:
    """Sign an earlier release again under a new, higher counter and publish it (a manual roll back)."""
    ks = _run(lambda: Keystore(keystore))
    client = _client(ctx)
    signed = _run(lambda: sign_republish(target, ks, client.current(ks), notes))
    _print_published(_run(lambda: client.publish(signed)))


@app.command("resign")
def resign(
    ctx: typer.Context,
    keystore: KeystoreOpt,
    role: Annotated[str, typer.Option(help="targets, face-model or root")] = "targets",
) -> None:
    """Sign a role again with a fresh expiry (the server re-signs only snapshot and timestamp)."""
    ks = _run(lambda: Keystore(keystore))
    client = _client(ctx)
    if role == "root":
        new_root = _run(lambda: ks.change_root(lambda root: []))
        _publish_root(ctx, ks, new_root, resign=False)
        return
    state = _run(lambda: client.current(ks))
    md = _run(lambda: resign_targets(ks, state, role))
    signed = SignedRelease(targets=md) if role == "targets" else SignedRelease(delegated={role: md})
    _print_published(_run(lambda: client.publish(signed)))
    out.print(f"{role} version {md.signed.version} expires {md.signed.expires:%Y-%m-%d}")


@app.command("list")
def list_releases(ctx: typer.Context, kind: Annotated[str | None, typer.Option(help="only this kind")] = None) -> None:
    """Published releases with their counters."""
    rows = _run(lambda: _client(ctx).list(kind))
    t = Table("kind", "counter", "version", "path", "profiles", "published", "notes")
    for r in rows:
        t.add_row(
            r["kind"],
            str(r["counter"]),
            r["version"],
            r["path"],
            ",".join(r["profiles"]),
            r["published_at"],
            r["notes"],
        )
    out.print(t if rows else "no releases published yet")


@app.command()
def trust(ctx: typer.Context) -> None:
    """Version and expiry of each TUF role on the server."""
    doc = _run(lambda: _client(ctx).trust())
    if not doc["initialised"]:
        out.print("the TUF repository is not set up yet (fleetctl release init-server)")
        return
    t = Table("role", "version", "expires", "in", "signed by")
    for r in doc["roles"]:
        t.add_row(r["role"], str(r["version"]), r["expires"], f"{r['expires_in_s'] / 3600:.1f} h", r["signed_by"])
    out.print(t)


def _print_published(doc: dict[str, Any]) -> None:
    for t in doc["targets"]:
        if t["kind"]:
            out.print(f"published {t['kind']} release {t['path']} (counter {t['counter']})")
    out.print(f"[dim]metadata: {', '.join(f'{r} v{v}' for r, v in sorted(doc['versions'].items()))}[/]")
