"""Signing a release: the next targets (or face-model) version with the bundle's targets, its
release counter, and for an agent release the rollback twin of the release it replaces."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# imported from the defining module: tuf.api.metadata re-exports it without a name mypy accepts
from tuf.api._payload import Root, TargetFile, Targets
from tuf.api.metadata import Metadata

from fleet_server.releases.bundle import SIGNED_FILE, BundleError, read_bundle
from fleet_server.releases.keystore import Keystore
from fleet_server.releases.tufmeta import FACE_ROLE, in_days
from fleet_wire.release import (
    TARGET_PREFIX,
    WHEELS_PREFIX,
    PinnedWheel,
    ReleaseContractError,
    ReleaseInfo,
    release_info,
)


@dataclass
class CurrentState:
    """What the server publishes now (checked against the keystore's own keys) and its counters."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    delegated: dict[str, Metadata[Targets]]
    counters: dict[str, int]


@dataclass
class SignedRelease:
    """The metadata to publish and which local files back the new targets."""

    targets: Metadata[Targets] | None = None
    delegated: dict[str, Metadata[Targets]] = field(default_factory=dict)
    new_targets: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # sha256 -> bundle file name

    def to_doc(self) -> dict[str, Any]:
        return {
            "targets": self.targets.to_dict() if self.targets else None,
            "delegated": {r: md.to_dict() for r, md in self.delegated.items()},
            "new_targets": self.new_targets,
            "files": self.files,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> SignedRelease:
        return cls(
            targets=Metadata.from_dict(doc["targets"]) if doc.get("targets") else None,
            delegated={r: Metadata.from_dict(d) for r, d in doc.get("delegated", {}).items()},
            new_targets=list(doc.get("new_targets", [])),
            files=dict(doc.get("files", {})),
        )


def releases_in(md: Metadata[Targets]) -> dict[str, ReleaseInfo]:
    """Target path -> release description for every release target of one role."""
    out = {}
    for path, tf in md.signed.targets.items():
        if path.startswith(WHEELS_PREFIX):
            continue
        try:
            out[path] = release_info(tf.custom)
        except ReleaseContractError:
            continue
    return out


def sign_bundle(bundle: Path, keystore: Keystore, state: CurrentState) -> SignedRelease:
    """Sign the bundle's release under the next counter; writes BUNDLE/signed.json."""
    bundle = Path(bundle)
    doc = read_bundle(bundle)
    kind = doc["kind"]
    counter = state.counters.get(kind, 0) + 1
    files_dir = bundle / "files"
    role = FACE_ROLE if kind == "face_model" else "targets"
    md = _next_version(state.delegated[role] if role != "targets" else state.targets, keystore)
    out = SignedRelease(files={f["sha256"]: name for name, f in doc["files"].items()})
    prefix = f"{TARGET_PREFIX[kind]}{counter}/"
    common = {"kind": kind, "version": doc["version"], "counter": counter, "profiles": tuple(doc["profiles"])}
    if doc.get("notes"):
        common["notes"] = doc["notes"]
    if kind == "agent":
        pinned = []
        for name in doc.get("wheels", []):
            path = f"{WHEELS_PREFIX}{name}"
            tf = TargetFile.from_file(path, str(files_dir / name), ["sha256"])
            have = md.signed.targets.get(path)
            if have is not None and have.hashes != tf.hashes:
                raise BundleError(f"{path} is already signed with another sha256; a wheel file name is never reused")
            if have is None:
                md.signed.targets[path] = tf
                out.new_targets.append(path)
            pinned.append(PinnedWheel(path=path, sha256=tf.hashes["sha256"], length=tf.length))
        info = ReleaseInfo.model_validate({**common, "wheels": tuple(pinned)})
        release_path = prefix + doc["release"]
        _add(md, release_path, files_dir / doc["release"], info, out)
        _add_twin(md, state, release_path, info, out)
    elif kind == "config":
        info = ReleaseInfo.model_validate({**common, "settings": doc["settings"]})
        _add(md, prefix + doc["release"], files_dir / doc["release"], info, out)
    elif kind == "face_model":
        paths = tuple(prefix + name for name in doc["model_files"])
        info = ReleaseInfo.model_validate({**common, "threshold_milli": doc["threshold_milli"], "files": paths})
        for name in doc["model_files"]:
            path = prefix + name
            if name == doc["release"]:
                _add(md, path, files_dir / name, info, out)
            else:
                md.signed.targets[path] = TargetFile.from_file(path, str(files_dir / name), ["sha256"])
                out.new_targets.append(path)
    else:
        raise BundleError(f"{bundle}: unknown release kind {kind!r}")
    keystore.sign_targets(md, role)
    if role == "targets":
        out.targets = md
    else:
        out.delegated[role] = md
    (bundle / SIGNED_FILE).write_text(json.dumps(out.to_doc(), indent=1) + "\n", "utf-8")
    return out


def sign_republish(target_path: str, keystore: Keystore, state: CurrentState, notes: str = "") -> SignedRelease:
    """Sign an earlier release again under the next counter (a manual roll back to it)."""
    role, md_now = _role_of(target_path, state)
    tf_old = md_now.signed.targets[target_path]
    try:
        old = release_info(tf_old.custom)
    except ReleaseContractError as err:
        raise BundleError(f"{target_path} is not a release ({err})") from err
    counter = state.counters.get(old.kind, 0) + 1
    prefix = f"{TARGET_PREFIX[old.kind]}{counter}/"
    md = _next_version(md_now, keystore)
    out = SignedRelease()
    files = tuple(prefix + f.rpartition("/")[2] for f in old.files)
    for f in old.files:
        if f != target_path:
            src = md_now.signed.targets[f]
            md.signed.targets[prefix + f.rpartition("/")[2]] = _copy(src, prefix + f.rpartition("/")[2])
            out.new_targets.append(prefix + f.rpartition("/")[2])
    text = notes or f"republished {old.kind} {old.version} (counter {old.counter}, {target_path})"
    info = old.model_copy(update={"counter": counter, "files": files, "notes": text[:2000]})
    new_path = prefix + target_path.rpartition("/")[2]
    tf = _copy(tf_old, new_path)
    tf.unrecognized_fields["custom"] = info.custom()
    md.signed.targets[new_path] = tf
    out.new_targets.append(new_path)
    keystore.sign_targets(md, role)
    if role == "targets":
        out.targets = md
    else:
        out.delegated[role] = md
    return out


def resign_targets(keystore: Keystore, state: CurrentState, role: str = "targets") -> Metadata[Targets]:
    """The same targets (or delegated role), next version and a fresh expiry, signed with the
    keystore's current keys for that role."""
    current = state.targets if role == "targets" else state.delegated.get(role)
    if current is None:
        raise BundleError(f"the server has no {role!r} role")
    md = _next_version(current, keystore)
    keystore.sign_targets(md, role)
    return md


def _role_of(target_path: str, state: CurrentState) -> tuple[str, Metadata[Targets]]:
    if target_path in state.targets.signed.targets:
        return "targets", state.targets
    for role, md in state.delegated.items():
        if target_path in md.signed.targets:
            return role, md
    raise BundleError(f"{target_path} is not a published target")


def _next_version(md: Metadata[Targets], keystore: Keystore) -> Metadata[Targets]:
    new: Metadata[Targets] = Metadata.from_bytes(md.to_bytes())
    new.signed.version += 1
    new.signed.expires = in_days(keystore.targets_days)
    return new


def _add(md: Metadata[Targets], path: str, local: Path, info: ReleaseInfo, out: SignedRelease) -> None:
    if path in md.signed.targets:
        raise BundleError(f"{path} is already signed")
    tf = TargetFile.from_file(path, str(local), ["sha256"])
    tf.unrecognized_fields["custom"] = info.custom()
    md.signed.targets[path] = tf
    out.new_targets.append(path)


def _add_twin(
    md: Metadata[Targets], state: CurrentState, release_path: str, info: ReleaseInfo, out: SignedRelease
) -> None:
    """Sign, with agent release N, the release it replaces again under N+1: the rollout engine can
    then roll terminals back without an online release key (the next release gets N+2)."""
    earlier = {p: i for p, i in releases_in(state.targets).items() if i.kind == "agent"}
    if not earlier:
        return
    # the release it replaces is the newest one that is not itself a twin (else every twin would
    # restore the first release ever published: 1.0 -> 1.1 (+twin 1.0) -> 1.2 would roll back to 1.0)
    twins = _twins(state.targets, earlier)
    candidates = {p: i for p, i in earlier.items() if p not in twins} or earlier
    prev_path, prev = max(candidates.items(), key=lambda kv: kv[1].counter)
    twin_counter = info.counter + 1
    twin_path = f"{TARGET_PREFIX['agent']}{twin_counter}/{prev_path.rpartition('/')[2]}"
    notes = (
        f"rollback of agent {info.version} (counter {info.counter}, {release_path})"
        f" to {prev.version} (counter {prev.counter}, {prev_path})"
    )
    twin_info = prev.model_copy(update={"counter": twin_counter, "notes": notes})
    tf = _copy(state.targets.signed.targets[prev_path], twin_path)
    tf.unrecognized_fields["custom"] = twin_info.custom()
    md.signed.targets[twin_path] = tf
    out.new_targets.append(twin_path)


def _twins(md: Metadata[Targets], releases: dict[str, ReleaseInfo]) -> set[str]:
    """The automatic rollback twins among `releases`: a copy of an earlier target signed one counter
    above a release that was new (a republish follows a twin, so it is not one)."""
    sha = {p: md.signed.targets[p].hashes.get("sha256") for p in releases}
    by_counter = {i.counter: p for p, i in releases.items()}

    def copy(p: str) -> bool:
        return any(sha[q] == sha[p] and releases[q].counter < releases[p].counter for q in releases)

    out = set()
    for p, i in releases.items():
        partner = by_counter.get(i.counter - 1)
        if partner is not None and copy(p) and not copy(partner):
            out.add(p)
    return out


def _copy(tf: TargetFile, path: str) -> TargetFile:
    return TargetFile(tf.length, dict(tf.hashes), path)
