"""The server's TUF repository on disk: what it serves under /tuf, what it accepts as a publish,
and the online re-signing of snapshot and timestamp.

Layout under FLEET_TUF_DIR (consistent snapshots):
  metadata/N.root.json, N.targets.json, N.face-model.json, N.snapshot.json, timestamp.json
  targets/<folder>/<sha256>.<file name>   hard links to blobs/<sha256>
  blobs/<sha256>                          uploaded target files, checked against their hash

The committed state is what timestamp.json reaches (timestamp -> snapshot -> targets roles): it is
written last, so a crash mid-publish leaves unreferenced files and the previous state intact.
The server holds only the online key (snapshot + timestamp); root, release and face-model keys stay
with the keystore holder, so the server can re-sign freshness but never sign a release.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key

# imported from the defining modules: the packages re-export these without names mypy accepts
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata

from fleet_server.releases.errors import (
    MissingTargetFile,
    OnlineKeyUnusable,
    PublishRefused,
    ReleaseError,
    RepositoryNotReady,
    SignatureRefused,
    VersionConflict,
)
from fleet_server.releases.tufmeta import from_doc, fsync_dir, now_utc, to_bytes, write_atomic
from fleet_wire.release import (
    KINDS,
    TARGET_PREFIX,
    WHEELS_PREFIX,
    ReleaseContractError,
    ReleaseInfo,
    is_target_path,
    release_info,
)

log = logging.getLogger(__name__)

METADATA_NAME = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?[a-z][a-z0-9-]{0,63}\.json$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
BLOB_CHUNK = 1 << 20


@dataclass(frozen=True)
class NewTarget:
    """A target a publish adds: its role, signed file info and (unless a wheel) its release description."""

    role: str
    path: str
    sha256: str
    length: int
    info: ReleaseInfo | None


@dataclass
class PublishResult:
    targets: list[NewTarget] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # role -> new version written


class BlobWriter:
    """Receives one uploaded target file, hashing as it goes; `finish` keeps it only if the hash matches."""

    def __init__(self, blobs_dir: Path, sha256: str, max_bytes: int) -> None:
        if not SHA256.fullmatch(sha256):
            raise ReleaseError(f"{sha256!r} is not a sha256 hex digest")
        self.blobs_dir = blobs_dir
        self.sha256 = sha256
        self.max_bytes = max_bytes
        blobs_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs_dir, prefix=".upload-")
        self._tmp = Path(tmp)
        self._f = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.length = 0

    def write(self, chunk: bytes) -> None:
        self.length += len(chunk)
        if self.length > self.max_bytes:
            self.abort()
            raise ReleaseError(f"target file larger than the server accepts ({self.max_bytes} bytes)")
        self._hash.update(chunk)
        self._f.write(chunk)

    def finish(self) -> int:
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            self.abort()
            raise PublishRefused(f"uploaded file has sha256 {digest}, not {self.sha256}; upload it again")
        if self.length == 0:
            self.abort()
            raise PublishRefused("uploaded file is empty")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.blobs_dir / self.sha256)
        fsync_dir(self.blobs_dir)
        return self.length

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


class TufRepository:
    """One TUF repository on disk; every change goes through one lock."""

    def __init__(
        self,
        root_dir: Path,
        online_key: Path,
        *,
        timestamp_expiry: timedelta = timedelta(days=1),
        snapshot_expiry: timedelta = timedelta(days=7),
        max_target_bytes: int = 2 << 30,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.root_dir = root_dir
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.blobs_dir = root_dir / "blobs"
        self.online_key = online_key
        self.timestamp_expiry = timestamp_expiry
        self.snapshot_expiry = snapshot_expiry
        self.max_target_bytes = max_target_bytes
        self.clock = clock
        self.lock = threading.RLock()
        for d in (self.metadata_dir, self.targets_dir, self.blobs_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- the committed state -----------------------------------------------------------------------

    def initialised(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    def _need_initialised(self) -> None:
        if not self.initialised():
            raise RepositoryNotReady(
                "the TUF repository is not initialised yet: run `fleetctl release init-server --keystore DIR`"
            )

    def _read(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes((self.metadata_dir / name).read_bytes())

    def root(self) -> Metadata[Root]:
        self._need_initialised()
        version = 1
        while (self.metadata_dir / f"{version + 1}.root.json").is_file():
            version += 1
        return self._read(f"{version}.root.json")

    def timestamp(self) -> Metadata[Timestamp]:
        self._need_initialised()
        return self._read("timestamp.json")

    def snapshot(self) -> Metadata[Snapshot]:
        return self._read(f"{self.timestamp().signed.snapshot_meta.version}.snapshot.json")

    def role_versions(self) -> dict[str, int]:
        """Targets role -> committed version (targets and every delegated role)."""
        return {name.removesuffix(".json"): meta.version for name, meta in self.snapshot().signed.meta.items()}

    def targets_role(self, role: str, versions: dict[str, int] | None = None) -> Metadata[Targets]:
        v = (versions or self.role_versions()).get(role)
        if v is None:
            raise ReleaseError(f"the repository has no {role!r} role")
        return self._read(f"{v}.{role}.json")

    def all_targets(self) -> dict[str, tuple[str, TargetFile]]:
        """Target path -> (role, target file) over the committed targets roles."""
        out: dict[str, tuple[str, TargetFile]] = {}
        versions = self.role_versions()
        for role in versions:
            for path, tf in self.targets_role(role, versions).signed.targets.items():
                out[path] = (role, tf)
        return out

    def counters(self) -> dict[str, int]:
        """The highest release counter signed so far, per kind (0 when none)."""
        top: dict[str, int] = dict.fromkeys(KINDS, 0)
        if not self.initialised():
            return top
        for path, (_, tf) in self.all_targets().items():
            info = _info_or_none(path, tf)
            if info is not None:
                top[info.kind] = max(top[info.kind], info.counter)
        return top

    def expiries(self) -> dict[str, datetime]:
        """Role -> when its committed metadata expires."""
        if not self.initialised():
            return {}
        out = {"root": self.root().signed.expires, "timestamp": self.timestamp().signed.expires}
        out["snapshot"] = self.snapshot().signed.expires
        versions = self.role_versions()
        for role in versions:
            out[role] = self.targets_role(role, versions).signed.expires
        return out

    # -- serving ---------------------------------------------------------------------------------------

    def metadata_file(self, name: str) -> Path | None:
        if not METADATA_NAME.fullmatch(name):
            return None
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_file(self, hashed_path: str) -> Path | None:
        """The file for `<folder>/<sha256>.<name>` (consistent snapshot naming), if published."""
        folder, _, name = hashed_path.rpartition("/")
        digest, dot, plain = name.partition(".")
        if not dot or not SHA256.fullmatch(digest) or not is_target_path(f"{folder}/{plain}" if folder else plain):
            return None
        path = self.targets_dir / hashed_path
        return path if path.is_file() else None

    # -- uploads ---------------------------------------------------------------------------------------

    def has_blob(self, sha256: str) -> bool:
        return bool(SHA256.fullmatch(sha256)) and (self.blobs_dir / sha256).is_file()

    def blob_writer(self, sha256: str) -> BlobWriter:
        return BlobWriter(self.blobs_dir, sha256, self.max_target_bytes)

    # -- changes ---------------------------------------------------------------------------------------

    def init(self, root_doc: Any, targets_doc: Any, delegated_docs: dict[str, Any]) -> PublishResult:
        """Set up the repository from the keystore's first root and targets metadata."""
        with self.lock:
            if self.initialised():
                raise RepositoryNotReady("the TUF repository is already initialised; publish new versions instead")
            root_md = _parse(root_doc, "root", "root")
            if root_md.signed.version != 1:
                raise VersionConflict(f"a new repository starts at root version 1, not {root_md.signed.version}")
            result = root_md.signed.get_root_verification_result(None, root_md.signed_bytes, root_md.signatures)
            if not result.verified:
                raise SignatureRefused("root version 1 is not signed by the threshold of its own root keys")
            if not root_md.signed.consistent_snapshot:
                raise PublishRefused("root must enable consistent snapshots")
            signer = self._online_signer(root_md.signed)
            now = self.clock()
            checked = self._check_roles(root_md.signed, {}, targets_doc, delegated_docs, now, first=True)
            write_atomic(self.metadata_dir / "1.root.json", to_bytes(root_md))
            return self._commit(signer, checked, {}, now)

    def publish(
        self, targets_doc: Any | None, delegated_docs: dict[str, Any], root_doc: Any | None = None
    ) -> PublishResult:
        """Verify and commit new signed metadata (a new root, targets and/or delegated roles)."""
        with self.lock:
            self._need_initialised()
            if targets_doc is None and not delegated_docs and root_doc is None:
                raise ReleaseError("nothing to publish: no metadata in the request")
            now = self.clock()
            root_md = self.root()
            new_root: Metadata[Root] | None = None
            if root_doc is not None:
                new_root = self._check_root(root_doc, root_md)
            root = (new_root or root_md).signed
            signer = self._online_signer(root)
            current = self.role_versions()
            checked = self._check_roles(root, current, targets_doc, delegated_docs, now, first=False)
            if new_root is not None:
                write_atomic(self.metadata_dir / f"{new_root.signed.version}.root.json", to_bytes(new_root))
            result = self._commit(signer, checked, current, now)
            if new_root is not None:
                result.versions["root"] = new_root.signed.version
            return result

    def resign_due(self, now: datetime | None = None) -> list[str]:
        """Re-sign snapshot and/or timestamp when less than half their life is left; returns what was re-signed."""
        with self.lock:
            if not self.initialised():
                return []
            now = now or self.clock()
            snap = self.snapshot().signed
            ts = self.timestamp().signed
            if snap.expires - now < self.snapshot_expiry / 2:
                self.resign_snapshot(now)
                return ["snapshot", "timestamp"]
            if ts.expires - now < self.timestamp_expiry / 2:
                self.resign_timestamp(now)
                return ["timestamp"]
            return []

    def resign_timestamp(self, now: datetime) -> int:
        """A new timestamp version over the current snapshot, expiring its life after `now`."""
        with self.lock:
            signer = self._online_signer(self.root().signed)
            return self._write_timestamp(signer, self.timestamp().signed.snapshot_meta.version, now)

    def resign_snapshot(self, now: datetime) -> int:
        """A new snapshot version (same roles) and timestamp, expiring their lives after `now`."""
        with self.lock:
            signer = self._online_signer(self.root().signed)
            return self._write_snapshot(signer, self.role_versions(), now)

    # -- checks ----------------------------------------------------------------------------------------

    def _check_root(self, root_doc: Any, current: Metadata[Root]) -> Metadata[Root]:
        new = _parse(root_doc, "root", "root")
        want = current.signed.version + 1
        if new.signed.version != want:
            raise VersionConflict(f"root version {new.signed.version} offered; the next one is {want}")
        result = new.signed.get_root_verification_result(current.signed, new.signed_bytes, new.signatures)
        if not result.verified:
            old_ok = "meets" if result.first else "does not meet"
            new_ok = "meets" if result.second else "does not meet"
            raise SignatureRefused(
                f"root version {want} must be signed by the old and the new root keys' thresholds:"
                f" it {old_ok} version {current.signed.version}'s and {new_ok} its own"
            )
        if not new.signed.consistent_snapshot:
            raise PublishRefused("root must keep consistent snapshots on")
        return new

    def _check_roles(
        self,
        root: Root,
        current: dict[str, int],
        targets_doc: Any | None,
        delegated_docs: dict[str, Any],
        now: datetime,
        *,
        first: bool,
    ) -> list[tuple[str, Metadata[Targets], list[NewTarget]]]:
        """Every role's new metadata checked; returns (role, metadata, new targets) to write."""
        if not isinstance(delegated_docs, dict):
            raise PublishRefused("delegated: expected an object of role name -> metadata")
        if first and targets_doc is None:
            raise PublishRefused("initial set-up needs the targets metadata")
        checked: list[tuple[str, Metadata[Targets], list[NewTarget]]] = []
        known: dict[str, tuple[str, TargetFile]] = {} if first else self.all_targets()
        cur_top = None if first else self.targets_role("targets", current)
        if targets_doc is not None:
            new_top = _parse(targets_doc, "targets", "targets")
            checked.append(("targets", new_top, self._check_targets("targets", new_top, root, cur_top, now, known)))
            top = new_top
        else:
            assert cur_top is not None
            top = cur_top
            _verify_signed("targets", top, root, "the current targets metadata")
        delegations = top.signed.delegations
        roles = dict(delegations.roles or {}) if delegations else {}
        for name in delegated_docs:
            if name not in roles:
                raise PublishRefused(f"delegated: targets delegates no role {name!r}")
        for name in roles:
            cur = None if first or name not in current else self.targets_role(name, current)
            if name in delegated_docs:
                md = _parse(delegated_docs[name], name, f"delegated.{name}")
                checked.append((name, md, self._check_targets(name, md, top.signed, cur, now, known)))
            elif cur is not None:
                _verify_signed(name, cur, top.signed, f"the current {name} metadata")
            else:
                raise PublishRefused(f"targets delegates {name!r} but no {name} metadata was sent")
        self._check_releases(checked, known)
        return checked

    def _check_targets(
        self,
        role: str,
        md: Metadata[Targets],
        delegator: Root | Targets,
        current: Metadata[Targets] | None,
        now: datetime,
        known: dict[str, tuple[str, TargetFile]],
    ) -> list[NewTarget]:
        want = current.signed.version + 1 if current else 1
        if md.signed.version != want:
            raise VersionConflict(f"{role} version {md.signed.version} offered; the next one is {want}")
        _verify_signed(role, md, delegator, f"{role} version {want}")
        if md.signed.expires <= now:
            raise PublishRefused(f"{role} version {want} expired at {md.signed.expires:%Y-%m-%d %H:%M}Z already")
        old = current.signed.targets if current else {}
        for path, tf in old.items():
            if md.signed.targets.get(path) != tf:
                raise PublishRefused(
                    f"{role} version {want} changes or drops the published target {path};"
                    " a published target stays as it was signed (publish a new one instead)"
                )
        delegated = None
        if isinstance(delegator, Targets) and delegator.delegations and delegator.delegations.roles:
            delegated = delegator.delegations.roles.get(role)
        new: list[NewTarget] = []
        for path, tf in md.signed.targets.items():
            if path in old:
                continue
            where = f"{role} target {path}"
            if not is_target_path(path):
                raise PublishRefused(f"{where}: not a release target path (agent/, config/, models/, wheels/)")
            if delegated is not None and not delegated.is_delegated_path(path):
                raise PublishRefused(f"{where}: outside the paths delegated to {role}")
            if delegated is None and path.startswith(TARGET_PREFIX["face_model"]):
                raise PublishRefused(f"{where}: face models are signed by the delegated face-model role")
            if path in known and known[path][0] != role:
                raise PublishRefused(f"{where}: already published by the {known[path][0]} role")
            sha = tf.hashes.get("sha256")
            if not sha or not SHA256.fullmatch(sha):
                raise PublishRefused(f"{where}: signed without a sha256 hash")
            blob = self.blobs_dir / sha
            if not blob.is_file():
                raise MissingTargetFile(f"{where}: its file (sha256 {sha[:12]}…) was never uploaded")
            if blob.stat().st_size != tf.length or _sha256_file(blob) != sha:
                raise MissingTargetFile(f"{where}: the uploaded file does not match its signed hash and length")
            info = None
            if not path.startswith(WHEELS_PREFIX):
                try:
                    info = release_info(tf.custom)
                except ReleaseContractError as err:
                    # a face-model release's other files carry no description (checked to be named below)
                    if not (path.startswith(TARGET_PREFIX["face_model"]) and not tf.custom):
                        raise PublishRefused(f"{where}: {err}") from err
                if info is not None and not path.startswith(TARGET_PREFIX[info.kind]):
                    raise PublishRefused(f"{where}: a {info.kind} release belongs under {TARGET_PREFIX[info.kind]}")
            new.append(NewTarget(role, path, sha, tf.length, info))
        return new

    def _check_releases(
        self, checked: list[tuple[str, Metadata[Targets], list[NewTarget]]], known: dict[str, tuple[str, TargetFile]]
    ) -> None:
        top: dict[str, int] = dict.fromkeys(KINDS, 0)
        for path, (_, tf) in known.items():
            info = _info_or_none(path, tf)
            if info is not None:
                top[info.kind] = max(top[info.kind], info.counter)
        every: dict[str, TargetFile] = {p: tf for p, (_, tf) in known.items()}
        per_role: dict[str, dict[str, TargetFile]] = {}
        for role, md, _ in checked:
            every.update(md.signed.targets)
            per_role[role] = md.signed.targets
        seen: dict[tuple[str, int], str] = {}
        for role, _, new in checked:
            for t in new:
                if t.info is None:
                    continue
                key = (t.info.kind, t.info.counter)
                if t.info.counter <= top[t.info.kind]:
                    raise VersionConflict(
                        f"{t.path}: release counter {t.info.counter} is not above {top[t.info.kind]}, the highest"
                        f" {t.info.kind} counter signed so far; sign it again with a higher counter"
                    )
                if key in seen:
                    raise VersionConflict(f"{t.path}: release counter {t.info.counter} is also used by {seen[key]}")
                seen[key] = t.path
                for w in t.info.wheels:
                    pinned = every.get(w.path)
                    if pinned is None or pinned.length != w.length or pinned.hashes.get("sha256") != w.sha256:
                        raise PublishRefused(
                            f"{t.path}: pinned wheel {w.path} is not a target with that hash and length"
                        )
                for f in t.info.files:
                    if f not in per_role.get(role, {}):
                        raise PublishRefused(f"{t.path}: model file {f} is not a target of the {role} role")
        named = {f for _, _, new in checked for t in new if t.info is not None for f in t.info.files}
        for _, _, new in checked:
            for t in new:
                if t.info is None and t.path.startswith(TARGET_PREFIX["face_model"]) and t.path not in named:
                    raise PublishRefused(f"{t.path}: a model file that no face-model release in this publish names")

    def _online_signer(self, root: Root) -> CryptoSigner:
        try:
            pem = self.online_key.read_bytes()
        except OSError as err:
            raise OnlineKeyUnusable(
                f"FLEET_TUF_ONLINE_KEY={self.online_key}: cannot read the online key ({err.strerror});"
                " copy online-key.pem from the keystore there (mode 0600)"
            ) from err
        try:
            signer = CryptoSigner(load_pem_private_key(pem, None))
        except (ValueError, TypeError) as err:
            raise OnlineKeyUnusable(f"FLEET_TUF_ONLINE_KEY={self.online_key}: not a PEM private key") from err
        keyid = signer.public_key.keyid
        for role in ("snapshot", "timestamp"):
            if keyid not in root.roles[role].keyids:
                raise OnlineKeyUnusable(
                    f"FLEET_TUF_ONLINE_KEY={self.online_key}: root version {root.version} does not trust"
                    f" this key for {role}; copy the keystore's online-key.pem"
                )
        return signer

    # -- writing ----------------------------------------------------------------------------------------

    def _commit(
        self,
        signer: CryptoSigner,
        checked: list[tuple[str, Metadata[Targets], list[NewTarget]]],
        current: dict[str, int],
        now: datetime,
    ) -> PublishResult:
        result = PublishResult()
        versions = dict(current)
        for role, md, new in checked:
            for t in new:
                self._place(t.path, t.sha256)
            write_atomic(self.metadata_dir / f"{md.signed.version}.{role}.json", to_bytes(md))
            versions[role] = md.signed.version
            result.versions[role] = md.signed.version
            result.targets.extend(new)
        self._write_snapshot(signer, versions, now)
        return result

    def _place(self, path: str, sha256: str) -> None:
        folder, _, name = path.rpartition("/")
        dest = self.targets_dir / folder / f"{sha256}.{name}"
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(self.blobs_dir / sha256, dest)
        fsync_dir(dest.parent)

    def _write_snapshot(self, signer: CryptoSigner, versions: dict[str, int], now: datetime) -> int:
        prev = self.snapshot().signed.version if self.initialised() else 0
        snap = Snapshot(
            version=prev + 1,
            expires=now + self.snapshot_expiry,
            meta={f"{role}.json": MetaFile(version=v) for role, v in sorted(versions.items())},
        )
        md = Metadata(snap)
        md.sign(signer)
        write_atomic(self.metadata_dir / f"{snap.version}.snapshot.json", to_bytes(md))
        self._write_timestamp(signer, snap.version, now)
        return snap.version

    def _write_timestamp(self, signer: CryptoSigner, snapshot_version: int, now: datetime) -> int:
        prev = self.timestamp().signed.version if self.initialised() else 0
        ts = Timestamp(
            version=prev + 1, expires=now + self.timestamp_expiry, snapshot_meta=MetaFile(version=snapshot_version)
        )
        md = Metadata(ts)
        md.sign(signer)
        # the commit point of every change: clients reach new metadata only through this file
        write_atomic(self.metadata_dir / "timestamp.json", to_bytes(md))
        return ts.version


def _parse(doc: Any, role: str, where: str) -> Metadata[Any]:
    try:
        return from_doc(doc, role, where)
    except ValueError as err:
        raise PublishRefused(str(err)) from err


def _verify_signed(role: str, md: Metadata[Any], delegator: Root | Targets, what: str) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as err:
        raise SignatureRefused(
            f"{what} is not signed by enough of the keys trusted for {role} ({err}); sign it with the keystore"
        ) from err
    except ValueError as err:
        raise SignatureRefused(f"{what}: {err}") from err


def _info_or_none(path: str, tf: TargetFile) -> ReleaseInfo | None:
    if path.startswith(WHEELS_PREFIX):
        return None
    try:
        return release_info(tf.custom)
    except ReleaseContractError:
        return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOB_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
