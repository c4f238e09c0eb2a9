"""Release helpers for tests and the demo: a keystore, the server's online key in place, and an
agent / config / face-model release published in one call. Thin wrappers over what
`fleetctl release` runs (fleet_server.releases.*): no second copy of any signing logic."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from fleet_server.config import ServerSettings
from fleet_server.releases import bundle as bundles
from fleet_server.releases.client import ReleaseClient
from fleet_server.releases.keystore import Keystore
from fleet_server.releases.signing import SignedRelease, sign_bundle
from fleet_wire.release import TARGET_PREFIX

_seq = itertools.count(1)


@dataclass(frozen=True)
class Published:
    """What one publish added: the release's target path, its counter, the rollback twin (if any)."""

    path: str
    counter: int
    twin: str | None
    targets: list[str]
    signed: SignedRelease


def make_keystore(folder: Path, **options: Any) -> Keystore:
    """A new keystore (root 1 of 2 keys, one release key, face-model 2 of 2 unless told otherwise)."""
    return Keystore.init(folder, **options)


def install_online_key(keystore: Keystore, settings: ServerSettings) -> Path:
    """Copy the keystore's online key where the server looks for it (what an operator does)."""
    _, dest = settings.tuf_paths()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(keystore.online_key_file, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)
    return dest


def client(url: str, token: str) -> ReleaseClient:
    return ReleaseClient(
        httpx.Client(base_url=url.rstrip("/"), timeout=60.0, headers={"Authorization": f"Bearer {token}"})
    )


def set_up_server(rc: ReleaseClient, keystore: Keystore) -> dict[str, Any]:
    """`fleetctl release init-server`: the repository from the keystore's first metadata."""
    return rc.init_server(keystore)


def write_agent_dist(folder: Path, version: str, deps: dict[str, bytes] | None = None, size: int = 4096) -> Path:
    """A dist folder shaped like `./run.sh dist` output, with stand-in (not installable) wheel
    files: for tests of the trust layer, which never opens a wheel. Installer tests use the real
    dist (tests/conftest.py `dist`)."""
    folder = Path(folder)
    house = folder / "agent-wheels"
    house.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"kiosk_fleet_agent-{version}-py3-none-any.whl"
    wheel.write_bytes((hashlib.sha256(version.encode()).digest() * (size // 32 + 1))[:size])
    lines = []
    for name, data in (deps if deps is not None else {"dep_a-1.0-py3-none-any.whl": b"dep a" * 100}).items():
        (house / name).write_bytes(data)
        lines.append(f"{name.split('-')[0]}==1.0 --hash=sha256:{hashlib.sha256(data).hexdigest()}")
    (folder / f"kiosk_fleet_agent-{version}.lock").write_text("\n".join(lines) + "\n", "utf-8")
    return folder


def publish_agent(
    rc: ReleaseClient, keystore: Keystore, dist: Path, work: Path, *, profiles: list[str] | None = None, notes: str = ""
) -> Published:
    """Build, sign and publish an agent release from a dist folder."""
    out = Path(work) / f"agent-bundle-{next(_seq)}"
    bundles.build_agent(dist, out, profiles=profiles or ["*"], notes=notes)
    return _sign_and_publish(rc, keystore, out)


def publish_config(
    rc: ReleaseClient,
    keystore: Keystore,
    settings: dict[str, Any],
    version: str,
    work: Path,
    *,
    profiles: list[str] | None = None,
) -> Published:
    """Build, sign and publish a config release carrying `settings`."""
    n = next(_seq)
    src = Path(work) / f"settings-{n}.yaml"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(yaml.safe_dump(settings), "utf-8")
    out = Path(work) / f"config-bundle-{n}"
    bundles.build_config(src, out, version=version, profiles=profiles or ["*"])
    return _sign_and_publish(rc, keystore, out)


def publish_face_model(
    rc: ReleaseClient,
    keystore: Keystore,
    model_dir: Path,
    threshold: float,
    version: str,
    work: Path,
    *,
    profiles: list[str] | None = None,
) -> Published:
    """Build, sign (both face-model keys) and publish a face-model release."""
    out = Path(work) / f"face-bundle-{next(_seq)}"
    bundles.build_face_model(model_dir, out, version=version, threshold=threshold, profiles=profiles or ["*"])
    return _sign_and_publish(rc, keystore, out)


def _sign_and_publish(rc: ReleaseClient, keystore: Keystore, bundle: Path) -> Published:
    signed = sign_bundle(bundle, keystore, rc.current(keystore))
    rc.publish_bundle(bundle)
    doc = bundles.read_bundle(bundle)
    prefix = TARGET_PREFIX[doc["kind"]]
    release = next(p for p in signed.new_targets if p.startswith(prefix) and p.endswith("/" + doc["release"]))
    counter = int(release.split("/")[1])
    twin = next((p for p in signed.new_targets if p.startswith(f"{prefix}{counter + 1}/")), None)
    return Published(release, counter, twin, signed.new_targets, signed)
