"""The release manager's side of the server API: what `fleetctl release` and the dev helpers call.

Reads the server's current TUF state (checking it against the keystore's own keys before signing
on top of it), uploads only the target files the server lacks, and publishes signed metadata.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tuf.api.metadata import Metadata

from fleet_server.releases.bundle import SIGNED_FILE, BundleError
from fleet_server.releases.errors import ReleaseError
from fleet_server.releases.keystore import Keystore
from fleet_server.releases.signing import CurrentState, SignedRelease, resign_targets

UPLOAD_CHUNK = 1 << 20


class ReleaseClientError(ReleaseError):
    """The server refused or could not be reached; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ReleaseClient:
    """Release operations over one authenticated httpx client (base URL = the server)."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise ReleaseClientError(f"cannot reach the fleet server at {self.http.base_url}: {err}", 0) from err
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text[:300]
            raise ReleaseClientError(str(detail), r.status_code)
        return r.json() if r.content else None

    # -- reading ------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        doc: dict[str, int] = self._call("GET", "/api/v1/releases/counters")
        return doc

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        doc: list[dict[str, Any]] = self._call("GET", "/api/v1/releases", params={"kind": kind} if kind else None)
        return doc

    def trust(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._call("GET", "/api/v1/releases/trust")
        return doc

    def _metadata(self, name: str) -> Metadata[Any]:
        try:
            r = self.http.get(f"/tuf/metadata/{name}")
        except httpx.HTTPError as err:
            raise ReleaseClientError(f"cannot reach the fleet server at {self.http.base_url}: {err}", 0) from err
        if r.status_code != 200:
            raise ReleaseClientError(f"the server has no /tuf/metadata/{name} (HTTP {r.status_code})", r.status_code)
        return Metadata.from_bytes(r.content)

    def current(self, keystore: Keystore) -> CurrentState:
        """The server's committed targets and delegated metadata, checked against the keystore's keys."""
        root = keystore.root()
        timestamp = self._metadata("timestamp.json")
        snapshot = self._metadata(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        roles = {name.removesuffix(".json"): meta.version for name, meta in snapshot.signed.meta.items()}
        targets = self._metadata(f"{roles['targets']}.targets.json")
        keystore.verify("targets", targets, root.signed)
        delegated = {}
        for role, version in roles.items():
            if role != "targets":
                md = self._metadata(f"{version}.{role}.json")
                keystore.verify(role, md, targets.signed)
                delegated[role] = md
        return CurrentState(root, targets, delegated, self.counters())

    # -- changing -----------------------------------------------------------------------------------

    def init_server(self, keystore: Keystore) -> dict[str, Any]:
        """Set up the server's repository from the keystore's root 1 and first targets metadata."""
        from fleet_server.releases.tufmeta import FACE_ROLE

        first_root = Metadata.from_file(str(keystore.folder / "metadata" / "1.root.json"))
        doc: dict[str, Any] = self._call(
            "POST",
            "/api/v1/releases/init",
            json={
                "root": first_root.to_dict(),
                "targets": keystore.initial("targets").to_dict(),
                "delegated": {FACE_ROLE: keystore.initial(FACE_ROLE).to_dict()},
            },
        )
        # a keystore that has rotated root since: bring the server up to its newest root
        newest = keystore.root().signed.version
        for v in range(2, newest + 1):
            md = Metadata.from_file(str(keystore.folder / "metadata" / f"{v}.root.json"))
            doc = self._call("POST", "/api/v1/releases/publish", json={"root": md.to_dict()})
        return doc

    def upload_missing(self, files: dict[str, Path]) -> builtins.list[str]:
        """Upload the files (sha256 -> local path) the server does not have; returns their hashes."""
        if not files:
            return []
        missing: builtins.list[str] = self._call(
            "POST", "/api/v1/releases/files/missing", json={"sha256": sorted(files)}
        )["missing"]
        for digest in missing:
            self._call(
                "PUT",
                f"/api/v1/releases/files/{digest}",
                content=_chunks(files[digest]),
                headers={"Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(30.0, read=600.0),
            )
        return missing

    def publish(self, signed: SignedRelease, files_dir: Path | None = None) -> dict[str, Any]:
        """Upload what the server lacks, then publish the signed metadata."""
        if files_dir is not None:
            local = {digest: files_dir / name for digest, name in signed.files.items()}
            for path in local.values():
                if not path.is_file():
                    raise BundleError(f"{path}: a file of the signed release is missing")
            self.upload_missing(local)
        body: dict[str, Any] = {"delegated": {r: md.to_dict() for r, md in signed.delegated.items()}}
        if signed.targets is not None:
            body["targets"] = signed.targets.to_dict()
        doc: dict[str, Any] = self._call("POST", "/api/v1/releases/publish", json=body)
        return doc

    def publish_bundle(self, bundle: Path) -> dict[str, Any]:
        import json

        path = Path(bundle) / SIGNED_FILE
        if not path.is_file():
            raise BundleError(f"{bundle}: not signed yet; run `fleetctl release sign {bundle} --keystore DIR`")
        return self.publish(SignedRelease.from_doc(json.loads(path.read_text("utf-8"))), Path(bundle) / "files")

    def publish_root(self, keystore: Keystore, root: Metadata[Any], *, resign: bool) -> dict[str, Any]:
        """Publish a new root; with `resign`, the current targets signed again with the keystore's
        release keys in the same request (needed when release keys changed)."""
        body: dict[str, Any] = {"root": root.to_dict()}
        if resign:
            state = self.current_for_rotation(keystore)
            body["targets"] = resign_targets(keystore, state).to_dict()
        doc: dict[str, Any] = self._call("POST", "/api/v1/releases/publish", json=body)
        return doc

    def current_for_rotation(self, keystore: Keystore) -> CurrentState:
        """Current state, with targets checked against the root the server has (the keystore's is newer)."""
        timestamp = self._metadata("timestamp.json")
        snapshot = self._metadata(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        version = snapshot.signed.meta["targets.json"].version
        targets = self._metadata(f"{version}.targets.json")
        server_root = self._metadata(f"{keystore.root().signed.version - 1}.root.json")
        keystore.verify("targets", targets, server_root.signed)
        return CurrentState(server_root, targets, {}, self.counters())


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(UPLOAD_CHUNK), b"")
