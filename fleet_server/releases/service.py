"""Releases on the server: publish (verified by the repository, recorded, audited), what is
published (for the rollout engine and the console), re-signing on a schedule, expiry metrics."""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet_server.clock import utc_iso
from fleet_server.db import connect
from fleet_server.releases.errors import ReleaseError
from fleet_server.releases.repository import BlobWriter, NewTarget, PublishResult, TufRepository
from fleet_server.releases.store import ReleaseStore, migrations
from fleet_wire.release import KINDS, WHEELS_PREFIX, ReleaseContractError, release_info

if TYPE_CHECKING:
    from fleet_server.auth.models import User

log = logging.getLogger(__name__)

__all__ = ["ReleaseRecord", "ReleaseService", "migrations"]

EXPIRY_METRIC = "fleet_tuf_metadata_expires_seconds"


@dataclass(frozen=True)
class ReleaseRecord:
    """A published release target, as the rollout engine and the console see it."""

    path: str
    kind: str
    version: str
    counter: int
    profiles: tuple[str, ...]
    published_at: datetime
    notes: str
    role: str = "targets"
    sha256: str = ""
    length: int = 0
    # the earlier release whose file this one carries again (a rollback twin or a republish)
    restores: str | None = None
    # the release this one rolls back (set on a rollback twin)
    rolls_back: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["profiles"] = list(self.profiles)
        doc["published_at"] = utc_iso(self.published_at)
        return doc


class _ExpiryCollector(Collector):
    """Seconds until each role's metadata expires, computed at scrape time."""

    def __init__(self, repo: TufRepository) -> None:
        self.repo = repo

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(EXPIRY_METRIC, "Seconds until the role's TUF metadata expires", labels=["role"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(EXPIRY_METRIC, "Seconds until the role's TUF metadata expires", labels=["role"])
        try:
            now = self.repo.clock()
            for role, expires in sorted(self.repo.expiries().items()):
                family.add_metric([role], (expires - now).total_seconds())
        except Exception:
            log.exception("reading the TUF metadata expiries failed")
        yield family


class ReleaseService:
    """The server's releases; `fleet.releases` for other components."""

    def __init__(
        self,
        repository: TufRepository,
        db_path: Path,
        registry: CollectorRegistry,
        *,
        audit: Callable[[User, str, str, Any, Any], Any] | None = None,
    ) -> None:
        self.repo = repository
        self.audit = audit
        self.db_path = db_path
        self._conn = connect(db_path)
        self._lock = threading.Lock()
        self.store = ReleaseStore(self._conn)
        registry.register(_ExpiryCollector(repository))
        self.resigned = Counter(
            "fleet_tuf_resigned_total", "Online re-signings of TUF metadata", ["role"], registry=registry
        )
        self.resign_failures = Counter(
            "fleet_tuf_resign_failures_total", "Scheduled re-signings of TUF metadata that failed", registry=registry
        )
        try:
            self._sync()
        except Exception:
            log.exception("could not read the TUF repository at %s to list its releases", repository.root_dir)

    def close(self) -> None:
        self._conn.close()

    # -- for the rollout engine and the console ---------------------------------------------------------

    def get(self, path: str) -> ReleaseRecord | None:
        """The published release with target path `path`, or None."""
        with connect(self.db_path, readonly=True) as conn:
            row = ReleaseStore(conn).get(path)
        return _record(row) if row else None

    def list(self, kind: str | None = None) -> builtins.list[ReleaseRecord]:
        """Published releases (of one kind), newest counter first within a kind."""
        if kind is not None and kind not in KINDS:
            raise ReleaseError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        with connect(self.db_path, readonly=True) as conn:
            return [_record(r) for r in ReleaseStore(conn).list(kind)]

    def rollback_twin(self, path: str) -> str | None:
        """The target path of the signed twin that rolls release `path` back, if there is one."""
        with connect(self.db_path, readonly=True) as conn:
            return ReleaseStore(conn).twin_of(path)

    def expiries(self) -> dict[str, datetime]:
        """Role -> when its metadata expires (empty before the repository is set up)."""
        return self.repo.expiries()

    def counters(self) -> dict[str, int]:
        """The highest release counter signed so far, per kind."""
        return self.repo.counters()

    def trust(self) -> dict[str, Any]:
        """Expiry and version per role, for the console's trust-chain panel."""
        if not self.repo.initialised():
            return {"initialised": False, "roles": []}
        now = self.repo.clock()
        versions = self.repo.role_versions()
        versions.update(
            root=self.repo.root().signed.version,
            snapshot=self.repo.snapshot().signed.version,
            timestamp=self.repo.timestamp().signed.version,
        )
        roles = [
            {
                "role": role,
                "version": versions.get(role),
                "expires": utc_iso(expires),
                "expires_in_s": round((expires - now).total_seconds()),
                "signed_by": "online key (server)" if role in ("snapshot", "timestamp") else "offline keys",
            }
            for role, expires in sorted(self.repo.expiries().items(), key=lambda kv: kv[1])
        ]
        return {"initialised": True, "roles": roles}

    # -- changes ---------------------------------------------------------------------------------------

    def missing_files(self, hashes: builtins.list[str]) -> builtins.list[str]:
        """Which of these sha256 digests the server has no file for."""
        return [h for h in hashes if not self.repo.has_blob(h)]

    def blob_writer(self, sha256: str) -> BlobWriter:
        return self.repo.blob_writer(sha256)

    def init(self, user: User, root: Any, targets: Any, delegated: dict[str, Any]) -> PublishResult:
        """Set up the repository from the keystore's first metadata."""
        result = self.repo.init(root, targets, delegated)
        self._record(result.targets, user.name)
        self._audit(user, "release.init", "tuf", {"roles": result.versions})
        return result

    def publish(
        self, user: User, targets: Any | None, delegated: dict[str, Any], root: Any | None = None
    ) -> PublishResult:
        """Verify and commit new signed metadata; record its releases."""
        result = self.repo.publish(targets, delegated, root)
        self._record(result.targets, user.name)
        after = {"roles": result.versions, "targets": [t.path for t in result.targets]}
        self._audit(user, "release.publish", ",".join(sorted(result.versions)), after)
        return result

    def resign_due(self) -> builtins.list[str]:
        """The scheduler's job: re-sign snapshot/timestamp when half their life is gone."""
        try:
            roles = self.repo.resign_due()
        except Exception:
            self.resign_failures.inc()
            raise
        for role in roles:
            self.resigned.labels(role).inc()
        if roles:
            log.info("re-signed TUF %s", " and ".join(roles))
        return roles

    def _audit(self, user: User, action: str, target: str, after: Any) -> None:
        if self.audit is not None:
            self.audit(user, action, target, None, after)

    def _record(self, new: builtins.list[NewTarget], who: str) -> None:
        releases = [t for t in new if t.info is not None]
        if not releases:
            return
        now = utc_iso(datetime.now(UTC))
        with connect(self.db_path, readonly=True) as conn:
            earlier = ReleaseStore(conn).list()
        by_sha: dict[str, list[dict[str, Any]]] = {}
        for r in earlier:
            by_sha.setdefault(r["sha256"], []).append(r)
        fresh = {t.info.counter: t for t in releases if t.info is not None and t.sha256 not in by_sha}
        rows = []
        for t in releases:
            assert t.info is not None
            restores = rolls_back = None
            same = [r for r in by_sha.get(t.sha256, []) if r["kind"] == t.info.kind]
            if same:
                restores = min(same, key=lambda r: r["counter"])["path"]  # the original, not a copy
                # a twin is signed together with the release it rolls back, one counter above it
                partner = fresh.get(t.info.counter - 1)
                if partner is not None and partner.info is not None and partner.info.kind == t.info.kind:
                    rolls_back = partner.path
            rows.append(
                {
                    "path": t.path,
                    "kind": t.info.kind,
                    "version": t.info.version,
                    "counter": t.info.counter,
                    "profiles": t.info.profiles,
                    "notes": t.info.notes,
                    "role": t.role,
                    "sha256": t.sha256,
                    "length": t.length,
                    "published_at": now,
                    "published_by": who,
                    "restores": restores,
                    "rolls_back": rolls_back,
                }
            )
        # twins refer to releases recorded in the same call: insert in counter order
        rows.sort(key=lambda r: (r["kind"], r["counter"]))
        with self._lock:
            self.store.add(rows)

    def _sync(self) -> None:
        """Record releases the repository has but the table lacks (a crash between the two)."""
        if not self.repo.initialised():
            return
        with self._lock:
            have = self.store.paths()
        missing = []
        for path, (role, tf) in sorted(self.repo.all_targets().items()):
            if path in have or path.startswith(WHEELS_PREFIX):
                continue
            try:
                info = release_info(tf.custom)
            except ReleaseContractError:
                continue
            missing.append(NewTarget(role, path, tf.hashes.get("sha256", ""), tf.length, info))
        if missing:
            log.warning("recording %d release(s) found in the TUF repository but not in the database", len(missing))
            self._record(missing, "repository")


def _record(row: dict[str, Any]) -> ReleaseRecord:
    published = datetime.fromisoformat(row["published_at"].replace("Z", "+00:00"))
    return ReleaseRecord(
        path=row["path"],
        kind=row["kind"],
        version=row["version"],
        counter=int(row["counter"]),
        profiles=tuple(row["profiles"]),
        published_at=published,
        notes=row["notes"],
        role=row["role"],
        sha256=row["sha256"],
        length=int(row["length"]),
        restores=row["restores"],
        rolls_back=row["rolls_back"],
    )
