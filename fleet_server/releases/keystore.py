"""The offline keystore: root, release (targets) and face-model keys, and the root history.

It lives on the release manager's machine, never on the server. Layout:
  keystore.json          key index: key id -> role, PEM file, public key; which keys are retired
  keys/<role>-<n>.pem    private keys, mode 0600
  online-key.pem         the snapshot + timestamp key: copy it to the server (FLEET_TUF_ONLINE_KEY)
  metadata/N.root.json   every root version signed here; 1.targets.json, 1.face-model.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# imported from the defining modules: the packages re-export these without names mypy accepts
from securesystemslib.signer._crypto_signer import CryptoSigner
from securesystemslib.signer._key import SSlibKey
from securesystemslib.signer._signer import Signer
from tuf.api._payload import DelegatedRole, Delegations, Root, Targets
from tuf.api.metadata import Metadata

from fleet_server.releases.errors import ReleaseError
from fleet_server.releases.tufmeta import FACE_PATHS, FACE_ROLE, in_days, to_bytes, write_atomic

INDEX = "keystore.json"
ONLINE_KEY_FILE = "online-key.pem"
ROOT_DAYS = 365
TARGETS_DAYS = 90
ROLES = ("root", "targets", FACE_ROLE, "online")


class KeystoreError(ReleaseError):
    """The keystore is missing, incomplete or cannot do what was asked."""


@dataclass(frozen=True)
class KeyEntry:
    keyid: str
    role: str
    file: str
    public: dict[str, Any]
    retired: bool = False


class Keystore:
    """An offline keystore folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if not index.is_file():
            raise KeystoreError(
                f"{self.folder}: not a keystore (no {INDEX}); make one with `fleetctl release keys init`"
            )
        doc = json.loads(index.read_text("utf-8"))
        self.targets_days: int = int(doc.get("targets_days", TARGETS_DAYS))
        self.root_days: int = int(doc.get("root_days", ROOT_DAYS))
        self.keys: dict[str, KeyEntry] = {k: KeyEntry(keyid=k, **v) for k, v in doc["keys"].items()}

    # -- creating -----------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        folder: Path,
        *,
        root_keys: int = 2,
        root_threshold: int = 1,
        release_keys: int = 1,
        release_threshold: int = 1,
        face_keys: int = 2,
        face_threshold: int = 2,
        root_days: int = ROOT_DAYS,
        targets_days: int = TARGETS_DAYS,
    ) -> Keystore:
        """Make the keys, the first root and the first (empty) targets and face-model metadata."""
        folder = Path(folder)
        for count, threshold, what in (
            (root_keys, root_threshold, "root"),
            (release_keys, release_threshold, "release"),
            (face_keys, face_threshold, "face-model"),
        ):
            if not 1 <= threshold <= count:
                raise KeystoreError(f"{what} threshold {threshold} needs 1..{count} (the number of {what} keys)")
        if (folder / INDEX).exists():
            raise KeystoreError(f"{folder}: a keystore is already there; it is never overwritten")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        (folder / "keys").mkdir(mode=0o700, exist_ok=True)
        (folder / "metadata").mkdir(exist_ok=True)
        entries: dict[str, dict[str, Any]] = {}

        def new_key(role: str, n: int) -> CryptoSigner:
            signer = CryptoSigner.generate_ed25519()
            rel = ONLINE_KEY_FILE if role == "online" else f"keys/{role}-{n}.pem"
            _write_private(folder / rel, signer.private_bytes)
            entries[signer.public_key.keyid] = {"role": role, "file": rel, "public": signer.public_key.to_dict()}
            return signer

        roots = [new_key("root", i + 1) for i in range(root_keys)]
        releases = [new_key("targets", i + 1) for i in range(release_keys)]
        faces = [new_key(FACE_ROLE, i + 1) for i in range(face_keys)]
        online = new_key("online", 1)
        root = Root(expires=in_days(root_days), consistent_snapshot=True)
        for s in roots:
            root.add_key(s.public_key, "root")
        for s in releases:
            root.add_key(s.public_key, "targets")
        root.add_key(online.public_key, "snapshot")
        root.add_key(online.public_key, "timestamp")
        root.roles["root"].threshold = root_threshold
        root.roles["targets"].threshold = release_threshold
        root_md = Metadata(root)
        for s in roots:
            root_md.sign(s, append=True)
        targets = Targets(
            expires=in_days(targets_days),
            delegations=Delegations(
                keys={s.public_key.keyid: s.public_key for s in faces},
                roles={
                    FACE_ROLE: DelegatedRole(
                        FACE_ROLE, [s.public_key.keyid for s in faces], face_threshold, True, paths=list(FACE_PATHS)
                    )
                },
            ),
        )
        targets_md = Metadata(targets)
        for s in releases:
            targets_md.sign(s, append=True)
        face_md = Metadata(Targets(expires=in_days(targets_days)))
        for s in faces:
            face_md.sign(s, append=True)
        write_atomic(folder / "metadata" / "1.root.json", to_bytes(root_md))
        write_atomic(folder / "metadata" / "1.targets.json", to_bytes(targets_md))
        write_atomic(folder / "metadata" / f"1.{FACE_ROLE}.json", to_bytes(face_md))
        _write_index(folder, entries, root_days, targets_days)
        return cls(folder)

    # -- reading ------------------------------------------------------------------------------------

    @property
    def online_key_file(self) -> Path:
        return self.folder / ONLINE_KEY_FILE

    def root(self) -> Metadata[Root]:
        """The newest root signed here."""
        version = 1
        while (self.folder / "metadata" / f"{version + 1}.root.json").is_file():
            version += 1
        return Metadata.from_file(str(self.folder / "metadata" / f"{version}.root.json"))

    def initial(self, role: str) -> Metadata[Targets]:
        return Metadata.from_file(str(self.folder / "metadata" / f"1.{role}.json"))

    def signers(self, role: str) -> list[Signer]:
        """Signers for every key of `role` held here and not retired."""
        out = []
        for e in self.keys.values():
            if e.role == role and not e.retired:
                out.append(self._signer(e))
        return out

    def _signer(self, e: KeyEntry) -> Signer:
        path = (self.folder / e.file).resolve()
        if not path.is_file():
            raise KeystoreError(f"{path}: private key of {e.role} key {e.keyid[:12]}… is missing")
        return Signer.from_priv_key_uri(f"file2:{path}", SSlibKey.from_dict(e.keyid, dict(e.public)))

    # -- signing ------------------------------------------------------------------------------------

    def sign_targets(self, md: Metadata[Targets], role: str) -> None:
        """Replace `md`'s signatures with one from every key of `role` held here."""
        signers = self.signers(role)
        if not signers:
            raise KeystoreError(f"this keystore holds no {role} key")
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def verify(self, role: str, md: Metadata[Any], delegator: Root | Targets) -> None:
        """Check metadata the server sent is really ours before building on it."""
        from tuf.api.exceptions import UnsignedMetadataError

        try:
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as err:
            raise KeystoreError(
                f"the server's {role} metadata (version {md.signed.version}) is not signed by this keystore's"
                f" keys ({err}); do not sign on top of it"
            ) from err

    # -- root changes -------------------------------------------------------------------------------

    def change_root(self, change: Callable[[Root], list[str]]) -> Metadata[Root]:
        """A new root version: `change` edits it (returning key ids it retires); signed by the
        old root's keys and the new root's keys, so terminals trusting either version follow."""
        current = self.root()
        old_signers = [self._signer(self.keys[k]) for k in current.signed.roles["root"].keyids if k in self.keys]
        new = Metadata.from_bytes(current.to_bytes())
        new.signed.version += 1
        new.signed.expires = in_days(self.root_days)
        retired = change(new.signed)
        for role in ("root", "targets", "snapshot", "timestamp"):
            r = new.signed.roles[role]
            if len(r.keyids) < r.threshold:
                raise KeystoreError(f"{role} would keep {len(r.keyids)} key(s) for a threshold of {r.threshold}")
        new.signatures.clear()
        signed_by: set[str] = set()
        for s in old_signers + [self._signer(self.keys[k]) for k in new.signed.roles["root"].keyids]:
            if s.public_key.keyid not in signed_by:
                new.sign(s, append=True)
                signed_by.add(s.public_key.keyid)
        old_ok = len(signed_by & set(current.signed.roles["root"].keyids)) >= current.signed.roles["root"].threshold
        if not old_ok:
            raise KeystoreError("this keystore does not hold enough of the current root keys to sign a new root")
        write_atomic(self.folder / "metadata" / f"{new.signed.version}.root.json", to_bytes(new))
        if retired:
            self._retire(retired)
        return new

    def new_key(self, role: str) -> CryptoSigner:
        """Generate and record a key for `role` (root or targets)."""
        if role not in ("root", "targets"):
            raise KeystoreError(f"keys are added to root or targets, not {role!r}")
        signer = CryptoSigner.generate_ed25519()
        n = 1 + sum(1 for e in self.keys.values() if e.role == role)
        rel = f"keys/{role}-{n}.pem"
        while (self.folder / rel).exists():
            n += 1
            rel = f"keys/{role}-{n}.pem"
        _write_private(self.folder / rel, signer.private_bytes)
        self.keys[signer.public_key.keyid] = KeyEntry(signer.public_key.keyid, role, rel, signer.public_key.to_dict())
        self._save()
        return signer

    def rotate_root(self) -> Metadata[Root]:
        """Replace every root key with a new one (same count and threshold)."""
        current = self.root().signed.roles["root"]
        fresh = [self.new_key("root") for _ in current.keyids]

        def change(root: Root) -> list[str]:
            old = list(root.roles["root"].keyids)
            for k in old:
                root.revoke_key(k, "root")
            for s in fresh:
                root.add_key(s.public_key, "root")
            return old

        return self.change_root(change)

    def add_key(self, role: str) -> tuple[str, Metadata[Root]]:
        signer = self.new_key(role)

        def change(root: Root) -> list[str]:
            root.add_key(signer.public_key, role)
            return []

        return signer.public_key.keyid, self.change_root(change)

    def retire_key(self, keyid: str) -> tuple[str, Metadata[Root]]:
        """Remove a root or targets key from root (its role keeps its threshold)."""
        matches = [k for k in self.keys if k.startswith(keyid)]
        if len(matches) != 1:
            raise KeystoreError(f"key id {keyid!r} matches {len(matches)} keys of this keystore")
        entry = self.keys[matches[0]]
        if entry.role not in ("root", "targets"):
            raise KeystoreError(f"{entry.role} keys are not retired through root")

        def change(root: Root) -> list[str]:
            root.revoke_key(entry.keyid, entry.role)
            return [entry.keyid]

        return entry.role, self.change_root(change)

    def _retire(self, keyids: list[str]) -> None:
        for k in keyids:
            e = self.keys.get(k)
            if e is not None:
                self.keys[k] = KeyEntry(e.keyid, e.role, e.file, e.public, retired=True)
        self._save()

    def _save(self) -> None:
        entries = {
            k: {"role": e.role, "file": e.file, "public": e.public, **({"retired": True} if e.retired else {})}
            for k, e in self.keys.items()
        }
        _write_index(self.folder, entries, self.root_days, self.targets_days)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_index(folder: Path, entries: dict[str, Any], root_days: int, targets_days: int) -> None:
    doc = {"format": 1, "root_days": root_days, "targets_days": targets_days, "keys": entries}
    write_atomic(folder / INDEX, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)
