"""The terminal's TUF client: refresh the signed metadata, read a release's signed description,
download a target resumably and hand back a verified file.

python-tuf's ngclient does the verification; this module adds what it leaves out: a fetcher with
HTTP Range resume, connect/read timeouts and a minimum speed; downloads into "<name>.part" that
are verified, fsync'd and renamed; fsync of the metadata it persists; a lock so one process at a
time uses a metadata folder; and TUF's errors mapped to the reason codes of the release contract.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions as tuf_errors

# imported from the defining modules: tuf's package __init__ files re-export without __all__
# entries mypy accepts (implicit re-export is off under strict)
from tuf.api._payload import TargetFile
from tuf.api.metadata import Metadata
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from fleet_wire.release import (
    REASONS,
    TARGET_PREFIX,
    WHEELS_PREFIX,
    ReleaseContractError,
    ReleaseInfo,
    is_target_path,
    release_info,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# a download slower than this on average, once MIN_SPEED_GRACE_S have passed, is given up (and
# resumed at the next fetch): a stalled link must not hold the installer for hours
MIN_SPEED_BYTES_PER_S = 2048
MIN_SPEED_GRACE_S = 30.0
LOCK_NAME = ".lock"
PART_SUFFIX = ".part"


class TrustError(Exception):
    """A release could not be trusted or fetched. `.reason` is a key of fleet_wire.release.REASONS;
    str(err) says what happened in plain language."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown trust failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedTarget:
    """A target file on local disk whose length and sha256 match the signed metadata."""

    path: str  # the TUF target path, e.g. agent/7/kiosk_fleet_agent-1.4.0-py3-none-any.whl
    file: Path  # downloads_dir/<target path>: the file keeps its name (pip needs a wheel's name)
    length: int
    sha256: str
    info: ReleaseInfo | None  # None for wheels/* files


class _RangeFetcher(FetcherInterface):
    """urllib fetcher with timeouts, a minimum speed and (for targets) HTTP Range resume."""

    def __init__(
        self, timeout_s: float, min_speed: int = MIN_SPEED_BYTES_PER_S, grace_s: float = MIN_SPEED_GRACE_S
    ) -> None:
        self.timeout_s = timeout_s
        self.min_speed = min_speed
        self.grace_s = grace_s

    def _open(self, url: str, start: int = 0) -> http.client.HTTPResponse:
        headers = {"User-Agent": "kiosk-fleet-agent"}
        if start > 0:
            headers["Range"] = f"bytes={start}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as err:
            err.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {err.code}", err.code) from err
        except (urllib.error.URLError, OSError) as err:
            raise tuf_errors.DownloadError(f"{url}: {getattr(err, 'reason', err)}") from err
        assert isinstance(resp, http.client.HTTPResponse)
        return resp

    def _chunks(self, resp: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
        started = time.monotonic()
        received = 0
        try:
            while True:
                try:
                    chunk = resp.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as err:
                    raise tuf_errors.DownloadError(f"{url}: connection lost ({err})") from err
                if not chunk:
                    return
                received += len(chunk)
                elapsed = time.monotonic() - started
                if elapsed > self.grace_s and received / elapsed < self.min_speed:
                    raise tuf_errors.SlowRetrievalError(f"{url}: download slower than {self.min_speed} bytes/s")
                yield chunk
        finally:
            resp.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        resp = self._open(url)
        return self._chunks(resp, url)

    def fetch_from(self, url: str, start: int) -> tuple[int, Iterator[bytes]]:
        """GET `url` from byte `start`; returns where the body really starts (0 if the server
        ignored the range) and the body."""
        try:
            resp = self._open(url, start)
        except tuf_errors.DownloadHTTPError as err:
            if err.status_code == 416 and start > 0:
                # the partial file is as long as (or longer than) the target: start afresh
                return self.fetch_from(url, 0)
            raise
        offset = 0
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            try:
                offset = int(content_range.split(" ", 1)[1].split("-", 1)[0])
            except (IndexError, ValueError) as err:
                resp.close()
                raise tuf_errors.DownloadError(f"{url}: bad Content-Range {content_range!r}") from err
        return offset, self._chunks(resp, url)


class _DurableUpdater(Updater):
    # ngclient writes metadata without fsync (a power cut can leave an empty timestamp.json and
    # lose the rollback protection it carried): same write, plus fsync of file and folder
    def _persist_file(self, filename: str, data: bytes) -> None:
        folder = os.path.dirname(filename)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filename)
        except BaseException:
            with _suppress_missing():
                os.unlink(tmp)
            raise
        _fsync_dir(folder)


class TrustClient:
    """TUF client for one repository (`repo_url` + /metadata/ and /targets/). `root` is the
    bootstrap root.json the caller trusts (shipped with the agent); newer roots are followed."""

    def __init__(
        self,
        metadata_dir: Path,
        repo_url: str,
        root: bytes,
        downloads_dir: Path,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        if not repo_url.startswith(("http://", "https://")):
            raise ValueError(f"repository URL must be http(s)://…, got {repo_url!r}")
        self.metadata_dir = Path(metadata_dir)
        self.downloads_dir = Path(downloads_dir)
        self.repo_url = repo_url.rstrip("/")
        self._root = root
        self._fetcher = _RangeFetcher(timeout_s)
        self._updater: Updater | None = None
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)

    # -- public -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (root → timestamp → snapshot → targets)."""
        with self._locked(), _mapped("refreshing the release metadata"):
            updater = _DurableUpdater(
                str(self.metadata_dir),
                f"{self.repo_url}/metadata/",
                str(self.downloads_dir),
                f"{self.repo_url}/targets/",
                fetcher=self._fetcher,
                config=UpdaterConfig(prefix_targets_with_hash=True),
                bootstrap=self._root,
            )
            self._updater = None
            updater.refresh()
            self._updater = updater

    def release(self, target_path: str) -> ReleaseInfo:
        """The signed release description of `target_path` (raises unknown_target, not_a_release)."""
        with self._locked():
            ti = self._targetinfo(target_path)
            info = _info_of(target_path, ti)
            if info is None:
                raise TrustError("not_a_release", f"{target_path} is a dependency file, not a release")
            return info

    def fetch(self, target_path: str) -> VerifiedTarget:
        """Download `target_path` (resuming a partial download) and return the verified file."""
        with self._locked():
            ti = self._targetinfo(target_path)
            info = _info_of(target_path, ti)
            sha256 = ti.hashes.get("sha256")
            if sha256 is None:
                raise TrustError("not_a_release", f"{target_path} is signed without a sha256 hash")
            dest = self.downloads_dir / target_path
            if _matches(dest, ti.length, sha256):
                return VerifiedTarget(target_path, dest, ti.length, sha256, info)
            with _mapped(f"downloading {target_path}"):
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download(ti, sha256, dest)
            return VerifiedTarget(target_path, dest, ti.length, sha256, info)

    def expires(self) -> datetime:
        """The earliest expiry among the trusted metadata (after refresh())."""
        if self._updater is None:
            raise RuntimeError("TrustClient.expires() needs a successful refresh() first")
        earliest: datetime | None = None
        for file in sorted(self.metadata_dir.glob("*.json")):
            try:
                signed = Metadata.from_bytes(file.read_bytes()).signed
            except (OSError, tuf_errors.RepositoryError, ValueError):
                continue
            if earliest is None or signed.expires < earliest:
                earliest = signed.expires
        if earliest is None:
            raise RuntimeError(f"no trusted metadata in {self.metadata_dir}")
        return earliest

    # -- internals ----------------------------------------------------------------------------

    def _targetinfo(self, target_path: str) -> TargetFile:
        if not is_target_path(target_path):
            raise TrustError("unknown_target", f"{target_path!r} is not a release target path")
        if self._updater is None:
            raise RuntimeError("TrustClient needs a successful refresh() first")
        with _mapped(f"looking up {target_path}"):
            ti = self._updater.get_targetinfo(target_path)
        if ti is None:
            raise TrustError("unknown_target", f"the signed metadata lists no {target_path}")
        return ti

    def _download(self, ti: TargetFile, sha256: str, dest: Path) -> None:
        part = dest.with_name(dest.name + PART_SUFFIX)
        have = part.stat().st_size if part.exists() else 0
        if have and not self._download_into(part, ti, sha256, have):
            # a resumed part may be the start of another file once signed under this path: once
            # more from byte 0 before calling the repository's copy tampered
            have = 0
        if not have and not self._download_into(part, ti, sha256, 0):
            part.unlink()
            raise TrustError("tampered", f"{ti.path}: the download does not match its signed sha256")
        os.replace(part, dest)
        _fsync_dir(str(dest.parent))

    def _download_into(self, part: Path, ti: TargetFile, sha256: str, have: int) -> bool:
        """Fill `part` up to the signed length from byte `have`; whether it then verifies."""
        if have >= ti.length:
            # a complete (or over-long) part that did not verify last time: fetch it again
            part.unlink()
            have = 0
        folder, _, name = ti.path.rpartition("/")
        url = f"{self.repo_url}/targets/{folder}/{sha256}.{quote(name)}"
        offset, chunks = self._fetcher.fetch_from(url, have)
        with open(part, "r+b" if part.exists() else "wb") as f:
            f.seek(offset)
            f.truncate()
            written = offset
            for chunk in chunks:
                written += len(chunk)
                if written > ti.length:
                    f.close()
                    part.unlink()
                    raise TrustError(
                        "tampered", f"{ti.path}: the repository sent more than its signed {ti.length} bytes"
                    )
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if written < ti.length:
            raise TrustError("download_failed", f"{ti.path}: download ended after {written} of {ti.length} bytes")
        return _matches(part, ti.length, sha256)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock on a file inside the folder: released by the kernel if the process dies
        fd = os.open(self.metadata_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _info_of(target_path: str, ti: TargetFile) -> ReleaseInfo | None:
    if target_path.startswith(WHEELS_PREFIX):
        return None
    if target_path.startswith(TARGET_PREFIX["face_model"]) and not ti.custom:
        return None  # one of a face-model release's other files (its hash is signed all the same)
    try:
        info = release_info(ti.custom)
    except ReleaseContractError as err:
        raise TrustError("not_a_release", f"{target_path}: {err}") from err
    if not target_path.startswith(TARGET_PREFIX[info.kind]):
        raise TrustError(
            "not_a_release",
            f"{target_path}: signed as a {info.kind} release but not under {TARGET_PREFIX[info.kind]}",
        )
    return info


def _matches(file: Path, length: int, sha256: str) -> bool:
    try:
        if file.stat().st_size != length:
            return False
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest() == sha256
    except OSError:
        return False


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


@contextmanager
def _mapped(doing: str) -> Iterator[None]:
    """Translate python-tuf's errors into TrustError with a contract reason."""
    try:
        yield
    except TrustError:
        raise
    except tuf_errors.ExpiredMetadataError as err:
        raise TrustError(
            "expired", f"{doing}: signed metadata has expired ({err}); check the terminal's clock"
        ) from err
    except tuf_errors.BadVersionNumberError as err:
        raise TrustError("metadata_rollback", f"{doing}: the repository offered older metadata ({err})") from err
    except tuf_errors.UnsignedMetadataError as err:
        raise TrustError("bad_signature", f"{doing}: not signed by the trusted keys ({err})") from err
    except (tuf_errors.LengthOrHashMismatchError, tuf_errors.DownloadLengthMismatchError) as err:
        raise TrustError("tampered", f"{doing}: does not match its signed hash or length ({err})") from err
    except tuf_errors.DownloadError as err:
        raise TrustError("download_failed", f"{doing}: {err}") from err
    except tuf_errors.RepositoryError as err:
        # malformed or inconsistent metadata: it cannot be verified as signed
        raise TrustError("bad_signature", f"{doing}: metadata cannot be verified ({err})") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise TrustError("disk_full", f"{doing}: no space left on the disk") from err
        raise TrustError("download_failed", f"{doing}: {err}") from err
