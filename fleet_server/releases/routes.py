"""HTTP for releases: the TUF repository under /tuf (no login) and the release API under
/api/v1/releases (login; changes by admins only, audited)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import FileResponse, Response

from fleet_server.auth.deps import AdminUser, CurrentUser, FleetDep
from fleet_server.releases.errors import PublishRefused, UnknownRelease
from fleet_server.releases.repository import PublishResult

MAX_HASHES = 4096


def build_tuf_router() -> APIRouter:
    """The TUF repository, served without a login.

    Anyone may read these files: TUF's signatures are the protection (a terminal trusts only
    metadata its root keys chain to, and only files matching signed hashes), and a terminal has no
    user account. Nothing else in the server answers without a login, so keep only TUF here.
    """
    r = APIRouter(prefix="/tuf", include_in_schema=False)

    @r.get("/metadata/{name}")
    def metadata(name: str, request: Request, fleet: FleetDep) -> Response:
        """A metadata file (N.root.json, N.targets.json, N.snapshot.json, timestamp.json, …)."""
        path = fleet.releases.repo.metadata_file(name)
        if path is None:
            return Response(status_code=404)
        # timestamp.json changes in place; versioned files never do
        cache = "no-cache" if name == "timestamp.json" else "public, max-age=31536000, immutable"
        return FileResponse(path, media_type="application/json", headers={"Cache-Control": cache})

    @r.get("/targets/{hashed_path:path}")
    def target(hashed_path: str, request: Request, fleet: FleetDep) -> Response:
        """A target file by its consistent-snapshot name `<folder>/<sha256>.<name>`; HTTP Range
        requests resume a download (206 with Content-Range; 416 for a range past the end)."""
        path = fleet.releases.repo.target_file(hashed_path)
        if path is None:
            return Response(status_code=404)
        return FileResponse(path, media_type="application/octet-stream")

    return r


def build_releases_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1/releases", tags=["releases"])

    @r.get("")
    def releases(user: CurrentUser, fleet: FleetDep, kind: str | None = None) -> list[dict[str, Any]]:
        """Published releases, newest counter first within each kind."""
        return [rec.to_dict() for rec in fleet.releases.list(kind)]

    @r.get("/trust")
    def trust(user: CurrentUser, fleet: FleetDep) -> dict[str, Any]:
        """Version and expiry of each TUF role (the trust-chain panel)."""
        return fleet.releases.trust()

    @r.get("/counters")
    def counters(user: AdminUser, fleet: FleetDep) -> dict[str, int]:
        """The highest release counter signed so far, per kind: a new release signs the next one."""
        return fleet.releases.counters()

    @r.post("/files/missing")
    def missing(
        user: AdminUser, fleet: FleetDep, sha256: Annotated[list[str], Body(embed=True, max_length=MAX_HASHES)]
    ) -> dict[str, list[str]]:
        """Which of these target files (by sha256) the server lacks, so only those are uploaded."""
        return {"missing": fleet.releases.missing_files(sha256)}

    @r.put("/files/{sha256}")
    async def upload(sha256: str, request: Request, user: AdminUser, fleet: FleetDep) -> dict[str, Any]:
        """Upload one target file (raw body); kept only if its sha256 is the one named."""
        writer = fleet.releases.blob_writer(sha256)
        try:
            async for chunk in request.stream():
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return {"sha256": sha256, "length": writer.finish()}

    @r.post("/init")
    def init(
        user: AdminUser,
        fleet: FleetDep,
        root: Annotated[dict[str, Any], Body()],
        targets: Annotated[dict[str, Any], Body()],
        delegated: Annotated[dict[str, dict[str, Any]], Body()],
    ) -> dict[str, Any]:
        """Set up the repository from the keystore's first root and targets metadata."""
        return _result(fleet.releases.init(user, root, targets, delegated))

    @r.post("/publish")
    def publish(
        user: AdminUser,
        fleet: FleetDep,
        targets: Annotated[dict[str, Any] | None, Body()] = None,
        delegated: Annotated[dict[str, dict[str, Any]] | None, Body()] = None,
        root: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        """Publish new signed metadata: verified (signatures, versions, files, counters) before
        anything is written; snapshot and timestamp are then re-signed with the online key."""
        if targets is None and not delegated and root is None:
            raise PublishRefused("nothing to publish: send targets, delegated and/or root metadata")
        return _result(fleet.releases.publish(user, targets, delegated or {}, root))

    @r.get("/{path:path}")
    def release(path: str, user: CurrentUser, fleet: FleetDep) -> dict[str, Any]:
        """One published release, with the rollback twin that rolls it back (if signed)."""
        rec = fleet.releases.get(path)
        if rec is None:
            raise UnknownRelease(f"no published release has target path {path!r}")
        return {**rec.to_dict(), "rollback_twin": fleet.releases.rollback_twin(path)}

    return r


def _result(result: PublishResult) -> dict[str, Any]:
    return {
        "versions": result.versions,
        "targets": [
            {
                "path": t.path,
                "role": t.role,
                "kind": t.info.kind if t.info else None,
                "counter": t.info.counter if t.info else None,
            }
            for t in result.targets
        ],
    }
