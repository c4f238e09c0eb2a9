"""A release bundle: what `fleetctl release build` writes and `sign` / `publish` read.

BUNDLE/bundle.json     kind, version, profiles, notes, the files with sha256 + length, and per
                       kind: the agent wheel + its dependency wheels, the settings, the model
BUNDLE/files/<name>    the files themselves
BUNDLE/signed.json     after `sign`: the signed metadata to publish and the new target paths
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from fleet_server.releases.errors import ReleaseError
from fleet_wire.release import PROFILE_ID_PATTERN, VERSION_PATTERN, ReleaseKind

BUNDLE_FILE = "bundle.json"
SIGNED_FILE = "signed.json"
AGENT_WHEEL = re.compile(r"^kiosk_fleet_agent-([0-9A-Za-z.+_]+)-py3-none-any\.whl$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
LOCK_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class BundleError(ReleaseError):
    """A bundle cannot be built or read as asked: the message says what and where."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bundle(bundle: Path) -> dict[str, Any]:
    path = Path(bundle) / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{bundle}: not a release bundle (no {BUNDLE_FILE}); make one with `fleetctl release build`")
    doc: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return doc


def build_agent(dist: Path, out: Path, *, profiles: list[str], notes: str = "") -> dict[str, Any]:
    """Bundle the agent wheel from `./run.sh dist` output with the dependency wheels its lock pins."""
    dist = Path(dist)
    wheels = sorted(p for p in dist.glob("kiosk_fleet_agent-*.whl") if AGENT_WHEEL.match(p.name))
    if len(wheels) != 1:
        raise BundleError(
            f"{dist}: expected one kiosk_fleet_agent-*.whl, found {len(wheels)} (build with ./run.sh dist)"
        )
    wheel = wheels[0]
    m = AGENT_WHEEL.match(wheel.name)
    assert m is not None
    version = m.group(1)
    lock = dist / f"kiosk_fleet_agent-{version}.lock"
    if not lock.is_file():
        raise BundleError(f"{lock}: the agent's hash-pinned lock is missing (build with ./run.sh dist)")
    pinned = set(LOCK_HASH.findall(lock.read_text("utf-8")))
    house = dist / "agent-wheels"
    deps: list[Path] = []
    for p in sorted(house.glob("*.whl")) if house.is_dir() else []:
        if p.name == wheel.name:
            continue
        digest = sha256_file(p)
        if digest in pinned:
            deps.append(p)
            pinned.discard(digest)
    if pinned:
        raise BundleError(f"{lock}: {len(pinned)} pinned wheel(s) are not in {house}; build the dist again")
    return _write(
        out,
        "agent",
        version,
        profiles,
        notes,
        [wheel, *deps],
        release=wheel.name,
        extra={"wheels": [p.name for p in deps]},
    )


def build_config(
    settings_file: Path, out: Path, *, version: str, profiles: list[str], notes: str = ""
) -> dict[str, Any]:
    """Bundle agent settings (a YAML mapping) as a config release."""
    try:
        doc = yaml.safe_load(Path(settings_file).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise BundleError(f"{settings_file}: cannot read the settings ({err})") from err
    if not isinstance(doc, dict) or not doc:
        raise BundleError(f"{settings_file}: expected a mapping of agent settings")
    settings = _no_floats(doc, str(settings_file))
    out = Path(out)
    (out / "files").mkdir(parents=True, exist_ok=True)
    name = f"settings-{version}.json"
    (out / "files" / name).write_text(json.dumps(settings, sort_keys=True, indent=2) + "\n", "utf-8")
    return _write(out, "config", version, profiles, notes, [], release=name, extra={"settings": settings})


def build_face_model(
    model_dir: Path, out: Path, *, version: str, threshold: float, profiles: list[str], notes: str = ""
) -> dict[str, Any]:
    """Bundle a face model's files with its decision threshold (signed as milli-units)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file()) if Path(model_dir).is_dir() else []
    if not files:
        raise BundleError(f"{model_dir}: no model files in this folder")
    if not 0 <= threshold <= 10:
        raise BundleError(f"--threshold {threshold}: expected a decision threshold between 0 and 10")
    milli = round(threshold * 1000)
    return _write(
        out,
        "face_model",
        version,
        profiles,
        notes,
        files,
        release=files[0].name,
        extra={"threshold_milli": milli, "model_files": [p.name for p in files]},
    )


def _write(
    out: Path,
    kind: ReleaseKind,
    version: str,
    profiles: list[str],
    notes: str,
    sources: list[Path],
    *,
    release: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    if not re.fullmatch(VERSION_PATTERN[1:-1], version):
        raise BundleError(f"version {version!r}: letters, digits and . + _ - only (up to 64)")
    for p in profiles:
        if p != "*" and not re.fullmatch(PROFILE_ID_PATTERN[1:-1], p):
            raise BundleError(f"profile {p!r} is not a device profile id (or '*')")
    out = Path(out)
    if (out / BUNDLE_FILE).exists():
        raise BundleError(f"{out}: a bundle is already there; build into a new folder")
    (out / "files").mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not FILE_NAME.fullmatch(src.name):
            raise BundleError(f"{src}: file name not allowed in a target path")
        shutil.copyfile(src, out / "files" / src.name)
    files = {}
    for f in sorted((out / "files").iterdir()):
        files[f.name] = {"sha256": sha256_file(f), "length": f.stat().st_size}
    doc = {
        "kind": kind,
        "version": version,
        "profiles": profiles or ["*"],
        "notes": notes,
        "release": release,
        "files": files,
        **extra,
    }
    (out / BUNDLE_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", "utf-8")
    return doc


def _no_floats(value: Any, where: str) -> Any:
    # canonical JSON (what TUF signs) has no floats: whole numbers become ints, others are refused
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise BundleError(
            f"{where}: {value} is not a whole number; signed settings carry no fractions (use milli-units)"
        )
    if isinstance(value, dict):
        return {str(k): _no_floats(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_no_floats(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise BundleError(f"{where}: {type(value).__name__} values cannot be signed")
